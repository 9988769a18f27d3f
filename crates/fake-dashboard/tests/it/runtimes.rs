//! The handle works from plain tests and from both tokio flavours, even when the caller's
//! runtime is blocked, because the fake has its own thread and runtime.

use std::time::Duration;

use fake_dashboard::{Endpoint, Mode};

use crate::util::{Agent, fake_with};

#[test]
fn plain_test_and_wait_for() {
    let dash = fake_with(|_| {});
    let agent = Agent::new(&dash);
    let url = dash.url();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let _ = Agent {
            url,
            token: agent.token,
        }
        .register("late");
    });
    assert!(dash.wait_for(Duration::from_secs(5), |r| {
        r.iter().any(|r| r.endpoint == Endpoint::Register)
    }));
    assert!(!dash.wait_for(Duration::from_millis(60), |r| r.len() > 5));
    let rec = &dash.requests()[0];
    assert_eq!(rec.user_agent.as_deref(), Some("it-client/1"));
    assert_eq!(rec.bearer.as_deref(), Some(crate::util::SHARED));
    assert_eq!(rec.body.as_ref().unwrap()["hostname"], "late");
    assert!(rec.body_len > 0);
    dash.clear_requests();
    assert!(dash.requests().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_runtime_blocked_by_the_test() {
    let dash = fake_with(|_| {});
    // Blocking calls on this runtime's only thread: the fake still answers.
    assert_eq!(Agent::new(&dash).register("h").status, 200);
    dash.set_mode(Mode::Down);
    dash.set_mode(Mode::Normal);
    assert!(
        dash.wait_for_async(Duration::from_secs(1), |r| r.len() == 1)
            .await
    );
    drop(dash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_runtime_and_async_client() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dash = fake_with(|_| {});
    let mut s = tokio::net::TcpStream::connect(crate::util::addr(&dash.url()))
        .await
        .unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 200"));
    let d2 = dash.clone();
    tokio::task::spawn_blocking(move || d2.stop())
        .await
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(crate::util::addr(&dash.url()))
            .await
            .is_err()
    );
    assert_eq!(dash.requests().len(), 1, "state outlives stop");
}
