//! DNS SRV discovery against real DNS servers on loopback: dnsmasq for static records, Knot DNS
//! with `knsupdate` for records that change while traffic flows.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;

use crate::support::*;

/// A DNS server process, killed (by PID) when dropped.
pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a DNS server on a port that was free a moment ago. Other tests bind UDP ports all the
/// time, so the port may be taken by then: a server that exits at once is started again on
/// another port (bounded).
fn start_dns(mut spawn: impl FnMut(u16) -> Child) -> (Server, u16) {
    for _ in 0..10 {
        let port = free_udp_port();
        let mut child = spawn(port);
        std::thread::sleep(Duration::from_millis(300));
        match child.try_wait() {
            Ok(None) => return (Server(child), port),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    panic!("the DNS server would not start on any port");
}

/// dnsmasq answering one SRV record (`--srv-host`) and the A record of its target
/// (`--host-record`), on a port of its own; stopped when the `Server` drops.
pub(crate) fn dnsmasq(srv_host: &str, host_record: &str) -> (Server, u16) {
    start_dns(|port| {
        Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file=",
                &format!("--port={port}"),
                &format!("--srv-host={srv_host}"),
                &format!("--host-record={host_record}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq is installed (.ci/run installs dnsmasq-base)")
    })
}

fn client_with_dns(pki: &Pki, dns: SocketAddr, name: &str) -> String {
    client_toml(
        pki,
        &[],
        &format!("discovery = {{ dns = \"{name}\", server = \"{dns}\", interval = \"100ms\", max_interval = \"1s\" }}"),
    )
    .replace("endpoints = []\n", "")
}

/// Sends requests until one succeeds (the first lookup and the DNS server's start take a
/// moment), bounded.
async fn first_ok(out: SocketAddr) {
    for _ in 0..100 {
        if get(out, "hello", "/").await.status == StatusCode::OK {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no request succeeded through DNS discovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs dnsmasq: apt-get install dnsmasq-base"]
async fn srv_records_from_dnsmasq_become_endpoints() {
    init_tracing();
    let pki = Pki::new();
    let app = Upstream::start().await;
    let server = sidecar(&pki, &server_toml(&pki, app.addr, "127.0.0.1:0", "")).await;
    let (dnsmasq, port) = dnsmasq(
        &format!(
            "_hello._udp.mesh.test,node-b.mesh.test,{},0,1",
            server.inbound.port()
        ),
        "node-b.mesh.test,127.0.0.1",
    );
    let dns: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = sidecar(&pki, &client_with_dns(&pki, dns, "_hello._udp.mesh.test.")).await;
    first_ok(client.outbound).await;
    let eps: serde_json::Value =
        serde_json::from_slice(&get(client.admin, "admin", "/endpoints").await.body).unwrap();
    let ep = &eps[0]["endpoints"][0];
    assert_eq!(ep["address"], server.inbound.to_string());
    assert_eq!(ep["identity"], "spiffe://quicar.local/hello");
    drop(dnsmasq);
}

fn knot(dir: &Path, port: u16, srv_port: u16) -> Child {
    std::fs::write(
        dir.join("mesh.test.zone"),
        format!(
            "$ORIGIN mesh.test.\n$TTL 1\n\
             @ SOA ns.mesh.test. admin.mesh.test. 1 60 60 3600 1\n\
             @ NS ns\nns A 127.0.0.1\na A 127.0.0.1\nb A 127.0.0.1\n\
             _hello._udp SRV 0 1 {srv_port} a\n"
        ),
    )
    .unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n    rundir: \"{d}\"\n    listen: 127.0.0.1@{port}\n\
             database:\n    storage: \"{d}\"\n\
             log:\n  - target: stderr\n    any: warning\n\
             acl:\n  - id: local_update\n    address: 127.0.0.1\n    action: update\n\
             zone:\n  - domain: mesh.test.\n    storage: \"{d}\"\n    file: \"mesh.test.zone\"\n    acl: local_update\n"
        ),
    )
    .unwrap();
    Command::new("knotd")
        .arg("-c")
        .arg(dir.join("knot.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("knotd is installed (.ci/run installs knot)")
}

fn knsupdate(port: u16, script: &str) {
    use std::io::Write;
    let mut child = Command::new("knsupdate")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("knsupdate is installed (.ci/run installs knot-dnsutils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            format!("server 127.0.0.1 {port}\nzone mesh.test.\n{script}send\nquit\n").as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "knsupdate failed: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs knotd and knsupdate: apt-get install knot knot-dnsutils"]
async fn srv_changes_in_knot_are_followed_while_traffic_flows() {
    init_tracing();
    let pki = Pki::new();
    let (app_a, app_b) = (Upstream::start().await, Upstream::start().await);
    let a = sidecar(&pki, &server_toml(&pki, app_a.addr, "127.0.0.1:0", "")).await;
    let b = sidecar(&pki, &server_toml(&pki, app_b.addr, "127.0.0.1:0", "")).await;
    let (_knot, port) = start_dns(|port| knot(pki.path(), port, a.inbound.port()));
    let dns: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = sidecar(&pki, &client_with_dns(&pki, dns, "_hello._udp.mesh.test.")).await;
    first_ok(client.outbound).await;
    assert!(app_a.count() >= 1 && app_b.count() == 0);

    // Traffic keeps flowing while the record moves from a to b.
    let out = client.outbound;
    let traffic = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..60 {
            statuses.push(get(out, "hello", "/").await.status);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        statuses
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    knsupdate(
        port,
        &format!(
            "update delete _hello._udp.mesh.test. SRV\nupdate add _hello._udp.mesh.test. 1 SRV 0 1 {} b.mesh.test.\n",
            b.inbound.port()
        ),
    );
    let statuses = traffic.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let mut moved = false;
    for _ in 0..100 {
        if app_b.count() > 0 {
            moved = true;
            break;
        }
        assert_eq!(
            get(client.outbound, "hello", "/").await.status,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved, "traffic never followed the SRV change");
    let a_before = app_a.count();
    for _ in 0..10 {
        assert_eq!(
            get(client.outbound, "hello", "/").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        app_a.count(),
        a_before,
        "the removed endpoint still gets traffic"
    );
}
