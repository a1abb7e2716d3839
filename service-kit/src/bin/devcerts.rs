//! `devcerts`: writes a development CA and a certificate for every service of the compose stack
//! (see `service_kit::devcerts::write_stack`). Development only.
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

use service_kit::devcerts::write_stack;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "certs".into()));
    if args.next().is_some() || dir.as_os_str() == "--help" || dir.as_os_str() == "-h" {
        eprintln!("usage: devcerts [DIR]   (writes ca.pem and a pair per service into DIR)");
        return ExitCode::from(64);
    }
    match write_stack(&dir) {
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
