//! A tiny blocking HTTP/1.1 client (plain and rustls) so the tests see exactly what goes on
//! the wire: status, headers, raw body bytes, refused connections, hung reads.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use fake_dashboard::{FakeDashboard, Options};
use serde_json::Value;

/// The shared token of `Options::default()`.
pub const SHARED: &str = "shared-secret-token";

/// A parsed response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Starts a fake with default options plus `f`.
pub fn fake_with(f: impl FnOnce(&mut Options)) -> FakeDashboard {
    let mut opts = Options::default();
    f(&mut opts);
    FakeDashboard::start(opts)
}

/// Writes one request. `Connection: close` unless `keep_alive`.
pub fn write_request(
    w: &mut impl Write,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
    keep_alive: bool,
) -> io::Result<()> {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: it-client/1\r\n");
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if let Some(b) = body {
        w.write_all(b)?;
    }
    w.flush()
}

/// Reads one response, handing body bytes to `on_data` (Content-Length, chunked, or to EOF).
pub fn read_response_with(
    r: &mut impl BufRead,
    mut on_data: impl FnMut(&[u8]),
) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut buf = vec![0u8; 64 * 1024];
    if let Some(len) = get("content-length") {
        let mut left: usize = len.parse().map_err(io::Error::other)?;
        while left > 0 {
            let n = r.read(&mut buf[..left.min(64 * 1024)])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
            }
            on_data(&buf[..n]);
            left -= n;
        }
    } else if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).map_err(io::Error::other)?;
            if size == 0 {
                line.clear();
                r.read_line(&mut line)?;
                break;
            }
            let mut left = size;
            while left > 0 {
                let n = r.read(&mut buf[..left.min(64 * 1024)])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short chunk"));
                }
                on_data(&buf[..n]);
                left -= n;
            }
            line.clear();
            r.read_line(&mut line)?;
        }
    } else {
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            on_data(&buf[..n]);
        }
    }
    Ok((status, headers))
}

/// Reads one response into memory.
pub fn read_response(r: &mut impl BufRead) -> io::Result<Resp> {
    let mut body = Vec::new();
    let (status, headers) = read_response_with(r, |d| body.extend_from_slice(d))?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// Host and port of a fake's URL.
pub fn addr(url: &str) -> String {
    url.split("://")
        .nth(1)
        .expect("url has a scheme")
        .to_owned()
}

/// Opens a plain connection with a read timeout.
pub fn connect(url: &str, read_timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr(url))?;
    s.set_read_timeout(Some(read_timeout))?;
    Ok(s)
}

/// One request on a fresh plain connection.
pub fn send(
    url: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
) -> io::Result<Resp> {
    let mut s = connect(url, Duration::from_secs(10))?;
    write_request(&mut s, method, path, bearer, body, false)?;
    read_response(&mut BufReader::new(s))
}

/// A thin agent-shaped wrapper over [`send`].
pub struct Agent {
    pub url: String,
    pub token: String,
}

impl Agent {
    pub fn new(dash: &FakeDashboard) -> Agent {
        Agent {
            url: dash.url(),
            token: SHARED.into(),
        }
    }

    pub fn with_token(dash: &FakeDashboard, token: &str) -> Agent {
        Agent {
            url: dash.url(),
            token: token.into(),
        }
    }

    pub fn post(&self, host: &str, action: &str, body: &Value) -> Resp {
        let bytes = body.to_string();
        send(
            &self.url,
            "POST",
            &format!("/api/hosts/{host}/{action}"),
            Some(&self.token),
            Some(bytes.as_bytes()),
        )
        .expect("request")
    }

    pub fn register(&self, host: &str) -> Resp {
        self.post(host, "register", &register_body(host))
    }

    pub fn poll(&self, host: &str) -> Resp {
        send(
            &self.url,
            "GET",
            &format!("/api/hosts/{host}/poll"),
            Some(&self.token),
            None,
        )
        .expect("request")
    }

    pub fn status(&self, host: &str, body: &Value) -> Resp {
        self.post(host, "status", body)
    }
}

/// A register body like the bash agent sends.
pub fn register_body(host: &str) -> Value {
    serde_json::json!({
        "hostname": host, "host_type": "nixos", "location": "home", "device_type": "server",
        "theme_color": "#769ff0", "criticality": "low",
        "current_generation": "0123456789abcdef0123456789abcdef01234567",
        "config_repo": "/var/lib/nixfleet/repo", "poll_interval": 2, "agent_version": "2.0.0",
        "nixpkgs_version": null, "os_version": "24.11", "os_name": "NixOS"
    })
}

/// Registers twice so the host is "seen" (the first register leaves `last_seen` NULL) and
/// returns the agent that now holds the provisioned token, if any.
pub fn seen_host(dash: &FakeDashboard, host: &str) -> Agent {
    let agent = Agent::new(dash);
    assert_eq!(agent.register(host).status, 200);
    assert_eq!(agent.register(host).status, 200);
    agent
}

/// A rustls client config trusting `ca_pem` (ring provider).
pub fn tls_client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("add root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}
