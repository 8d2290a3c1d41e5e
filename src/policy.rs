//! Authorization: may this caller identity call this local service?

use crate::identity::PeerId;

/// `allow` absent admits any identity of our trust domain; present, only the listed IDs.
pub(crate) fn authorize(allow: Option<&[String]>, trust_domain: &str, caller: &PeerId) -> bool {
    if caller.trust_domain() != trust_domain {
        return false;
    }
    match allow {
        None => true,
        Some(list) => list.iter().any(|a| a == caller.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_and_trust_domains() {
        let web = PeerId::parse("spiffe://quicar.local/web").unwrap();
        let other_td = PeerId::parse("spiffe://elsewhere/web").unwrap();
        assert!(authorize(None, "quicar.local", &web));
        assert!(!authorize(None, "quicar.local", &other_td));
        let list = vec!["spiffe://quicar.local/web".to_string()];
        assert!(authorize(Some(&list), "quicar.local", &web));
        let list = vec!["spiffe://quicar.local/billing".to_string()];
        assert!(!authorize(Some(&list), "quicar.local", &web));
        assert!(!authorize(Some(&[]), "quicar.local", &web));
    }
}
