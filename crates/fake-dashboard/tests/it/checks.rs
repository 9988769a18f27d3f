//! Validation, check order, authentication and token provisioning (protocol §1, §2, §3.1, §8).

use serde_json::json;

use crate::util::{Agent, SHARED, fake_with, register_body, send};

#[test]
fn invalid_body_is_422_with_pydantic_detail_even_without_auth() {
    let dash = fake_with(|_| {});
    let body = json!({"hostname": "h1", "host_type": "linux", "agent_version": "x".repeat(21)})
        .to_string();
    let r = send(
        &dash.url(),
        "POST",
        "/api/hosts/h1/register",
        None,
        Some(body.as_bytes()),
    )
    .unwrap();
    assert_eq!(r.status, 422);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.text().starts_with(
        r#"{"detail":[{"type":"string_pattern_mismatch","loc":["body","host_type"],"msg":"#
    ));
    let detail = r.json()["detail"].as_array().unwrap().clone();
    assert_eq!(detail.len(), 2);
    assert_eq!(detail[0]["type"], "string_pattern_mismatch");
    assert_eq!(detail[0]["loc"], json!(["body", "host_type"]));
    assert_eq!(detail[0]["input"], "linux");
    assert_eq!(detail[1]["loc"], json!(["body", "agent_version"]));
    assert_eq!(detail[1]["ctx"], json!({"max_length": 20}));
    assert!(dash.host("h1").is_none());
}

#[test]
fn non_json_body_is_422_before_bad_id_and_auth() {
    let dash = fake_with(|_| {});
    let r = send(
        &dash.url(),
        "POST",
        "/api/hosts/bad_id/status",
        Some("wrong"),
        Some(b"{oops"),
    )
    .unwrap();
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["detail"][0]["type"], "json_invalid");
    let progress = json!({"total": 1}).to_string();
    let r = send(
        &dash.url(),
        "POST",
        "/api/hosts/h/test-progress",
        None,
        Some(progress.as_bytes()),
    )
    .unwrap();
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["detail"][0]["loc"], json!(["body", "current"]));
}

#[test]
fn bad_host_id_is_400_before_auth() {
    let dash = fake_with(|_| {});
    let body = register_body("ok-name").to_string();
    for id in ["1abc", "a.b", "a_b", &"a".repeat(64)] {
        let r = send(
            &dash.url(),
            "POST",
            &format!("/api/hosts/{id}/register"),
            Some("wrong"),
            Some(body.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            (r.status, r.json()),
            (400, json!({"detail": "Invalid host ID format"})),
            "{id}"
        );
    }
}

#[test]
fn wrong_or_missing_token_is_401() {
    let dash = fake_with(|_| {});
    for bearer in [None, Some(""), Some("nope")] {
        let r = send(&dash.url(), "GET", "/api/hosts/h/poll", bearer, None).unwrap();
        assert_eq!(
            (r.status, r.json()),
            (401, json!({"detail": "Invalid API token"})),
            "{bearer:?}"
        );
    }
    assert!(dash.host("h").is_none());
}

#[test]
fn token_is_provisioned_once_and_valid_only_for_its_own_host() {
    let dash = fake_with(|_| {});
    let shared = Agent::new(&dash);
    let first = shared.register("Alpha").json();
    assert_eq!(first["status"], "registered");
    assert_eq!(first["host_id"], "alpha");
    assert_eq!(first["command"], json!(null));
    let token = first["agent_token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 43);
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(dash.issued_token("alpha").as_deref(), Some(token.as_str()));
    assert!(dash.host("alpha").unwrap().has_agent_token());

    // Never shown again, also not to poll.
    assert!(shared.register("alpha").json().get("agent_token").is_none());
    assert!(shared.poll("alpha").json().get("agent_token").is_none());

    let own = Agent::with_token(&dash, &token);
    assert_eq!(own.register("ALPHA").status, 200, "ids are lowercased");
    let beta = own.register("beta");
    assert_eq!(
        beta.status, 401,
        "a per-host token is not valid for another host"
    );

    // The shared token keeps working until shared mode is switched off.
    dash.set_options(|o| o.allow_shared = false);
    assert_eq!(shared.register("alpha").status, 401);
    assert_eq!(own.register("alpha").status, 200);
    dash.set_host_token("alpha", "rotated");
    assert_eq!(own.register("alpha").status, 401);
    assert_eq!(
        Agent::with_token(&dash, "rotated").register("alpha").status,
        200
    );
}

#[test]
fn poll_provisions_too_and_provisioning_can_be_off() {
    let dash = fake_with(|o| o.provision_tokens = false);
    let agent = Agent::new(&dash);
    let r = agent.register("h").json();
    assert!(r.get("agent_token").is_none());
    assert!(!dash.host("h").unwrap().has_agent_token());
    dash.set_options(|o| o.provision_tokens = true);
    let r = agent.poll("h").json();
    assert_eq!(r["command"], json!(null));
    assert_eq!(r["agent_token"].as_str().unwrap().len(), 43);
}

#[test]
fn no_shared_token_configured_means_only_per_host_tokens() {
    let dash = fake_with(|o| o.shared_token = None);
    assert_eq!(Agent::new(&dash).register("h").status, 401);
    dash.set_host_token("h", "t");
    assert_eq!(Agent::with_token(&dash, "t").register("h").status, 200);
}

#[test]
fn rate_limit_answers_500_text_after_30_registers_and_422_does_not_count() {
    let dash = fake_with(|o| o.rate_limit = true);
    let agent = Agent::new(&dash);
    for _ in 0..5 {
        let bad = json!({"hostname": "h"}).to_string();
        assert_eq!(
            send(
                &dash.url(),
                "POST",
                "/api/hosts/h/register",
                None,
                Some(bad.as_bytes())
            )
            .unwrap()
            .status,
            422
        );
    }
    for i in 0..30 {
        assert_eq!(agent.register("h").status, 200, "register {i}");
    }
    let r = agent.register("h");
    assert_eq!(r.status, 500);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.text(), "Internal Server Error");
    // Counted before the id and auth checks, separately per endpoint.
    assert_eq!(Agent::with_token(&dash, "wrong").register("h").status, 500);
    assert_eq!(agent.poll("h").status, 200);
    assert_eq!(agent.status("h", &json!({"status": "ok"})).status, 200);
    dash.reset_rate_limits();
    assert_eq!(agent.register("h").status, 200);
}

#[test]
fn health_needs_no_auth_and_unknown_paths_are_404() {
    let dash = fake_with(|o| o.rate_limit = true);
    let r = send(&dash.url(), "GET", "/health", None, None).unwrap();
    assert_eq!(
        r.json(),
        json!({"status": "healthy", "version": "fake-dashboard"})
    );
    assert_eq!(
        send(&dash.url(), "GET", "/api/hosts", None, None)
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        send(
            &dash.url(),
            "GET",
            "/api/hosts/h/register",
            Some(SHARED),
            None
        )
        .unwrap()
        .status,
        405
    );
}
