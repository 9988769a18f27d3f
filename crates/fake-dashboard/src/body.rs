//! Response bodies and the canned responses the fake sends.
//!
//! `RespBody` is either a small in-memory body or a streamed filler that produces N bytes
//! from one static 64 KiB block, so `Mode::Oversized(50 MiB)` never allocates 50 MiB.
//! This module decides byte layout and headers only, never which response a request gets.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

/// The block the filler body is cut from.
static FILL: [u8; 64 * 1024] = [b' '; 64 * 1024];

/// Opening of an oversized body: valid JSON if the client reads all of it.
const FILL_PREFIX: &[u8] = br#"{"status":"registered","command":null,"padding":""#;
/// Closing of an oversized body.
const FILL_SUFFIX: &[u8] = br#""}"#;

/// A response body: whole, or a lazily produced filler.
#[derive(Debug)]
pub enum RespBody {
    /// A complete body; `None` once it has been sent.
    Full {
        /// Remaining data.
        data: Option<Bytes>,
        /// Total length, for `Content-Length`.
        len: u64,
    },
    /// A streamed body of `total` bytes.
    Filler {
        /// Sent first.
        prefix: Option<Bytes>,
        /// Filler bytes still to send.
        remaining: usize,
        /// Sent last.
        suffix: Option<Bytes>,
        /// Whole length; announced as `Content-Length` unless `chunked`.
        total: u64,
        /// Leave the length unannounced (chunked transfer encoding).
        chunked: bool,
    },
}

impl RespBody {
    /// A complete body.
    pub fn full(data: impl Into<Bytes>) -> RespBody {
        let data: Bytes = data.into();
        RespBody::Full {
            len: data.len() as u64,
            data: Some(data),
        }
    }

    /// A body of exactly `total` bytes: a JSON object with one long string when there is room,
    /// plain spaces otherwise.
    pub fn filler(total: usize, chunked: bool) -> RespBody {
        let framing = FILL_PREFIX.len() + FILL_SUFFIX.len();
        let (prefix, suffix, remaining) = if total >= framing {
            (
                Some(Bytes::from_static(FILL_PREFIX)),
                Some(Bytes::from_static(FILL_SUFFIX)),
                total - framing,
            )
        } else {
            (None, None, total)
        };
        RespBody::Filler {
            prefix,
            remaining,
            suffix,
            total: total as u64,
            chunked,
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = match self.get_mut() {
            RespBody::Full { data, .. } => data.take(),
            RespBody::Filler {
                prefix,
                remaining,
                suffix,
                ..
            } => {
                if let Some(p) = prefix.take() {
                    Some(p)
                } else if *remaining > 0 {
                    let n = (*remaining).min(FILL.len());
                    *remaining -= n;
                    Some(Bytes::from_static(&FILL[..n]))
                } else {
                    suffix.take()
                }
            }
        };
        Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full { data, .. } => data.is_none(),
            RespBody::Filler {
                prefix,
                remaining,
                suffix,
                ..
            } => prefix.is_none() && *remaining == 0 && suffix.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full { len, .. } => SizeHint::with_exact(*len),
            RespBody::Filler { chunked: true, .. } => SizeHint::default(),
            RespBody::Filler { total, .. } => SizeHint::with_exact(*total),
        }
    }
}

fn with_type(status: u16, content_type: &'static str, body: RespBody) -> Response<RespBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A JSON response, serialized compactly like Starlette's `JSONResponse`.
pub fn json(status: u16, value: &impl Serialize) -> Response<RespBody> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    with_type(status, "application/json", RespBody::full(bytes))
}

/// `{"detail": "<text>"}`, FastAPI's `HTTPException` body.
pub fn detail(status: u16, text: &str) -> Response<RespBody> {
    json(status, &serde_json::json!({ "detail": text }))
}

/// 500 `text/plain` `Internal Server Error`: what the rate limiter really answers (§1, §8).
pub fn internal_error() -> Response<RespBody> {
    with_type(
        500,
        "text/plain; charset=utf-8",
        RespBody::full("Internal Server Error"),
    )
}

/// `Mode::Garbage`: 200 `application/json` whose body is not JSON.
pub fn garbage() -> Response<RespBody> {
    with_type(
        200,
        "application/json",
        RespBody::full(
            &b"{\"status\":\"registered\",\"command\":<html><body>502 Bad Gateway</body>"[..],
        ),
    )
}

/// `Mode::Oversized`/`OversizedChunked`: 200 `application/json` of `total` bytes.
pub fn oversized(total: usize, chunked: bool) -> Response<RespBody> {
    with_type(200, "application/json", RespBody::filler(total, chunked))
}

/// `Mode::Status`: a plausible body for `status`.
pub fn canned_status(status: u16) -> Response<RespBody> {
    match status {
        500 => internal_error(),
        401 => detail(401, "Invalid API token"),
        503 => detail(503, "Service unhealthy"),
        429 => json(
            429,
            &serde_json::json!({ "error": "Rate limit exceeded: 30 per 1 minute" }),
        ),
        other => {
            let reason = StatusCode::from_u16(other)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error");
            detail(other, reason)
        }
    }
}
