//! `fake-dashboard`: the fake as a process, for shell-driven tests (e.g. inside a container).
//!
//! Prints exactly one line, `listening url=<url> control=http://127.0.0.1:<port>`, then one
//! JSON line per answered agent request (`method`, `path`, `host_id`, `status`, `body`), or
//! with `--protocol v2` one per WebSocket frame (`conn`, `dir`, `kind`, `type`, `host`,
//! `len`, `payload`, `close_code`). The control API (`fake_dashboard::control`, or
//! `fake_dashboard::v2::control`) is on its own port. SIGTERM/SIGINT stop it cleanly with
//! exit code 0. Exit codes: 0 clean stop, 1 runtime failure (e.g. bind), 2 usage.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use fake_dashboard::v2::{FakeV2, Frame, V2Options};
use fake_dashboard::{FakeDashboard, Options, RecordedRequest};
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: fake-dashboard [--protocol v1|v2] [--bind ADDR] [--port N] [--control-port N] [--tls] \
                     [--shared-token T] [v1: --no-provision --no-shared --rate-limit] \
                     [v2: --lifecycle --ping-interval-ms N --reconnect-window-ms N]";

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
    /// `--protocol v2`: serve the WebSocket fake.
    v2: bool,
    lifecycle: bool,
    ping_interval_ms: Option<u64>,
    reconnect_window_ms: Option<u64>,
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
            "--protocol" => {
                args.v2 = match value("--protocol")?.as_str() {
                    "v1" => false,
                    "v2" => true,
                    other => return Err(format!("--protocol must be v1 or v2, not {other:?}")),
                }
            }
            "--lifecycle" => args.lifecycle = true,
            "--ping-interval-ms" => {
                args.ping_interval_ms = Some(parse_ms(
                    "--ping-interval-ms",
                    &value("--ping-interval-ms")?,
                )?)
            }
            "--reconnect-window-ms" => {
                args.reconnect_window_ms = Some(parse_ms(
                    "--reconnect-window-ms",
                    &value("--reconnect-window-ms")?,
                )?)
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.v2 && (args.no_provision || args.no_shared || args.rate_limit) {
        return Err(
            "--no-provision, --no-shared and --rate-limit only apply to --protocol v1".into(),
        );
    }
    if !args.v2
        && (args.lifecycle || args.ping_interval_ms.is_some() || args.reconnect_window_ms.is_some())
    {
        return Err(
            "--lifecycle, --ping-interval-ms and --reconnect-window-ms need --protocol v2".into(),
        );
    }
    Ok(Some(args))
}

fn parse_ms(flag: &str, s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{flag} needs a positive number of milliseconds, not {s:?}"
        )),
    }
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

fn log_frame(f: &Frame) {
    let line = serde_json::json!({
        "conn": f.conn, "dir": f.dir, "kind": f.kind, "type": f.msg_type, "host": f.host,
        "len": f.raw_len, "payload": f.payload, "close_code": f.close_code, "ignored": f.ignored,
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run_v2(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let defaults = V2Options::default();
    let opts = V2Options {
        token: args.shared_token.unwrap_or(defaults.token.clone()),
        tls: args.tls,
        bind: args.bind.unwrap_or(defaults.bind),
        port: args.port,
        lifecycle: args.lifecycle,
        ping_interval: args
            .ping_interval_ms
            .map_or(defaults.ping_interval, std::time::Duration::from_millis),
        reconnect_window: args
            .reconnect_window_ms
            .map_or(defaults.reconnect_window, std::time::Duration::from_millis),
        on_frame: Some(Arc::new(log_frame)),
        ..defaults
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fake = Arc::new(FakeV2::try_start(opts)?);
    let result = rt.block_on(async {
        let control = tokio::net::TcpListener::bind(("127.0.0.1", args.control_port)).await?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "listening url={} control=http://127.0.0.1:{}",
                fake.url(),
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
        fake_dashboard::v2::control::serve(fake.clone(), control, stop).await;
        Ok::<_, std::io::Error>(())
    });
    fake.stop();
    Ok(result?)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.v2 {
        return run_v2(args);
    }
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
