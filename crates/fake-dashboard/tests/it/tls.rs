//! `Options::tls`: https with the generated CA, and the SPKI pin of the served certificate.

use std::io::BufReader;
use std::net::TcpStream;

use base64::Engine as _;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};

use crate::util::{addr, fake_with, read_response, tls_client, write_request};

/// (tag, header length, content length) of the DER element at the start of `b`.
fn tlv(b: &[u8]) -> (u8, usize, usize) {
    let first = b[1];
    if first < 0x80 {
        return (b[0], 2, first as usize);
    }
    let n = (first & 0x7f) as usize;
    let len = b[2..2 + n]
        .iter()
        .fold(0usize, |acc, x| (acc << 8) | *x as usize);
    (b[0], 2 + n, len)
}

/// The DER SubjectPublicKeyInfo inside a certificate.
fn spki(cert: &[u8]) -> &[u8] {
    let (_, h, _) = tlv(cert);
    let tbs = &cert[h..];
    let (_, th, tl) = tlv(tbs);
    let mut rest = &tbs[th..th + tl];
    if rest[0] == 0xa0 {
        let (_, h, l) = tlv(rest);
        rest = &rest[h + l..];
    }
    // serialNumber, signature, issuer, validity, subject
    for _ in 0..5 {
        let (_, h, l) = tlv(rest);
        rest = &rest[h + l..];
    }
    let (tag, h, l) = tlv(rest);
    assert_eq!(tag, 0x30);
    &rest[..h + l]
}

#[test]
fn https_with_the_generated_ca_and_matching_pin() {
    let dash = fake_with(|o| o.tls = true);
    assert!(dash.url().starts_with("https://127.0.0.1:"));
    let ca = dash.ca_pem().unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));

    for name in ["127.0.0.1", "localhost"] {
        let conn = rustls::ClientConnection::new(
            tls_client(&ca),
            ServerName::try_from(name).unwrap().to_owned(),
        )
        .unwrap();
        let tcp = TcpStream::connect(addr(&dash.url())).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        write_request(&mut tls, "GET", "/health", None, None, false).unwrap();
        let mut reader = BufReader::new(tls);
        let r = read_response(&mut reader).unwrap();
        assert_eq!(r.status, 200, "{name}");

        let certs = reader.get_ref().conn.peer_certificates().unwrap();
        let digest = Sha256::digest(spki(&certs[0]));
        let pin = base64::engine::general_purpose::STANDARD.encode(digest);
        assert_eq!(Some(pin), dash.spki_sha256_base64());
    }
    let plain = fake_with(|_| {});
    assert_eq!((plain.ca_pem(), plain.spki_sha256_base64()), (None, None));
}
