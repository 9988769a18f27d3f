//! The v2 (WebSocket) fake, driven by a real tokio-tungstenite client over loopback.
//!
//! * `binary`    – `fake-dashboard --protocol v2` and its control API.
//! * `handshake` – §2.3 answers in order (404/302, 401, 400, 403), recorded headers, TLS.
//! * `session`   – register/registered and the §5.2 row, displacement with an empty close
//!   frame, Ping/Pong, read deadline, 1009 across fragments, ignored messages, drops, down.
//! * `lifecycle` – §7.2 transitions: deferred completion, AWAITING_RECONNECT, ERROR, refusals.

mod binary;
mod handshake;
mod lifecycle;
mod session;
mod util;
