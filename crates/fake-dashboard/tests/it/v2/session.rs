//! One connection's life: register, displacement, keep-alive, limits, bad input, drops.

use std::time::{Duration, Instant};

use fake_dashboard::v2::{Direction, DropHow, EndReason, FrameKind, SendError};
use futures_util::SinkExt as _;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

use super::util::*;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn register_upserts_the_row_with_defaults_and_answers_registered() {
    let fake = fake(|_| {});
    let mut ws = agent(&fake, "web1").await;
    let h = fake.host("web1").unwrap();
    assert!(h.online);
    assert_eq!(
        (h.host_type.as_str(), h.agent_version.as_str()),
        ("nixos", "0.1.0")
    );
    assert_eq!(
        h.theme_color, "#7aa2f7",
        "empty colour gets the nixos default"
    );
    assert_eq!(
        (h.location.as_str(), h.device_type.as_str()),
        ("home", "desktop")
    );
    assert_eq!(h.generation, "4f2e9a1");
    assert_eq!(h.pending_command, None);
    assert_eq!(h.registers, 1);

    send(&mut ws, heartbeat_msg("ok")).await;
    assert_eq!(fake.wait_messages("heartbeat", 1, WAIT).len(), 1);
    let h = fake.host("web1").unwrap();
    assert_eq!(h.heartbeats, 1);
    assert_eq!(
        h.metrics,
        Some(json!({"cpu": 12.0, "ram": 41.5, "swap": 0.0, "load": 0.37}))
    );
    assert_eq!(h.update_status.unwrap()["lock"]["status"], "ok");

    let frames = fake.frames();
    let kinds: Vec<_> = frames
        .iter()
        .map(|f| (f.dir, f.msg_type.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (Direction::In, "register".to_owned()),
            (Direction::Out, "registered".to_owned()),
            (Direction::In, "heartbeat".to_owned()),
        ]
    );
    assert_eq!(
        frames[1].text,
        r#"{"type":"registered","payload":{"host_id":"web1"}}"#
    );
    assert_eq!(frames[0].host.as_deref(), Some("web1"));
    assert!(
        frames
            .windows(2)
            .all(|w| w[0].seq < w[1].seq && w[0].at <= w[1].at)
    );
}

#[tokio::test]
async fn a_second_register_displaces_the_first_with_an_empty_close_frame() {
    let fake = fake(|_| {});
    let mut first = agent(&fake, "web1").await;
    let first_id = fake.current_connection("web1").unwrap().id;
    let _second = agent(&fake, "web1").await;
    // tungstenite reports an empty close payload as `None` (RFC 6455: status 1005).
    assert_eq!(close_frame(&mut first).await, Some(None));
    assert!(fake.wait_until(WAIT, |f| !f.connections()[0].open));
    let conns = fake.connections();
    assert_eq!(conns[0].id, first_id);
    assert_eq!(conns[0].end, Some(EndReason::Displaced));
    assert_eq!(conns[0].close_sent, Some(None));
    assert!(!conns[0].current && conns[1].current && conns[1].open);
    assert!(
        fake.host("web1").unwrap().online,
        "the old connection's end is not an offline"
    );
    let out_close: Vec<_> = fake
        .frames()
        .into_iter()
        .filter(|f| f.kind == FrameKind::Close && f.dir == Direction::Out)
        .collect();
    assert_eq!(out_close.len(), 1);
    assert_eq!(
        (
            out_close[0].conn,
            out_close[0].close_code,
            out_close[0].raw_len
        ),
        (first_id, None, 0)
    );
}

