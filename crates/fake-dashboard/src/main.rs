//! `fake-dashboard`: the fake as a process, for shell-driven tests (e.g. inside a container).
//!
//! Prints exactly one line, `listening url=<url> control=http://127.0.0.1:<port>`, then one
//! JSON line per answered agent request (`method`, `path`, `host_id`, `status`, `body`).
//! The control API (`fake_dashboard::control`) is on its own port. SIGTERM/SIGINT stop it
//! cleanly with exit code 0. Exit codes: 0 clean stop, 1 runtime failure (e.g. bind), 2 usage.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use fake_dashboard::{FakeDashboard, Options, RecordedRequest};
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: fake-dashboard [--bind ADDR] [--port N] [--control-port N] [--tls] [--shared-token T] \
                     [--no-provision] [--no-shared] [--rate-limit]";

/// Parsed command line.
#[derive(Debug, Default)]
struct Args {
    bind: Option<std::net::IpAddr>,
    port: u16,
    control_port: u16,
    tls: bool,
    shared_token: Option<String>,
    no_provision: bool,
    no_shared: bool,
    rate_limit: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args::default();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--bind" => {
                let text = value("--bind")?;
                args.bind = Some(
                    text.parse()
                        .map_err(|_| format!("{text:?} is not an IP address"))?,
                );
            }
            "--port" => args.port = parse_port(&value("--port")?)?,
            "--control-port" => args.control_port = parse_port(&value("--control-port")?)?,
            "--tls" => args.tls = true,
            "--shared-token" => args.shared_token = Some(value("--shared-token")?),
            "--no-provision" => args.no_provision = true,
            "--no-shared" => args.no_shared = true,
            "--rate-limit" => args.rate_limit = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(args))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("{s:?} is not a port number"))
}

fn log_line(r: &RecordedRequest) {
    let line = serde_json::json!({
        "method": r.method, "path": r.path, "host_id": r.host_id,
        "status": r.response_status, "body": r.body,
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let defaults = Options::default();
    let opts = Options {
        shared_token: args.shared_token.or(defaults.shared_token),
        allow_shared: !args.no_shared,
        provision_tokens: !args.no_provision,
        tls: args.tls,
        rate_limit: args.rate_limit,
        bind: args.bind.unwrap_or(defaults.bind),
        port: args.port,
        on_request: Some(Arc::new(log_line)),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dash = FakeDashboard::try_start(opts)?;
    let result = rt.block_on(async {
        let control = tokio::net::TcpListener::bind(("127.0.0.1", args.control_port)).await?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "listening url={} control=http://127.0.0.1:{}",
                dash.url(),
                control.local_addr()?.port()
            )?;
            out.flush()?;
        }
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        fake_dashboard::control::serve(dash.clone(), control, stop).await;
        Ok::<_, std::io::Error>(())
    });
    dash.stop();
    Ok(result?)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fake-dashboard: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-dashboard: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn bind_address_is_parsed_and_checked() {
        let args = parse(&["--bind", "0.0.0.0", "--port", "8000"])
            .unwrap()
            .unwrap();
        assert_eq!(args.bind, Some("0.0.0.0".parse().unwrap()));
        assert_eq!(args.port, 8000);
        assert_eq!(parse(&[]).unwrap().unwrap().bind, None);
        let err = parse(&["--bind", "dashboard"]).err().unwrap();
        assert!(err.contains("not an IP address"), "{err}");
        assert!(parse(&["--bind"]).is_err());
    }

    #[test]
    fn serves_on_all_addresses_when_bound_to_0_0_0_0() {
        let dash = FakeDashboard::try_start(Options {
            bind: "0.0.0.0".parse().unwrap(),
            ..Options::default()
        })
        .unwrap();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", dash.port())).unwrap();
        use std::io::Read as _;
        write!(
            stream,
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("healthy"), "{reply}");
        dash.stop();
    }
}
