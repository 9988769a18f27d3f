//! Token handling: a per-host token from the dashboard is used at once and persisted in v1's
//! cache format (0600 in a 0700 directory); a refused cached token falls back to the
//! configured one once; a refused token backs off long and says where the token came from.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(10);

#[test]
fn per_host_token_is_used_at_once_and_persisted_privately() {
    let h = Harness::new();
    let agent = h.spawn();
    assert!(wait_until(T, || h.dash.issued_token(HOST).is_some()));
    let token = h.dash.issued_token(HOST).unwrap();
    assert!(wait_until(T, || h.requests(Endpoint::Register).len() >= 3));
    let bearers: Vec<_> = h
        .requests(Endpoint::Register)
        .iter()
        .map(|r| r.bearer.clone().unwrap())
        .collect();
    assert_eq!(bearers[0], SHARED_TOKEN);
    assert!(bearers[1..].iter().all(|b| *b == token), "{bearers:?}");
    let cache = h.state_dir.join("token");
    assert_eq!(
        std::fs::read_to_string(&cache).unwrap(),
        format!("NIXFLEET_TOKEN={token}\n")
    );
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let dir_mode = std::fs::metadata(&h.state_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let log = agent.log();
    assert!(
        !log.contains(&token) && !log.contains(SHARED_TOKEN),
        "{log}"
    );
    drop(agent);

    // A restart uses the cached token from its first request, even with shared mode off.
    h.dash.set_options(|o| o.allow_shared = false);
    h.dash.clear_requests();
    let _agent = h.spawn();
    assert!(wait_until(T, || !h.requests(Endpoint::Register).is_empty()));
    let first = &h.requests(Endpoint::Register)[0];
    assert_eq!(first.bearer.as_deref(), Some(token.as_str()));
    assert_eq!(first.response_status, 200);
}

#[test]
fn refused_cached_token_falls_back_to_the_configured_one_once() {
    let h = Harness::new();
    std::fs::create_dir_all(&h.state_dir).unwrap();
    let cache = h.state_dir.join("token");
    std::fs::write(&cache, "NIXFLEET_TOKEN=stale-token\n").unwrap();
    // As the agent writes it: a cache others can read is not used (issue 10).
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let agent = h.spawn();
    assert!(wait_until(T, || h
        .requests(Endpoint::Register)
        .iter()
        .any(|r| r.response_status == 200)));
    let all = h.dash.requests();
    assert_eq!(all[0].bearer.as_deref(), Some("stale-token"));
    assert_eq!(all[0].response_status, 401);
    assert_eq!(all[1].bearer.as_deref(), Some(SHARED_TOKEN));
    assert!(agent.log().contains("falling back once"), "{}", agent.log());
}

#[test]
fn refused_token_backs_off_long_and_names_its_source() {
    let mut h = Harness::new();
    std::fs::write(&h.token_file, "wrong-token\n").unwrap();
    h.set("NIXFLEET_BACKOFF_CAP", "30");
    let agent = h.spawn();
    assert!(agent.wait_log(T, "refused the token"), "{}", agent.log());
    std::thread::sleep(Duration::from_secs(3));
    // One refused status (the start report) and then nothing for at least 15 s.
    assert_eq!(h.dash.requests().len(), 1, "{:?}", h.dash.requests());
    let log = agent.log();
    assert!(log.contains(h.token_file.to_str().unwrap()), "{log}");
    assert!(!log.contains("wrong-token"), "{log}");
}

/// A proxy or firewall answering 403 says nothing about the token (the v1 dashboard answers a
/// bad token with 401 only): the agent backs off like an outage and keeps its per-host token.
#[test]
fn proxy_403_is_not_a_token_problem() {
    let h = Harness::new();
    let agent = h.spawn();
    assert!(wait_until(T, || h.dash.issued_token(HOST).is_some()));
    let token = h.dash.issued_token(HOST).unwrap();
    assert!(wait_until(T, || h.requests(Endpoint::Register).len() >= 2));
    h.dash.set_mode(Mode::Status(403));
    assert!(wait_until(T, || h
        .requests(Endpoint::Register)
        .iter()
        .filter(|r| r.response_status == 403)
        .count()
        >= 2));
    h.dash.set_mode(Mode::Normal);
    h.dash.clear_requests();
    assert!(wait_until(T, || h
        .requests(Endpoint::Register)
        .iter()
        .any(|r| r.response_status == 200)));
    let bearers: Vec<_> = h
        .requests(Endpoint::Register)
        .iter()
        .map(|r| r.bearer.clone().unwrap())
        .collect();
    assert!(bearers.iter().all(|b| *b == token), "{bearers:?}");
    let log = agent.log();
    assert!(!log.contains("refused the token"), "{log}");
    assert!(log.contains("HTTP 403"), "{log}");
}