#[tokio::test]
async fn an_impostor_displaces_the_agent_and_sees_the_same_when_displaced_back() {
    let fake = fake(|_| {});
    let mut ws = agent(&fake, "web1").await;
    let impostor = fake.impostor("web1");
    assert!(impostor.error().is_none(), "{:?}", impostor.error());
    assert_eq!(close_frame(&mut ws).await, Some(None));
    assert_eq!(
        fake.current_connection("web1").unwrap().id,
        impostor.conn_id().unwrap()
    );
    assert!(impostor.received()[0].contains(r#""host_id":"web1""#));
    // The real agent comes back: now the impostor is the one displaced.
    let _again = agent(&fake, "web1").await;
    assert!(impostor.wait_closed(WAIT));
    assert_eq!(impostor.close_received(), Some(None));
}

#[tokio::test]
async fn pings_on_the_interval_and_pongs_echo_unless_withheld() {
    let fake = fake(|o| o.ping_interval = Duration::from_millis(100));
    let mut ws = agent(&fake, "web1").await;
    // The fake pings with an empty payload; tungstenite answers it when reading.
    let got_ping = loop {
        match next(&mut ws).await {
            Some(Message::Ping(p)) => break p,
            Some(_) => continue,
            None => panic!("stream ended"),
        }
    };
    assert!(got_ping.is_empty());
    ws.send(ping(b"abc")).await.unwrap();
    let pong = loop {
        match next(&mut ws).await {
            Some(Message::Pong(p)) => break p,
            Some(_) => continue,
            None => panic!("stream ended"),
        }
    };
    assert_eq!(&pong[..], b"abc");
    assert!(fake.wait_for(WAIT, |fs| {
        fs.iter()
            .any(|f| f.dir == Direction::In && f.kind == FrameKind::Pong)
    }));
    assert!(
        fake.frames()
            .iter()
            .any(|f| f.dir == Direction::Out && f.kind == FrameKind::Pong && f.text == "abc")
    );

    fake.set_behaviour(|b| b.withhold_pongs = true);
    ws.send(ping(b"zzz")).await.unwrap();
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Ok(Some(Ok(Message::Pong(p)))) = tokio::time::timeout(
            Duration::from_millis(100),
            futures_util::StreamExt::next(&mut ws),
        )
        .await
        {
            panic!("got a pong {p:?} while withheld");
        }
    }
    assert!(
        fake.frames()
            .iter()
            .any(|f| f.dir == Direction::In && f.kind == FrameKind::Ping && f.text == "zzz")
    );
}

#[tokio::test]
async fn a_silent_connection_is_dropped_at_the_read_deadline_and_the_host_goes_offline() {
    let fake = fake(|o| o.read_deadline = Duration::from_millis(300));
    let ws = agent(&fake, "web1").await;
    let started = Instant::now();
    assert!(fake.wait_until(WAIT, |f| !f.host("web1").unwrap().online));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let c = &fake.connections()[0];
    assert_eq!(
        (c.open, c.end, c.close_sent),
        (false, Some(EndReason::ReadDeadline), None)
    );
    drop(ws);
}

#[tokio::test]
async fn frames_reset_the_read_deadline() {
    let fake = fake(|o| o.read_deadline = Duration::from_millis(400));
    let mut ws = agent(&fake, "web1").await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        ws.send(ping(b"")).await.unwrap();
    }
    assert!(
        fake.host("web1").unwrap().online,
        "900 ms of pings every 150 ms keep it open"
    );
}

#[tokio::test]
async fn a_message_above_the_cap_gets_1009_even_across_fragments() {
    let fake = fake(|o| o.max_message = 1000);
    let mut ws = agent(&fake, "web1").await;
    // Exactly at the cap passes (and is ignored as bad JSON, the connection stays).
    ws.send(Message::text("x".repeat(1000))).await.unwrap();
    assert!(fake.wait_for(WAIT, |fs| fs.iter().any(|f| f.raw_len == 1000)));
    assert!(fake.host("web1").unwrap().online);
    // 600 + 600 in two fragments: each is under the cap, the message is not.
    let first = WsFrame::message(vec![b'a'; 600], OpCode::Data(Data::Text), false);
    let rest = WsFrame::message(vec![b'b'; 600], OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(first)).await.unwrap();
    ws.send(Message::Frame(rest)).await.unwrap();
    let close = close_frame(&mut ws).await.expect("a close frame");
    let close = close.expect("with a code");
    assert_eq!(close.code, CloseCode::Size);
    assert!(close.reason.is_empty());
    assert!(fake.wait_until(WAIT, |f| !f.host("web1").unwrap().online));
    assert_eq!(fake.connections()[0].end, Some(EndReason::Oversize));
    assert_eq!(fake.connections()[0].close_sent, Some(Some(1009)));
}

