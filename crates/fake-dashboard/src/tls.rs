//! Throw-away TLS material for `Options::tls`: a CA and a server certificate it signs.
//!
//! A separate CA (rather than one self-signed leaf) is what both OpenSSL-based curl and
//! rustls/webpki accept as `--cacert` / a root; webpki refuses a CA certificate used as the
//! end-entity. The pin (`spki_sha256_base64`) is taken from the *server* certificate's key,
//! which is what `curl --pinnedpubkey sha256//...` compares. Uses the `ring` provider only.

use std::sync::Arc;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// Everything the server and the test need to know about the certificate.
#[derive(Clone)]
pub struct TlsMaterial {
    /// PEM of the CA that signed the server certificate.
    pub ca_pem: String,
    /// DER of the same CA (the v2 impostor client trusts it).
    pub ca_der: Vec<u8>,
    /// base64(sha256(DER SubjectPublicKeyInfo)) of the server certificate.
    pub spki_sha256_base64: String,
    /// Ready-to-use rustls server configuration.
    pub config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("spki_sha256_base64", &self.spki_sha256_base64)
            .finish_non_exhaustive()
    }
}

/// Generates a fresh CA and a server certificate for `127.0.0.1` and `localhost`.
pub fn generate() -> Result<TlsMaterial, Box<dyn std::error::Error + Send + Sync>> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fake-dashboard test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer)?;

    let spki = server_key.subject_public_key_info();
    let spki_sha256_base64 =
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&spki));

    let chain = vec![
        server_cert.der().clone(),
        CertificateDer::from(ca_cert.der().to_vec()),
    ];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().to_vec(),
        spki_sha256_base64,
        config: Arc::new(config),
    })
}
