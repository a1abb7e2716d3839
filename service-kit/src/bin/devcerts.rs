//! `devcerts`: writes a development CA and a certificate for every service of the compose stack
//! (see `service_kit::devcerts`). Development only.
//!
//! ```sh
//! cargo run -p service-kit --bin devcerts -- compose/certs   # default directory: ./certs
//! ```
//!
//! Writes `ca.pem`, and `<name>.pem` + `<name>-key.pem` for: `coordinator-1..3` (CN = member
//! name, as the peer name check wants), `registry-svc`, `config-svc`, `lb-gateway`, `demo-svc`
//! and `client` (CN `root`: etcdctl with `--cert`/`--key` acts as root when the coordinator runs
//! `--client-cert-auth` with auth enabled). Every certificate is valid for server and client use
//! and names its compose host names, `localhost` and `127.0.0.1`.

use std::path::PathBuf;
use std::process::ExitCode;

use service_kit::devcerts::DevCa;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "certs".into()));
    if args.next().is_some() || dir.as_os_str() == "--help" || dir.as_os_str() == "-h" {
        eprintln!("usage: devcerts [DIR]   (writes ca.pem and a pair per service into DIR)");
        return ExitCode::from(64);
    }
    match write(&dir) {
        Ok(n) => {
            println!(
                "wrote ca.pem and {n} certificate/key pairs to {}",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write(dir: &std::path::Path) -> anyhow::Result<usize> {
    let local = ["localhost", "127.0.0.1"];
    let with = |names: &[&'static str]| -> Vec<&'static str> {
        names.iter().copied().chain(local).collect()
    };
    let certs: Vec<(&str, &str, Vec<&str>)> = vec![
        ("coordinator-1", "coordinator-1", with(&["coordinator-1"])),
        ("coordinator-2", "coordinator-2", with(&["coordinator-2"])),
        ("coordinator-3", "coordinator-3", with(&["coordinator-3"])),
        (
            "registry-svc",
            "registry-svc",
            with(&["registry-svc", "registry-svc-1", "registry-svc-2"]),
        ),
        (
            "config-svc",
            "config-svc",
            with(&["config-svc", "config-svc-1", "config-svc-2"]),
        ),
        ("lb-gateway", "lb-gateway", with(&["lb-gateway"])),
        (
            "demo-svc",
            "demo-svc",
            with(&["demo-svc", "demo-1", "demo-2", "demo-3"]),
        ),
        ("client", "root", with(&[])),
    ];
    let ca = DevCa::new("platform development CA")?;
    ca.write_all(dir, &certs)?;
    Ok(certs.len())
}