#[tokio::test]
async fn fragmented_messages_are_reassembled_and_processed() {
    let fake = fake(|_| {});
    let mut ws = dial(&fake, TOKEN).await;
    let msg = register_msg("frag1");
    let (a, b) = msg.split_at(40);
    ws.send(Message::Frame(WsFrame::message(
        a.as_bytes().to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(WsFrame::message(
        b.as_bytes().to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["payload"]["host_id"], "frag1");
    let reg = &fake.messages("register")[0];
    assert_eq!((reg.fragments, reg.raw_len), (2, msg.len()));
}

#[tokio::test]
async fn bad_json_missing_payload_unknown_types_and_bad_fields_are_ignored_without_closing() {
    let fake = fake(|_| {});
    let mut ws = agent(&fake, "web1").await;
    for bad in [
        "{not json",
        r#"{"type":"heartbeat"}"#,
        r#"{"type":"nonsense","payload":{}}"#,
        r#"{"type":"command_complete","payload":{"command":"pull","exit_code":0}}"#,
        r#"{"type":"heartbeat","payload":{"command_pid":1.5}}"#,
        r#"{"type":"heartbeat","payload":{"metrics":{"load":"0.3"}}}"#,
    ] {
        send(&mut ws, bad.to_owned()).await;
    }
    // Binary with the same bytes is processed like text; nulls are zero values.
    ws.send(Message::binary(
        br#"{"type":"heartbeat","payload":{"generation":null,"metrics":null,"pending_command":null}}"#.to_vec(),
    ))
    .await
    .unwrap();
    assert!(fake.wait_for(
        WAIT,
        |fs| fs.iter().filter(|f| f.dir == Direction::In).count() == 8
    ));
    let ins: Vec<_> = fake
        .frames()
        .into_iter()
        .filter(|f| f.dir == Direction::In)
        .collect();
    for f in &ins[1..7] {
        assert!(f.ignored.is_some(), "{f:?}");
    }
    assert_eq!(ins[7].kind, FrameKind::Binary);
    assert_eq!(ins[7].ignored, None, "{:?}", ins[7]);
    let h = fake.host("web1").unwrap();
    assert_eq!(
        (h.heartbeats, h.generation.as_str(), h.metrics.clone()),
        (1, "", None)
    );
    assert!(fake.connections()[0].open);
}

#[tokio::test]
async fn send_command_kill_command_and_raw_reach_the_client_in_order() {
    let fake = fake(|_| {});
    let mut ws = agent(&fake, "web1").await;
    fake.send_command("web1", "bump-flake").unwrap();
    fake.send_kill_command("web1", "SIGTERM", 0);
    fake.send_raw("web1", b"{oops", false);
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "command", "payload": {"command": "bump-flake"}})
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "kill_command", "payload": {"signal": "SIGTERM", "pid": 0}})
    );
    match next(&mut ws).await {
        Some(Message::Text(t)) => assert_eq!(t.as_str(), "{oops"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fake.send_command("ghost", "pull"),
        Err(SendError::NotConnected)
    );
    assert!(fake.wait_for(WAIT, |fs| fs.iter().any(|f| f.is_out("command"))));
}

#[tokio::test]
async fn a_full_queue_fails_commands() {
    let fake = fake(|o| o.queue_cap = 2);
    let _ws = agent(&fake, "web1").await;
    fake.set_behaviour(|b| b.delay_commands = Some(Duration::from_secs(30)));
    // The writer holds the first one; two more fill the queue.
    let results: Vec<_> = (0..4).map(|_| fake.send_command("web1", "pull")).collect();
    assert!(results.contains(&Err(SendError::QueueFull)), "{results:?}");
}

#[tokio::test]
async fn withheld_registered_and_delayed_commands() {
    let fake = fake(|_| {});
    fake.set_behaviour(|b| {
        b.withhold_registered = true;
        b.delay_commands = Some(Duration::from_millis(300));
    });
    let mut ws = dial(&fake, TOKEN).await;
    send(&mut ws, register_msg("web1")).await;
    assert!(fake.wait_until(WAIT, |f| f.host("web1").is_some_and(|h| h.online)));
    let sent = Instant::now();
    fake.send_command("web1", "pull").unwrap();
    let first = next_json(&mut ws).await;
    assert_eq!(
        first["type"], "command",
        "no registered came first: {first}"
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(250),
        "{:?}",
        sent.elapsed()
    );
}

