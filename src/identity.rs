//! Workload identity: SPIFFE IDs read from certificates, the TLS configs that enforce mutual
//! TLS 1.3 between sidecars, and the watcher that swaps in rotated certificate files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::sync::watch;

use crate::config::IdentityFiles;

pub(crate) mod peer_id;
pub use peer_id::{PeerId, PeerIdError};

/// Why an identity could not be loaded or a peer's could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: String, what: String },
    #[error(transparent)]
    PeerId(#[from] PeerIdError),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// The one crypto provider for rustls and quinn: ring. It builds with a C compiler only (no
/// cmake/nasm as aws-lc-rs wants), which keeps clean builds short on small CI machines, and it
/// has every TLS 1.3 suite and key type we issue (ECDSA P-256).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This sidecar's certificate chain, key and trust roots, loaded from PEM files.
#[derive(Debug)]
pub struct Material {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    pub id: PeerId,
}

impl Material {
    pub fn load(files: &IdentityFiles) -> Result<Self, IdentityError> {
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, e))?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca)? {
            roots.add(ca).map_err(|e| IdentityError::Pem {
                path: files.ca.display().to_string(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let id = PeerId::from_cert(&chain[0]).map_err(|e| IdentityError::Pem {
            path: files.cert.display().to_string(),
            what: e.to_string(),
        })?;
        let material = Self {
            chain,
            key,
            roots: Arc::new(roots),
            id,
        };
        // Catch a key that does not match the certificate now, not at the first handshake.
        material.server_config(vec![])?;
        Ok(material)
    }

    /// TLS 1.3 only, client certificate from our CA required.
    pub fn server_config(&self, alpn: Vec<Vec<u8>>) -> Result<rustls::ServerConfig, IdentityError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn;
        config.max_early_data_size = 0;
        Ok(config)
    }

    /// TLS 1.3 client that presents our certificate and accepts only `expected` from our CA.
    /// A presented identity that differs is recorded in `mismatch` so the caller can say so.
    pub fn client_config(
        &self,
        expected: PeerId,
        mismatch: Arc<Mutex<Option<String>>>,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ClientConfig, IdentityError> {
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.clone(),
            provider: provider(),
            expected,
            mismatch,
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn;
        Ok(config)
    }

    /// A key for QUIC stateless resets derived from our private key, so that after a crash and
    /// restart this sidecar can still reset the connections its previous run had: peers learn at
    /// once that the connection is gone instead of waiting for the idle timeout.
    pub fn reset_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            self.derive(b"quicar stateless reset v1").as_ref(),
        )
    }

    /// The key quinn signs its connection IDs with, derived like `reset_key`: a restarted
    /// sidecar must recognise its predecessor's connection IDs as its own, or it drops their
    /// packets silently instead of answering with a stateless reset.
    pub fn cid_key(&self) -> u64 {
        let d = self.derive(b"quicar connection id v1");
        u64::from_le_bytes(d.as_ref()[..8].try_into().expect("SHA-256 is 32 bytes"))
    }

    fn derive(&self, label: &[u8]) -> ring::digest::Digest {
        ring::digest::digest(
            &ring::digest::SHA256,
            &[label, self.key.secret_der()].concat(),
        )
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(IdentityError::Pem {
            path: path.display().to_string(),
            what: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> IdentityError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => IdentityError::Read {
            path: path.display().to_string(),
            source,
        },
        other => IdentityError::Pem {
            path: path.display().to_string(),
            what: format!("{other:?}"),
        },
    }
}

/// Verifies the server's chain against our CA (expiry, signature, server-auth usage) and then
/// that its SPIFFE ID is the one discovery expects for this endpoint. DNS names play no part.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: PeerId,
    mismatch: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = PeerId::from_cert(end_entity).map_err(|e| {
            *self.mismatch.lock().expect("not poisoned") = Some(e.to_string());
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        })?;
        if presented != self.expected {
            *self.mismatch.lock().expect("not poisoned") = Some(presented.to_string());
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The current identity, swapped when the files change. Readers take the latest snapshot per
/// handshake, so live connections keep their keys and new ones get the rotated ones.
pub type IdentityRx = watch::Receiver<Arc<Material>>;

/// Watches the identity files by modification time and publishes each good reload. A reload
/// that fails (half-written file, key not matching) keeps the previous identity and logs why.
pub fn watch_files(
    files: IdentityFiles,
    tx: watch::Sender<Arc<Material>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let paths: Vec<PathBuf> = vec![files.cert.clone(), files.key.clone(), files.ca.clone()];
    tokio::spawn(async move {
        let mut last = stamps(&paths);
        let mut tick = tokio::time::interval(files.reload_interval.max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = stamps(&paths);
            if now == last {
                continue;
            }
            last = now;
            match Material::load(&files) {
                Ok(m) => {
                    tracing::info!(identity = %m.id, "identity files changed; new handshakes use the reloaded certificate");
                    tx.send_replace(Arc::new(m));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "identity files changed but cannot be loaded; keeping the previous identity")
                }
            }
        }
    })
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// The SPIFFE ID of the peer of a finished handshake, from its leaf certificate.
pub fn peer_of(certs: Option<&[CertificateDer<'static>]>) -> Result<PeerId, IdentityError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(PeerIdError::NoSpiffeSan)?;
    Ok(PeerId::from_cert(leaf)?)
}
