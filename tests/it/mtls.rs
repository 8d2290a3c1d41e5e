//! Mutual TLS and policy: who may connect, who may call what, and rotation without restart.

use std::sync::Arc;

use http::StatusCode;
use quicar::identity::PeerId;
use quicar::pki::Ca;

use crate::support::*;

/// A client sidecar whose identity files are given explicitly (to mix CAs and validity).
async fn client_with_identity(
    pki: &Pki,
    identity_toml: &str,
    peer: std::net::SocketAddr,
    extra: &str,
) -> quicar::app::Bound {
    let toml = format!(
        "{identity_toml}\n[outbound]\nlisten = \"127.0.0.1:0\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"hello\"\nconnect_timeout = \"1s\"\nendpoints = [{{ address = \"{peer}\" }}]\n{extra}\n"
    );
    sidecar(pki, &toml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let pair = Pair::start().await;
    // A bare QUIC client that trusts the CA but presents no certificate.
    let material = pair.pki.material("web");
    let mut tls = rustls::ClientConfig::builder_with_provider(quicar::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(material.roots.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    // Leaf certificates carry the service name as a DNS SAN too, so this stock verifier
    // accepts the server: the refusal can only come from the server.
    // In TLS 1.3 the client finishes its side of the handshake before the server has judged
    // its (missing) certificate, so the refusal may arrive just after "connected".
    let refusal = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        match endpoint
            .connect(pair.server.inbound, "hello")
            .unwrap()
            .await
        {
            Err(e) => e,
            Ok(conn) => conn.closed().await,
        }
    })
    .await
    .expect("the server closes the connection");
    // TLS alert 116 is certificate_required.
    let text = refusal.to_string();
    assert!(text.contains("116"), "refusal should say why: {text}");
    assert_eq!(pair.upstream.count(), 0);
}

crate::over_transports! {
    async fn a_client_from_another_ca_is_refused(t) {
        let pair = Pair::over(t).await;
        // Its own certificate comes from a foreign CA, though it trusts the server's CA: only the
        // server's check can stop it.
        let foreign = Ca::generate("quicar.local").unwrap();
        foreign
            .issue("web")
            .unwrap()
            .write(pair.pki.path(), "foreign-web")
            .unwrap();
        let id = "[identity]\ncert = \"foreign-web.crt\"\nkey = \"foreign-web.key\"\nca = \"ca.crt\"\n";
        let client = client_with_identity(&pair.pki, id, pair.server.inbound, &format!("transport = \"{t}\"")).await;
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.error_kind(), Some("connect-failed"));
        // A cold burst from another such client (on HTTP/2 it waits for the peer's SETTINGS,
        // which never come): each request fails as connect-failed. (The text is not checked:
        // on HTTP/2 a request races between the peer's alert and a broken pipe.)
        let cold = client_with_identity(&pair.pki, id, pair.server.inbound, &format!("transport = \"{t}\"")).await;
        let out = cold.outbound;
        let burst: Vec<_> = (0..10).map(|_| tokio::spawn(async move { get(out, "hello", "/").await })).collect();
        for got in futures_util::future::join_all(burst).await {
            let got = got.unwrap();
            assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
        }
        assert_eq!(pair.upstream.count(), 0);
    }

    async fn an_expired_client_certificate_is_refused(t) {
        let pair = Pair::over(t).await;
        let now = time::OffsetDateTime::now_utc();
        pair.pki
            .ca
            .issue_between(
                "web",
                now - time::Duration::days(30),
                now - time::Duration::days(1),
            )
            .unwrap()
            .write(pair.pki.path(), "expired-web")
            .unwrap();
        let id = "[identity]\ncert = \"expired-web.crt\"\nkey = \"expired-web.key\"\nca = \"ca.crt\"\n";
        let client = client_with_identity(&pair.pki, id, pair.server.inbound, &format!("transport = \"{t}\"")).await;
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.error_kind(), Some("connect-failed"));
        assert!(
            String::from_utf8_lossy(&got.body).contains("handshake"),
            "{:?}",
            got.body
        );
        assert_eq!(pair.upstream.count(), 0);
    }

    async fn a_server_with_the_wrong_identity_is_refused_as_identity_mismatch(t) {
        let pair = Pair::over(t).await;
        // The client expects `payments` at the server's address; the server proves `hello`.
        let toml = client_toml(&pair.pki, &[pair.server.inbound], &format!("transport = \"{t}\"")).replace(
            &format!("{{ address = \"{}\" }}", pair.server.inbound),
            &format!(
                "{{ address = \"{}\", identity = \"spiffe://quicar.local/payments\" }}",
                pair.server.inbound
            ),
        );
        let client = sidecar(&pair.pki, &toml).await;
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.error_kind(), Some("identity-mismatch"));
        let body = String::from_utf8_lossy(&got.body);
        assert!(
            body.contains("spiffe://quicar.local/hello")
                && body.contains("spiffe://quicar.local/payments"),
            "{body}"
        );
        assert_eq!(pair.upstream.count(), 0);
    }

    async fn policy_allows_listed_identities_and_denies_others(t) {
        let allowed = Pair::over_with(t, "", "allow = [\"spiffe://quicar.local/web\"]").await;
        assert_eq!(
            get(allowed.out(), "hello", "/").await.status,
            StatusCode::OK
        );
        assert_eq!(
            values(&allowed.upstream.last().headers, "quicar-peer-identity"),
            vec!["spiffe://quicar.local/web"]
        );

        let denied = Pair::over_with(t, "", "allow = [\"spiffe://quicar.local/ops\"]").await;
        let got = get(denied.out(), "hello", "/").await;
        assert_eq!(got.status, StatusCode::FORBIDDEN);
        assert_eq!(got.error_kind(), Some("denied"));
        assert!(String::from_utf8_lossy(&got.body).contains("spiffe://quicar.local/web"));
        assert_eq!(denied.upstream.count(), 0);
    }

    async fn rotated_certificate_files_are_used_without_restart(t) {
        let pair = Pair::over(t).await;
        assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
        // Rotate the server's files to a certificate for another identity, so the change is
        // visible from outside: new handshakes must present it.
        pair.pki
            .ca
            .issue("hello-v2")
            .unwrap()
            .write(pair.pki.path(), "hello")
            .unwrap();
        let expected = PeerId::parse("spiffe://quicar.local/hello-v2").unwrap();
        let mut reloaded = false;
        for _ in 0..100 {
            if pair.server.identity.borrow().id == expected {
                reloaded = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(reloaded, "the server never reloaded its certificate");
        // The live connection carries on.
        assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
        assert_eq!(pair.client.connections_opened(wire(t)), 1);
        // A new client's handshake sees the new certificate.
        let client = sidecar(
            &pair.pki,
            &client_toml(&pair.pki, &[pair.server.inbound], &format!("transport = \"{t}\"")),
        )
        .await;
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.error_kind(), Some("identity-mismatch"));
        assert!(String::from_utf8_lossy(&got.body).contains("hello-v2"));
    }
}
