//! One kept-alive HTTP/1.1 connection to the v1 dashboard, on hyper's client connection API.
//!
//! The agent has at most one request in flight, to one dashboard, so this is all the "pool" it
//! needs: a connection is kept after each answer and used for the next request; one the
//! dashboard closed while idle (uvicorn drops idle connections after 5 s) is noticed before
//! use and replaced. A request that a kept connection could not even start to write is sent
//! once more on a new connection; one that may have reached the dashboard never is (a report
//! must not be applied twice). Redirects are not followed (the token must not travel
//! elsewhere) and proxy variables are not read, as in v2.
//!
//! The caller bounds the whole exchange with its own timeout; this module bounds only the
//! connect, with its own shorter one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, Uri};

use super::DashboardError;
use crate::text::bounded;

/// Longest error text kept from a connection error (it can quote what the peer sent).
const MAX_ERROR_TEXT: usize = 300;

/// Largest response head (status line and headers) read from the dashboard.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The connection to one dashboard (see the module docs).
#[derive(Debug)]
pub(super) struct Connection {
    url: url::Url,
    /// `Host:` header: the URL's host, and its port when not the scheme's default.
    host: HeaderValue,
    tls: Option<Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
    /// What a connect that timed out reports (the caller's total timeout, as before).
    timeout_secs: u64,
    /// The connection kept between requests.
    idle: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl Connection {
    pub(super) fn new(
        url: url::Url,
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
        timeout_secs: u64,
    ) -> anyhow::Result<Self> {
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("NIXFLEET_URL has no host: {url}"))?;
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let host = HeaderValue::from_str(&host)
            .map_err(|_| anyhow::anyhow!("NIXFLEET_URL: host {host:?} cannot be sent"))?;
        Ok(Connection {
            url,
            host,
            tls,
            connect_timeout,
            timeout_secs,
            idle: Mutex::new(None),
        })
    }

    /// POSTs the JSON `body` to `path` with `authorization`; returns the answer with its body
    /// still to be read.
    pub(super) async fn post(
        &self,
        path: &Uri,
        authorization: &HeaderValue,
        body: Bytes,
    ) -> Result<Response<Incoming>, DashboardError> {
        let request = || {
            let mut request = Request::new(Full::new(body.clone()));
            *request.method_mut() = hyper::Method::POST;
            *request.uri_mut() = path.clone();
            let headers = request.headers_mut();
            headers.insert(header::HOST, self.host.clone());
            headers.insert(
                header::USER_AGENT,
                HeaderValue::from_static(concat!("nixfleet-agent/", env!("CARGO_PKG_VERSION"))),
            );
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            headers.insert(header::AUTHORIZATION, authorization.clone());
            request
        };
        if let Some(mut kept) = self.take_idle() {
            // `ready` fails when the dashboard closed the kept connection meanwhile.
            if kept.ready().await.is_ok() {
                match kept.try_send_request(request()).await {
                    Ok(response) => {
                        self.keep(kept);
                        return Ok(response);
                    }
                    Err(mut e) => {
                        if e.take_message().is_none() {
                            return Err(send_error(&e.into_error()));
                        }
                        // Never written: sending it on a new connection is safe.
                    }
                }
            }
        }
        let mut sender = self.connect().await?;
        let response = sender
            .send_request(request())
            .await
            .map_err(|e| send_error(&e))?;
        self.keep(sender);
        Ok(response)
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.take().filter(|sender| !sender.is_closed())
    }

    fn keep(&self, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.is_none() {
            *idle = Some(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, DashboardError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            super::dial::open(&self.url, self.tls.as_ref()),
        )
        .await
        .map_err(|_| DashboardError::Timeout(self.timeout_secs))??;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| send_error(&e))?;
        // The connection's own task reads and writes the socket; it ends when the dashboard
        // closes the connection or the last sender is dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("dashboard connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// A hyper error in the agent's terms: the innermost cause, bounded and escaped (it can quote
/// what the peer sent).
fn send_error(error: &hyper::Error) -> DashboardError {
    let mut reason = error.to_string();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(s) = source {
        reason = s.to_string();
        source = s.source();
    }
    if reason.contains("Connection refused") {
        return DashboardError::Unreachable("connection refused".into());
    }
    DashboardError::Unreachable(bounded(&reason, MAX_ERROR_TEXT))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// How the test server treats each request it reads.
    #[derive(Clone, Copy)]
    enum Serve {
        /// Answer 200 and keep the connection open.
        KeepAlive,
        /// Answer 200, then close the connection.
        AnswerThenClose,
        /// Read the request, then close without answering.
        CloseWithoutAnswer,
    }

    struct Server {
        url: url::Url,
        connections: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
    }

    /// A loopback HTTP/1.1 server that counts connections and requests (each request is one
    /// read of a small POST: enough for these tests).
    async fn server(serve: Serve) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = url::Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                        if let Serve::CloseWithoutAnswer = serve {
                            return;
                        }
                        let body = br#"{"ok":true}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = socket.write_all(head.as_bytes()).await;
                        let _ = socket.write_all(body).await;
                        if let Serve::AnswerThenClose = serve {
                            return;
                        }
                    }
                });
            }
        });
        Server {
            url,
            connections,
            requests,
        }
    }

    fn connection(url: &url::Url) -> Connection {
        Connection::new(url.clone(), None, Duration::from_secs(2), 5).unwrap()
    }

    async fn post(conn: &Connection) -> Result<u16, DashboardError> {
        let auth = HeaderValue::from_static("Bearer t");
        let path: Uri = "/api/hosts/h/register".parse().unwrap();
        let response = conn.post(&path, &auth, Bytes::from_static(b"{}")).await?;
        let status = response.status().as_u16();
        // Read the body so the connection is free for the next request.
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        Ok(status)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requests_share_one_kept_alive_connection() {
        let server = server(Serve::KeepAlive).await;
        let conn = connection(&server.url);
        for _ in 0..5 {
            assert_eq!(post(&conn).await.unwrap(), 200);
        }
        assert_eq!(server.requests.load(Ordering::SeqCst), 5);
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_dashboard_closed_is_replaced_without_an_error() {
        let server = server(Serve::AnswerThenClose).await;
        let conn = connection(&server.url);
        for _ in 0..3 {
            assert_eq!(post(&conn).await.unwrap(), 200);
            // Let the connection task see the close, as between two heartbeats.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.requests.load(Ordering::SeqCst), 3);
        assert_eq!(server.connections.load(Ordering::SeqCst), 3);
        // Without the pause: the close may not be seen yet, and the request still succeeds.
        assert_eq!(post(&conn).await.unwrap(), 200);
        assert_eq!(post(&conn).await.unwrap(), 200);
        assert_eq!(server.requests.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_that_may_have_arrived_is_never_sent_twice() {
        let server = server(Serve::CloseWithoutAnswer).await;
        let conn = connection(&server.url);
        let err = post(&conn).await.unwrap_err();
        assert!(
            matches!(err, DashboardError::Unreachable(_)),
            "unexpected error: {err:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server.requests.load(Ordering::SeqCst), 1, "sent again");
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_connect_says_connection_refused() {
        // A port nobody listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = url::Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        let err = post(&connection(&url)).await.unwrap_err();
        assert_eq!(
            err,
            DashboardError::Unreachable("connection refused".into())
        );
    }
}
