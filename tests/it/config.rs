//! Bad configs are refused before anything binds, naming the file, the key and the problem.

use std::path::Path;

use quicar::config::Config;

fn err(text: &str) -> String {
    Config::parse(text, "node.toml", Path::new("/tmp"))
        .expect_err("config should be refused")
        .to_string()
}

const ID: &str = "[identity]\ncert = \"a.crt\"\nkey = \"a.key\"\nca = \"ca.crt\"\n";

#[test]
fn errors_name_the_file_and_the_key() {
    let e = err(&format!("{ID}[node]\ntrust_domian = \"x\"\n"));
    assert!(
        e.starts_with("node.toml:") && e.contains("trust_domian"),
        "{e}"
    );

    let e = err(&format!("{ID}[outbound]\nlisten = \"localhost\"\n"));
    assert!(e.contains("node.toml") && e.contains("listen"), "{e}");

    let e = err(&format!(
        "{ID}[[local]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nallow = [\"web\"]\n"
    ));
    assert!(
        e.contains("local[0].allow[0]") && e.contains("SPIFFE"),
        "{e}"
    );

    let e = err(&format!("{ID}[[service]]\nname = \"a\"\nendpoints = []\n"));
    assert!(e.contains("service[0].endpoints"), "{e}");

    let e = err(&format!(
        "{ID}[[service]]\nname = \"a\"\ntimeout = \"soon\"\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n"
    ));
    assert!(e.contains("timeout"), "{e}");

    let e = err(&format!(
        "{ID}[[service]]\nname = \"a\"\ntransport = \"carrier-pigeon\"\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n"
    ));
    assert!(
        e.contains("transport") || e.contains("carrier-pigeon"),
        "{e}"
    );

    let e = err(&format!(
        "{ID}[[service]]\nname = \"a\"\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n[[service]]\nname = \"A\"\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n"
    ));
    assert!(e.contains("service[1].name") && e.contains("twice"), "{e}");

    let e = err("[outbound]\nlisten = \"127.0.0.1:1\"\n");
    assert!(e.contains("identity"), "{e}");

    for side in ["outbound", "inbound"] {
        for key in ["header_read_timeout", "response_stall_timeout"] {
            let e = err(&format!("{ID}[{side}]\n{key} = \"0s\"\n"));
            assert!(
                e.contains("node.toml")
                    && e.contains(&format!("{side}.{key}"))
                    && e.contains("more than 0"),
                "{e}"
            );
        }
    }

    for bad in ["0", "100000"] {
        let e = err(&format!("{ID}[node]\nworker_threads = {bad}\n"));
        assert!(
            e.contains("node.toml") && e.contains("node.worker_threads"),
            "{e}"
        );
    }
}

#[test]
fn a_missing_file_is_named() {
    let e = Config::load(Path::new("/nonexistent/quicar.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/quicar.toml"), "{e}");
}

#[test]
fn shipped_example_configs_are_valid_and_point_at_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let a = Config::load(&root.join("config/node-a.toml")).unwrap();
    let b = Config::load(&root.join("config/node-b.toml")).unwrap();
    for c in [&a, &b] {
        assert!(c.identity.cert.exists(), "{}", c.identity.cert.display());
        assert!(c.identity.key.exists());
        assert!(c.identity.ca.exists());
    }
    // a calls b's inbound port and b fronts what a calls.
    let svc = &a.service[0];
    assert_eq!(svc.endpoints[0].address.port(), b.inbound.listen.port());
    assert!(b.local.iter().any(|l| l.name == svc.name));
    // The effective config renders and parses back.
    let again = Config::parse(&a.to_toml(), "rendered", root).unwrap();
    assert_eq!(again.service.len(), a.service.len());
}
