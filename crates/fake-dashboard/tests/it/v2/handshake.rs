//! §2.3: the order of checks and the exact HTTP answers, before any upgrade.

use std::sync::Arc;

use fake_dashboard::v2::Behaviour;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::util::*;

#[tokio::test]
async fn wrong_missing_or_non_bearer_tokens_get_401_before_the_upgrade() {
    let fake = fake(|_| {});
    for auth in [
        "Authorization: Bearer wrong\r\n",
        "",
        "Authorization: bearer shared-agent-token\r\n",
        "Authorization: Basic c2hhcmVkOng=\r\n",
        "Authorization: Bearer  shared-agent-token\r\n",
    ] {
        let reply = raw_http(&fake, &upgrade_request("/ws", auth)).await;
        assert!(reply.starts_with("HTTP/1.1 401"), "{auth:?}: {reply}");
        assert!(
            reply.contains("content-type: text/plain; charset=utf-8"),
            "{reply}"
        );
        assert!(reply.contains("x-content-type-options: nosniff"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nUnauthorized\n"), "{reply}");
    }
    assert!(fake.connections().is_empty(), "nothing was upgraded");
    let hs = fake.handshakes();
    assert_eq!(hs.len(), 5);
    assert!(hs.iter().all(|h| h.status == 401 && h.conn.is_none()));
    assert_eq!(
        hs[0].header("authorization"),
        Some("Bearer wrong"),
        "recorded as sent"
    );
}

#[tokio::test]
async fn token_is_checked_before_the_upgrade_headers_then_400_then_403() {
    let fake = fake(|_| {});
    // Not an upgrade at all, bad token: still 401 (auth comes first).
    let plain = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n";
    let reply = raw_http(&fake, &format!("{plain}Authorization: Bearer nope\r\n\r\n")).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    // Good token, not an upgrade: 400 Bad Request.
    let reply = raw_http(
        &fake,
        &format!("{plain}Authorization: Bearer {TOKEN}\r\n\r\n"),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.ends_with("Bad Request\n"), "{reply}");
    // Good token and upgrade, foreign Origin: 403 with Sec-Websocket-Version.
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let reply = raw_http(
        &fake,
        &upgrade_request("/ws", &format!("{auth}Origin: https://evil.example\r\n")),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("sec-websocket-version: 13"), "{reply}");
    assert!(reply.ends_with("Forbidden\n"), "{reply}");
    // A local Origin against a local Host passes the Origin rule; a broken key is then 400.
    let bad_key = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n{auth}\
         Origin: http://localhost:3000\r\nConnection: close\r\n\r\n"
    );
    let reply = raw_http(&fake, &bad_key).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(fake.connections().is_empty());
}

#[tokio::test]
async fn other_paths_are_404_and_root_can_redirect_to_login() {
    let fake = fake(|_| {});
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    for path in ["/", "/ws/", "/api/ws"] {
        let reply = raw_http(&fake, &upgrade_request(path, &auth)).await;
        assert!(reply.starts_with("HTTP/1.1 404"), "{path}: {reply}");
        assert!(reply.ends_with("404 page not found\n"), "{reply}");
    }
    fake.set_behaviour(|b| b.redirect_root = true);
    let reply = raw_http(&fake, &upgrade_request("/", &auth)).await;
    assert!(reply.starts_with("HTTP/1.1 302"), "{reply}");
    assert!(reply.contains("location: /login"), "{reply}");
}

#[tokio::test]
async fn reject_all_tokens_refuses_the_right_one_too() {
    let fake = fake(|_| {});
    fake.set_behaviour(|b: &mut Behaviour| b.reject_all_tokens = true);
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let reply = raw_http(&fake, &upgrade_request("/ws", &auth)).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    fake.set_behaviour(|b| b.reject_all_tokens = false);
    let ws = dial(&fake, TOKEN).await;
    drop(ws);
    let hs = fake.handshakes();
    assert_eq!(hs.last().map(|h| h.status), Some(101));
    assert_eq!(
        hs.last().and_then(|h| h.header("authorization")),
        Some("Bearer shared-agent-token")
    );
    assert!(hs.last().and_then(|h| h.conn).is_some());
}

#[tokio::test]
async fn wss_serves_with_the_generated_ca() {
    let fake = fake(|o| o.tls = true);
    assert!(fake.url().starts_with("wss://127.0.0.1:"), "{}", fake.url());
    let ca_pem = fake.ca_pem().unwrap();
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", fake.port()))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut req = fake.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    use futures_util::SinkExt as _;
    ws.send(tokio_tungstenite::tungstenite::Message::text(register_msg(
        "tls1",
    )))
    .await
    .unwrap();
    use futures_util::StreamExt as _;
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(
        reply.into_text().unwrap().as_str(),
        r#"{"type":"registered","payload":{"host_id":"tls1"}}"#
    );
    assert!(fake.host("tls1").unwrap().online);
    assert!(fake.spki_sha256_base64().is_some());
    // The impostor speaks TLS too and displaces the client.
    let impostor = fake.impostor("tls1");
    assert_eq!(impostor.error(), None);
    assert_eq!(
        fake.current_connection("tls1").unwrap().id,
        impostor.conn_id().unwrap()
    );
    loop {
        match ws.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(c))) => {
                assert_eq!(c, None, "an empty close frame");
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
