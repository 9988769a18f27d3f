//! Misbehaviour on purpose: `Mode::Down/Hang/Slow/Garbage/Oversized/Status`.

use std::io::{BufReader, ErrorKind};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fake_dashboard::{Endpoint, Mode};
use serde_json::json;

use crate::util::{
    Agent, SHARED, addr, connect, fake_with, read_response, read_response_with, send, write_request,
};

#[test]
fn down_refuses_connections_and_comes_back_on_the_same_port() {
    let dash = fake_with(|_| {});
    let agent = Agent::new(&dash);
    let port = dash.port();

    // A keep-alive connection opened before Down must not survive it.
    let mut kept = connect(&dash.url(), Duration::from_secs(5)).unwrap();
    write_request(&mut kept, "GET", "/health", None, None, true).unwrap();
    let mut kept_reader = BufReader::new(kept.try_clone().unwrap());
    assert_eq!(read_response(&mut kept_reader).unwrap().status, 200);

    dash.set_mode(Mode::Down);
    let err = TcpStream::connect(addr(&dash.url())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    let reused = write_request(&mut kept, "GET", "/health", None, None, true)
        .and_then(|()| read_response(&mut kept_reader));
    assert!(
        reused.is_err(),
        "old keep-alive connection still answered: {reused:?}"
    );

    dash.set_mode(Mode::Normal);
    assert_eq!(dash.port(), port);
    assert_eq!(agent.register("h").status, 200);
    // Twice in a row works too.
    dash.set_mode(Mode::Down);
    assert!(TcpStream::connect(addr(&dash.url())).is_err());
    dash.set_mode(Mode::Normal);
    assert_eq!(agent.poll("h").status, 200);
}

#[test]
fn hang_reads_the_request_and_answers_only_after_the_mode_changes() {
    let dash = fake_with(|_| {});
    dash.set_mode(Mode::Hang);

    // A client with a short timeout just times out.
    let mut s = connect(&dash.url(), Duration::from_millis(300)).unwrap();
    write_request(
        &mut s,
        "GET",
        "/api/hosts/a/poll",
        Some(SHARED),
        None,
        false,
    )
    .unwrap();
    let e = read_response(&mut BufReader::new(s)).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e:?}"
    );

    let (tx, rx) = mpsc::channel();
    let agent = Agent::new(&dash);
    std::thread::spawn(move || tx.send(agent.register("b").status).unwrap());
    assert!(dash.wait_for(Duration::from_secs(5), |r| {
        r.iter()
            .any(|r| r.host_id.as_deref() == Some("b") && r.response_status == 0)
    }));
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "answered while hanging"
    );
    assert!(dash.host("b").is_none(), "nothing processed while hanging");

    dash.set_mode(Mode::Normal);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 200);
    assert!(dash.host("b").is_some());
    let rec = dash
        .requests()
        .into_iter()
        .find(|r| r.host_id.as_deref() == Some("b"))
        .unwrap();
    assert_eq!(
        (rec.endpoint, rec.response_status),
        (Endpoint::Register, 200)
    );
}

#[test]
fn slow_answers_normally_after_the_delay() {
    let dash = fake_with(|_| {});
    dash.set_mode(Mode::Slow(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(Agent::new(&dash).register("h").status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(dash.host("h").is_some());
}

#[test]
fn garbage_is_200_json_that_does_not_parse_and_changes_nothing() {
    let dash = fake_with(|_| {});
    dash.set_mode(Mode::Garbage);
    let r = Agent::new(&dash).register("h");
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("application/json"))
    );
    assert!(serde_json::from_slice::<serde_json::Value>(&r.body).is_err());
    assert!(dash.host("h").is_none());
    assert_eq!(dash.requests()[0].response_status, 200);
}

fn body_len(url: &str) -> (usize, Option<String>, Option<String>) {
    let mut s = connect(url, Duration::from_secs(10)).unwrap();
    write_request(
        &mut s,
        "GET",
        "/api/hosts/h/poll",
        Some(SHARED),
        None,
        false,
    )
    .unwrap();
    let mut n = 0;
    let (status, headers) = read_response_with(&mut BufReader::new(s), |d| n += d.len()).unwrap();
    assert_eq!(status, 200);
    let get = |k: &str| {
        headers
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    (n, get("content-length"), get("transfer-encoding"))
}

#[test]
fn oversized_streams_exactly_n_bytes() {
    let dash = fake_with(|_| {});
    let n = 8 * 1024 * 1024 + 3;
    dash.set_mode(Mode::Oversized(n));
    assert_eq!(body_len(&dash.url()), (n, Some(n.to_string()), None));
    dash.set_mode(Mode::OversizedChunked(n));
    assert_eq!(body_len(&dash.url()), (n, None, Some("chunked".into())));

    // Read to the end it is one valid JSON object; tiny sizes are just spaces.
    dash.set_mode(Mode::Oversized(1000));
    let v = Agent::new(&dash).poll("h").json();
    assert_eq!(v["command"], json!(null));
    dash.set_mode(Mode::Oversized(5));
    assert_eq!(Agent::new(&dash).poll("h").body, b"     ");
}

#[test]
fn status_mode_answers_plausible_bodies() {
    let dash = fake_with(|_| {});
    dash.set_mode(Mode::Status(503));
    let r = Agent::new(&dash).register("h");
    assert_eq!(
        (r.status, r.json()),
        (503, json!({"detail": "Service unhealthy"}))
    );
    dash.set_mode(Mode::Status(500));
    let r = send(&dash.url(), "GET", "/health", None, None).unwrap();
    assert_eq!(
        (r.status, r.text()),
        (500, "Internal Server Error".to_owned())
    );
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    dash.set_mode(Mode::Status(404));
    assert_eq!(
        Agent::new(&dash).poll("h").json(),
        json!({"detail": "Not Found"})
    );
    assert!(dash.host("h").is_none());
    assert_eq!(dash.mode(), Mode::Status(404));
}
