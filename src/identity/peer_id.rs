//! A workload's identity as a type: a SPIFFE ID, parsed once (from config or a certificate's
//! URI SAN) and compared as a whole. A leaf, so config, discovery and identity can all use it.

use std::fmt;

/// Why a string or a certificate does not give a SPIFFE ID.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdError {
    #[error("`{0}` is not a SPIFFE ID (want spiffe://<trust-domain>/<path>)")]
    NotSpiffe(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeSan,
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
}

/// A SPIFFE ID, `spiffe://<trust-domain>/<path>`, parsed once and compared as a whole. Shared,
/// so a copy (a pool or balancer key, a request's record) costs no allocation. It carries its
/// own header value too, made once per connection, not once per request handed to the app.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    id: std::sync::Arc<str>,
    /// The same text as `id` (a SPIFFE ID is visible ASCII), for `quicar-peer-identity`.
    header: http::HeaderValue,
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PeerId").field(&&*self.id).finish()
    }
}

impl PeerId {
    pub fn parse(s: &str) -> Result<Self, PeerIdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| PeerIdError::NotSpiffe(s.into()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| PeerIdError::NotSpiffe(s.into()))?;
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let path_ok = !path.is_empty()
            && !path.ends_with('/')
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b));
        match http::HeaderValue::from_str(s) {
            Ok(header) if td_ok && path_ok => Ok(Self {
                id: s.into(),
                header,
            }),
            _ => Err(PeerIdError::NotSpiffe(s.into())),
        }
    }

    /// The conventional identity of a sidecar fronting `service`. Config has checked both
    /// names (trust domain and service name characters), so the result parses.
    pub fn for_service(trust_domain: &str, service: &str) -> Self {
        Self::parse(&format!("spiffe://{trust_domain}/{service}"))
            .expect("config checks trust domains and service names")
    }

    /// The ID as a header value (`quicar-peer-identity`): a reference count, no copy.
    pub fn header_ref(&self) -> &http::HeaderValue {
        &self.header
    }

    pub fn trust_domain(&self) -> &str {
        let rest = &self.id["spiffe://".len()..];
        // A byte search: `split_once` with a char pattern costs a few hundred instructions,
        // and every request from a peer asks (policy).
        rest.as_bytes()
            .iter()
            .position(|&b| b == b'/')
            .map_or(rest, |slash| &rest[..slash])
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The SPIFFE ID in a certificate's URI SAN (the first `spiffe://` URI; SPIFFE allows one).
    pub fn from_cert(der: &[u8]) -> Result<Self, PeerIdError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PeerIdError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| PeerIdError::BadCertificate(e.to_string()))?
            .ok_or(PeerIdError::NoSpiffeSan)?;
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    return Self::parse(uri);
                }
            }
        }
        Err(PeerIdError::NoSpiffeSan)
    }
}

impl serde::Serialize for PeerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_strictly() {
        let id = PeerId::parse("spiffe://quicar.local/orders").unwrap();
        assert_eq!(id.trust_domain(), "quicar.local");
        for bad in [
            "http://quicar.local/orders",
            "spiffe://quicar.local",
            "spiffe://quicar.local/",
            "spiffe:///orders",
            "spiffe://Quicar/orders",
            "spiffe://td/a b",
        ] {
            assert!(PeerId::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