#[tokio::test]
async fn drop_connection_abrupt_or_with_a_chosen_close_code() {
    let fake = fake(|_| {});
    let mut ws = agent(&fake, "web1").await;
    fake.drop_connection("web1", DropHow::Abrupt);
    assert_eq!(
        close_frame(&mut ws).await,
        None,
        "no close frame (peer sees 1006)"
    );
    assert!(fake.wait_until(WAIT, |f| !f.host("web1").unwrap().online));

    let mut ws = agent(&fake, "web1").await;
    fake.drop_connection("web1", DropHow::Close(Some(1001)));
    let c = close_frame(&mut ws).await.unwrap().unwrap();
    assert_eq!(c.code, CloseCode::Away);
    drop(ws);

    let mut ws = agent(&fake, "web1").await;
    fake.drop_connection("web1", DropHow::Close(None));
    assert_eq!(close_frame(&mut ws).await, Some(None));
    assert!(fake.wait_until(WAIT, |f| f.connections().iter().all(|c| !c.open)));
    let ends: Vec<_> = fake.connections().iter().map(|c| c.end).collect();
    assert_eq!(ends, vec![Some(EndReason::Dropped); 3]);
}

#[tokio::test]
async fn the_peer_close_is_echoed_and_recorded() {
    let fake = fake(|_| {});
    let mut ws = agent(&fake, "web1").await;
    ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "shutdown".into(),
    }))
    .await
    .unwrap();
    let echo = close_frame(&mut ws).await.unwrap().unwrap();
    assert_eq!(echo.code, CloseCode::Normal);
    assert!(echo.reason.is_empty(), "gorilla echoes the code only");
    assert!(fake.wait_until(WAIT, |f| !f.connections()[0].open));
    let c = &fake.connections()[0];
    assert_eq!(c.close_received, Some((Some(1000), "shutdown".into())));
    assert_eq!(c.end, Some(EndReason::PeerClosed));
    assert!(!fake.host("web1").unwrap().online);
}

#[tokio::test]
async fn down_refuses_dials_and_serves_again_on_the_same_port() {
    let fake = fake(|_| {});
    let mut ws = agent(&fake, "web1").await;
    fake.set_behaviour(|b| b.down = true);
    assert_eq!(close_frame(&mut ws).await, None);
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", fake.port())).await;
    assert!(refused.is_err(), "listener closed");
    assert!(fake.wait_until(WAIT, |f| !f.host("web1").unwrap().online));
    fake.set_behaviour(|b| b.down = false);
    let _ws = agent(&fake, "web1").await;
    assert_eq!(fake.connections()[0].end, Some(EndReason::Down));
}

#[tokio::test]
async fn stop_drops_connections_and_keeps_the_record() {
    let fake = fake(|_| {});
    let mut ws = agent(&fake, "web1").await;
    fake.stop();
    assert_eq!(close_frame(&mut ws).await, None);
    assert_eq!(fake.connections()[0].end, Some(EndReason::Stopped));
    assert_eq!(fake.messages("register").len(), 1);
}

#[tokio::test]
async fn stop_reading_holds_inbound_frames_until_cleared() {
    let fake = fake(|o| o.read_deadline = Duration::from_millis(200));
    let mut ws = agent(&fake, "web1").await;
    fake.set_behaviour(|b| b.stop_reading = true);
    send(&mut ws, heartbeat_msg("ok")).await;
    // Longer than the read deadline: suspended while not reading.
    assert!(fake.none_within("heartbeat", Duration::from_millis(400)));
    assert!(fake.host("web1").unwrap().online);
    fake.set_behaviour(|b| b.stop_reading = false);
    assert_eq!(fake.wait_messages("heartbeat", 1, WAIT).len(), 1);
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_dropped_at_the_write_deadline() {
    let fake = fake(|o| o.write_deadline = Duration::from_millis(300));
    let ws = agent(&fake, "web1").await;
    // The client never reads again: 64 MiB cannot fit in the loopback socket buffers.
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..64 {
        fake.send_raw("web1", &chunk, true);
    }
    assert!(fake.wait_until(Duration::from_secs(20), |f| !f.connections()[0].open));
    let c = &fake.connections()[0];
    assert_eq!((c.end, c.close_sent), (Some(EndReason::WriteTimeout), None));
    assert!(!fake.host("web1").unwrap().online);
    drop(ws);
}

#[tokio::test]
async fn delayed_registered_arrives_after_the_delay() {
    let fake = fake(|_| {});
    fake.set_behaviour(|b| b.delay_registered = Some(Duration::from_millis(300)));
    let mut ws = dial(&fake, TOKEN).await;
    let sent = Instant::now();
    send(&mut ws, register_msg("web1")).await;
    assert_eq!(next_json(&mut ws).await["type"], "registered");
    assert!(
        sent.elapsed() >= Duration::from_millis(250),
        "{:?}",
        sent.elapsed()
    );
    assert!(
        fake.host("web1").unwrap().online,
        "the row is written at once"
    );
}
