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
