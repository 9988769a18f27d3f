//! Opening a byte stream to the dashboard, for both protocols: resolve the URL's host (an IP
//! literal without a resolver thread), connect to each address in turn, then TLS through the
//! agent's rustls configuration (system roots or the CA file, key pinning) when the URL's
//! scheme asks for it. Errors say what failed in the agent's terms and never quote a header.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::DashboardError;

/// A connected stream, plain or TLS.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The URL's host without IPv6 brackets, for resolving and for TLS's server name.
pub(super) fn host_of(url: &url::Url) -> Result<String, DashboardError> {
    Ok(url
        .host_str()
        .ok_or_else(|| DashboardError::Unreachable("the URL has no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

/// Connects to `url`'s host and port; with `tls`, completes a TLS handshake too.
pub(super) async fn open(
    url: &url::Url,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn Io>, DashboardError> {
    let host = host_of(url)?;
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| DashboardError::Unreachable(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = DashboardError::Unreachable(format!("no address for {host}"));
    let mut tcp = None;
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = DashboardError::Unreachable("connection refused".into());
            }
            Err(e) => last = DashboardError::Unreachable(e.to_string()),
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    Ok(match tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| DashboardError::Unreachable(format!("bad host name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                .connect(name, tcp)
                .await
                .map_err(|e| DashboardError::Unreachable(format!("TLS: {e}")))?;
            Box::new(tls)
        }
    })
}
