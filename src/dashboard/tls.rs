//! The rustls client configuration: system roots (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`, as
//! on NixOS), an optional extra CA file, and optional public-key pinning compatible with curl's
//! `--pinnedpubkey sha256//<base64>`.
//!
//! Pinning is checked in addition to normal chain verification, as curl does: a pin never turns
//! an untrusted certificate into a trusted one.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::Settings;

/// Builds the client TLS configuration for `settings` (ring provider, TLS 1.2+).
pub fn client_config(settings: &Settings) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    // Like curl's --cacert (what v1 passes NIXFLEET_CA_FILE to): the CA file *replaces* the
    // system store, so an operator who pins trust to a private CA trusts only that CA.
    if settings.ca_file.is_none() {
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
    }
    if let Some(ca_file) = &settings.ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
            .with_context(|| format!("failed to read ca_file {}", ca_file.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("ca_file {} is not valid PEM", ca_file.display()))?;
        if certs.is_empty() {
            anyhow::bail!(
                "ca_file {} holds no PEM certificate (NIXFLEET_CA_FILE)",
                ca_file.display()
            );
        }
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            anyhow::bail!(
                "ca_file {} holds no usable certificate (NIXFLEET_CA_FILE)",
                ca_file.display()
            );
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol setup")?;
    if roots.is_empty() {
        if settings.url.scheme() == "https" {
            anyhow::bail!(
                "no trusted CA certificates: the system store is empty or missing; set \
                 SSL_CERT_FILE or NIXFLEET_CA_FILE to a PEM bundle"
            );
        }
        // Plain http (explicitly allowed): TLS is never used, but the client needs a config.
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoTrustedRoots(provider)))
            .with_no_client_auth());
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .context("failed to set up certificate verification")?;
    let config = if settings.pinned_pubkeys.is_empty() {
        builder.with_webpki_verifier(webpki).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinningVerifier {
                inner: webpki,
                pins: settings.pinned_pubkeys.clone(),
            }))
            .with_no_client_auth()
    };
    Ok(config)
}

/// Refuses every certificate: used only when there is no trust anchor at all and the URL is
/// plain http, so a redirect to https can never succeed unverified.
#[derive(Debug)]
struct NoTrustedRoots(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoTrustedRoots {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Err(TlsError::General("no trusted CA certificates".into()))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::General("no trusted CA certificates".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::General("no trusted CA certificates".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies the chain like webpki, then requires the leaf's SubjectPublicKeyInfo hash to be
/// one of the pins.
#[derive(Debug)]
struct PinningVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
}

/// SHA-256 of the DER SubjectPublicKeyInfo of a certificate: what curl pins.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(Sha256::digest(parsed.tbs_certificate.subject_pki.raw).into())
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match spki_sha256(end_entity) {
            Some(hash) if self.pins.contains(&hash) => Ok(ServerCertVerified::assertion()),
            _ => Err(TlsError::General(
                "server public key does not match NIXFLEET_PINNED_PUBKEY".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
