//! Integration tests of the fake dashboard over real loopback HTTP.
//!
//! Index:
//! * `util`     – blocking HTTP/1.1 client (plain + rustls) and agent-shaped helpers.
//! * `checks`   – 422 shape, check order (422 → rate limit → 400 → 401), auth and provisioning.
//! * `commands` – single slot, delivery, command_log, status/test-progress semantics, operator API.
//! * `modes`    – Down (same port comes back), Hang, Slow, Garbage, Oversized, Status.
//! * `tls`      – https with the generated CA, SPKI pin matches the served certificate.
//! * `runtimes` – usable from plain tests and both tokio flavours; `wait_for`.
//! * `binary`   – the standalone binary: first line, control API, JSON log lines, SIGTERM.
//! * `v2`       – the v2 (WebSocket) fake through a real tokio-tungstenite client.

mod binary;
mod checks;
mod commands;
mod modes;
mod runtimes;
mod tls;
mod util;
mod v2;
