//! The built binary, driven as a user would: `quicar demo` answered with curl, `quicar check`,
//! `quicar certs`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::Reaper;

const BIN: &str = env!("CARGO_BIN_EXE_quicar");

#[test]
#[ignore = "needs curl: apt-get install curl"]
fn demo_answers_curl_with_the_callers_identity() {
    let child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let curl_line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("demo printed its curl lines");
        if line
            .trim_start()
            .starts_with("curl -s -H 'Host: hello' http://")
        {
            break line;
        }
    };
    // The first curl line exactly as printed, minus the comment.
    let url = curl_line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-H", "Host: hello", url])
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {out:?}");
    assert!(text.contains("caller: spiffe://quicar.local/web"), "{text}");

    // SIGTERM: the demo drains and exits on its own.
    let pid = child.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn check_prints_the_effective_config_and_refuses_bad_ones() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(BIN)
        .args(["check", "--config", &format!("{root}/config/node-a.toml")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[[service]]") && text.contains("trust_domain"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[identity]\ncert = \"a\"\nkey = \"b\"\nca = \"c\"\n[inbound]\nlisten = \"0.0.0.0:4143\"\nport = 1\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("port"), "{err}");

    // A trust domain no certificate's SPIFFE ID could carry (SPIFFE's trust domains are lower
    // case) is refused by name, not turned into identities that can never match.
    let node_a = std::fs::read_to_string(format!("{root}/config/node-a.toml")).unwrap();
    let upper = dir.path().join("upper.toml");
    std::fs::write(
        &upper,
        node_a
            .replace("../certs/", &format!("{root}/certs/"))
            .replace("\"quicar.local\"", "\"Quicar.Local\""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&upper)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upper.toml") && err.contains("node.trust_domain"),
        "{err}"
    );
}

#[test]
fn certs_init_and_issue_make_a_usable_identity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let ok = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    ok(&["certs", "init", "--dir", d]);
    ok(&["certs", "issue", "orders", "--dir", d]);
    // A second init would orphan every issued certificate: refused without --force.
    let out = Command::new(BIN)
        .args(["certs", "init", "--dir", d])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let m = quicar::identity::Material::load(&quicar::config::IdentityFiles {
        cert: dir.path().join("orders.crt"),
        key: dir.path().join("orders.key"),
        ca: dir.path().join("ca.crt"),
        reload_interval: Duration::from_secs(1),
    })
    .unwrap();
    assert_eq!(m.id.as_str(), "spiffe://quicar.local/orders");
}

#[test]
fn check_loads_the_identity_and_discovery_files_run_would_load() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let check = |toml: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let identity = format!(
        "[identity]\ncert = \"{root}/certs/web.crt\"\nkey = \"{root}/certs/web.key\"\nca = \"{root}/certs/ca.crt\"\n"
    );
    // A certificate file that does not exist: the config parses, the identity does not load.
    let out = check(&identity.replace("web.crt", "missing.crt"));
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[identity]") && err.contains("missing.crt"),
        "{err}"
    );
    // A discovery file that does not parse.
    std::fs::write(
        dir.path().join("eps.toml"),
        "endpoints = [{ adress = \"x\" }]\n",
    )
    .unwrap();
    let out = check(&format!(
        "{identity}[[service]]\nname = \"hello\"\ndiscovery = {{ file = \"eps.toml\" }}\n"
    ));
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hello") && err.contains("eps.toml"), "{err}");
    // Both fine: exit 0.
    std::fs::write(
        dir.path().join("eps.toml"),
        "endpoints = [{ address = \"127.0.0.1:4143\" }]\n",
    )
    .unwrap();
    let out = check(&format!(
        "{identity}[[service]]\nname = \"hello\"\ndiscovery = {{ file = \"eps.toml\" }}\n"
    ));
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn completions_man_page_help_and_tidy_check_output() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = run(&["completions", "bash"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("_quicar()"));
    let out = run(&["man"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(".TH quicar 1"));
    // Every option says what it is for.
    let out = run(&["run", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--config <CONFIG>  The sidecar's TOML config"),
        "{help}"
    );
    // Errors are a cause chain, not a backtrace, even when the shell asks for backtraces.
    let out = run(
        &["check", "--config", "/nonexistent/quicar.toml"],
        &[("RUST_BACKTRACE", "1")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: /nonexistent/quicar.toml"), "{err}");
    assert!(
        !err.contains("Stack backtrace") && !err.contains("stack backtrace"),
        "{err}"
    );
    // `check` prints what is in effect, tidily: no empty tables, no `dir/../` paths.
    let root = env!("CARGO_MANIFEST_DIR");
    let out = run(
        &["check", "--config", &format!("{root}/config/node-b.toml")],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("= []") && !text.contains("/../"), "{text}");
}

/// `benches/pgo.sh` (the production build) names what it needs and stops before building when
/// rustc's LLVM has no `llvm-profdata` beside it or on the PATH: here a stand-in `rustc` that
/// reports LLVM 999 and a sysroot without the tool.
#[test]
fn the_pgo_build_says_what_it_needs_without_llvm_profdata() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let rustc = dir.path().join("rustc");
    std::fs::write(
        &rustc,
        "#!/bin/sh\ncase \"$*\" in\n  -vV) printf 'rustc 0.0.0\\nhost: x86_64-unknown-linux-gnu\\nLLVM version: 999.1.0\\n' ;;\n  '--print sysroot') echo /nonexistent-sysroot ;;\n  *) exit 1 ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&rustc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pgo.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("benches/pgo.sh needs llvm-profdata for LLVM 999")
            && stderr.contains("rustup component add llvm-tools")
            && stderr.contains("apt-get install llvm-999"),
        "{stderr}"
    );
    assert!(!stdout.contains("instrumented build"), "{stdout}");
}
