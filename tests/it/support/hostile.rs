//! A hostile HTTP/1.1 server on 127.0.0.1 for issue 10's tests: it answers every request with
//! whatever the test's handler says (any status, headers, a huge body, a body trickled one
//! byte at a time) and records what arrived. The fake dashboard is a faithful v1 server; this
//! one is deliberately not.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as the hostile server read it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What to send back.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send the body one byte at a time with this pause between bytes.
    pub trickle: Option<Duration>,
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body,
            trickle: None,
        }
    }
}

type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

pub struct HostileServer {
    port: u16,
    tls: Option<fake_dashboard::tls::TlsMaterial>,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<Mutex<u32>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostileServer {
    pub fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> HostileServer {
        HostileServer::start_with(None, handler)
    }

    /// The same over HTTPS, with a fresh CA (`ca_pem`) and a certificate for 127.0.0.1 and
    /// localhost.
    pub fn start_tls(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> HostileServer {
        let tls = fake_dashboard::tls::generate().expect("TLS material");
        HostileServer::start_with(Some(tls), handler)
    }

    fn start_with(
        tls: Option<fake_dashboard::tls::TlsMaterial>,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> HostileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let (seen, connections, stop) = (seen.clone(), connections.clone(), stop.clone());
            let config = tls.as_ref().map(|t| t.config.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    *connections.lock().unwrap() += 1;
                    let (seen, handler, stop) = (seen.clone(), handler.clone(), stop.clone());
                    let config = config.clone();
                    std::thread::spawn(move || {
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                        match config {
                            None => serve(stream, &seen, &*handler, &stop),
                            Some(config) => {
                                let Ok(conn) = rustls::ServerConnection::new(config) else {
                                    return;
                                };
                                let tls = rustls::StreamOwned::new(conn, stream);
                                serve(tls, &seen, &*handler, &stop);
                            }
                        }
                    });
                }
            })
        };
        HostileServer {
            port,
            tls,
            seen,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// The CA that signed an HTTPS server's certificate.
    pub fn ca_pem(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.ca_pem.clone())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// TCP connections accepted so far (a client that connected but sent nothing counts).
    pub fn connections(&self) -> u32 {
        *self.connections.lock().unwrap()
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    stream: impl std::io::Read + std::io::Write,
    seen: &Mutex<Vec<Seen>>,
    handler: &Handler,
    stop: &AtomicBool,
) {
    let mut reader = BufReader::new(stream);
    {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request = Seen {
            method,
            path,
            headers,
            body,
        };
        seen.lock().unwrap().push(request.clone());
        let reply = handler(&request);
        let mut head = format!("HTTP/1.1 {} Hostile\r\n", reply.status);
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            reply.body.len()
        ));
        let writer = reader.get_mut();
        if writer.write_all(head.as_bytes()).is_err() {
            return;
        }
        match reply.trickle {
            None => {
                let _ = writer.write_all(&reply.body);
            }
            Some(pause) => {
                for byte in &reply.body {
                    if stop.load(Ordering::SeqCst) || writer.write_all(&[*byte]).is_err() {
                        return;
                    }
                    let _ = writer.flush();
                    std::thread::sleep(pause);
                }
            }
        }
        let _ = writer.flush();
    }
}
