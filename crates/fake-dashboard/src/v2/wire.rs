//! The server side of RFC 6455 framing, written out so the fake controls every frame.
//!
//! A general WebSocket library answers Pings by itself, hides continuation frames and enforces
//! size limits without the close code gorilla sends; the fake must be able to withhold Pongs,
//! count a message across its fragments, refuse an oversized message from its *header* (as
//! gorilla does, without reading the body) and send an empty-payload close frame. So this
//! module only reads and writes frames; what to do with them is `server`'s business. It never
//! looks at message contents.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Frame opcodes (RFC 6455 §5.2).
pub(crate) const OP_CONT: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub fin: bool,
    /// The three reserved bits; no extension is negotiated, so anything but 0 is an error.
    pub rsv: u8,
    pub opcode: u8,
    /// The client's masking key; `None` when the peer (wrongly) sent an unmasked frame.
    pub mask: Option<[u8; 4]>,
    pub len: u64,
}

impl Header {
    /// Control frames have the high opcode bit set.
    pub(crate) fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Reads one frame header. `Ok(None)` means the peer closed the stream cleanly before the
/// first byte of a frame.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Header>> {
    let mut two = [0u8; 2];
    match r.read(&mut two[..1]).await? {
        0 => return Ok(None),
        _ => r.read_exact(&mut two[1..]).await?,
    };
    let fin = two[0] & 0x80 != 0;
    let rsv = (two[0] >> 4) & 0x7;
    let opcode = two[0] & 0x0F;
    let masked = two[1] & 0x80 != 0;
    let len = match two[1] & 0x7F {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    let mask = if masked {
        let mut key = [0u8; 4];
        r.read_exact(&mut key).await?;
        Some(key)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        rsv,
        opcode,
        mask,
        len,
    }))
}

/// Reads and unmasks the payload of `h`. The caller has already checked `h.len` against its
/// limit, so the allocation is bounded.
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    h: &Header,
) -> io::Result<Vec<u8>> {
    let len = usize::try_from(h.len).map_err(|_| io::Error::other("frame length overflows"))?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    if let Some(key) = h.mask {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Ok(buf)
}

/// Encodes one unmasked (server → client) frame.
pub(crate) fn encode(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = head(opcode, fin, payload.len(), false);
    out.extend_from_slice(payload);
    out
}

/// Encodes one masked (client → server) frame; the impostor and tests use it.
pub(crate) fn encode_masked(opcode: u8, fin: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = head(opcode, fin, payload.len(), true);
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// First byte, length byte and extended length of a frame header.
fn head(opcode: u8, fin: bool, len: usize, masked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let mask_bit = if masked { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out
}

/// The payload of a close frame: empty for `None` (the peer then reports 1005), else the
/// big-endian code followed by the reason.
pub(crate) fn close_payload(code: Option<u16>, reason: &str) -> Vec<u8> {
    match code {
        None => Vec::new(),
        Some(c) => {
            let mut p = c.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            p
        }
    }
}

/// Splits a received close payload into code and reason (`None` for an empty payload; a
/// one-byte payload is a protocol error the caller treats like an empty one).
pub(crate) fn parse_close(payload: &[u8]) -> (Option<u16>, String) {
    if payload.len() < 2 {
        return (None, String::new());
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    (
        Some(code),
        String::from_utf8_lossy(&payload[2..]).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn roundtrip(frame: Vec<u8>) -> (Header, Vec<u8>) {
        let mut r = &frame[..];
        let h = read_header(&mut r).await.unwrap().unwrap();
        let p = read_payload(&mut r, &h).await.unwrap();
        assert!(r.is_empty(), "whole frame consumed");
        (h, p)
    }

    #[tokio::test]
    async fn masked_frames_of_every_length_format_decode() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 300_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let (h, p) = roundtrip(encode_masked(OP_TEXT, true, &payload, [1, 2, 3, 4])).await;
            assert_eq!(
                (h.fin, h.opcode, h.len, h.rsv),
                (true, OP_TEXT, len as u64, 0)
            );
            assert_eq!(h.mask, Some([1, 2, 3, 4]));
            assert_eq!(p, payload, "len {len}");
        }
    }

    #[tokio::test]
    async fn unmasked_server_frames_decode_without_a_mask() {
        let (h, p) = roundtrip(encode(OP_PING, true, b"hi")).await;
        assert_eq!(
            (h.opcode, h.mask, p.as_slice()),
            (OP_PING, None, &b"hi"[..])
        );
        assert!(h.is_control());
        let (h, _) = roundtrip(encode(OP_CONT, false, b"x")).await;
        assert!(!h.fin && !h.is_control());
    }

    #[tokio::test]
    async fn clean_eof_before_a_frame_is_none_and_a_cut_header_is_an_error() {
        let mut empty: &[u8] = &[];
        assert!(read_header(&mut empty).await.unwrap().is_none());
        let mut cut: &[u8] = &[0x81];
        assert!(read_header(&mut cut).await.is_err());
    }

    #[test]
    fn close_payloads() {
        assert!(close_payload(None, "ignored").is_empty());
        assert_eq!(close_payload(Some(1009), ""), vec![0x03, 0xF1]);
        assert_eq!(
            parse_close(&close_payload(Some(1000), "shutdown")),
            (Some(1000), "shutdown".into())
        );
        assert_eq!(parse_close(&[]), (None, String::new()));
    }
}
