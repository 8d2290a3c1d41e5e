//! A small certificate authority for development and tests (rcgen): a CA, and leaf
//! certificates whose URI SAN is the workload's SPIFFE ID, valid for server and client auth.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Why a CA or certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A CA held in memory: PEM of its certificate and key.
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    pub trust_domain: String,
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A new CA valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("quicar dev CA ({trust_domain})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Issues `spiffe://<trust-domain>/<service>`, valid from `not_before` to `not_after`.
    pub fn issue_between(
        &self,
        service: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Leaf, PkiError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, service);
        let uri = format!("spiffe://{}/{service}", self.trust_domain);
        let invalid = |e: rcgen::Error| PkiError::Invalid(format!("`{service}`: {e}"));
        // The SPIFFE ID is the identity; the DNS name only helps stock TLS tools (curl, openssl).
        params.subject_alt_names = vec![
            SanType::URI(uri.try_into().map_err(invalid)?),
            SanType::DnsName(service.to_string().try_into().map_err(invalid)?),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a leaf valid for one year from now.
    pub fn issue(&self, service: &str) -> Result<Leaf, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(service, now - Duration::hours(1), now + Duration::days(365))
    }

    /// Reads `ca.crt` and `ca.key` from `dir`; leaves it issues get `trust_domain`.
    pub fn read(dir: &Path, trust_domain: &str) -> Result<Self, PkiError> {
        Ok(Self {
            cert_pem: read(&dir.join("ca.crt"))?,
            key_pem: read(&dir.join("ca.key"))?,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Writes `ca.crt` and `ca.key` into `dir` (the key with mode 0600).
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        write(&dir.join("ca.crt"), &self.cert_pem, false)?;
        write(&dir.join("ca.key"), &self.key_pem, true)
    }
}

impl Leaf {
    /// Writes `<name>.crt` and `<name>.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        write(&crt, &self.cert_pem, false)?;
        write(&key, &self.key_pem, true)?;
        Ok((crt, key))
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a watcher never sees half a PEM.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
