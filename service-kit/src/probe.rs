//! A dependency-free HTTP health probe.
//!
//! Images built `FROM scratch` have no `curl`, so each binary carries a
//! `health` subcommand that calls [`check_health`] on its own admin address
//! and exits 0 or 1. The probe speaks just enough HTTP/1.0 over a blocking
//! [`TcpStream`] to read a status line; it follows no redirects and reads no
//! body.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::{Duration, Instant};

/// The longest status line the probe reads before giving up.
const MAX_STATUS_LINE: usize = 1024;

/// Sends `GET {path}` to `addr` (`host:port`, optionally prefixed with
/// `http://`) and returns `Ok(())` if the answer's status is 200.
///
/// `timeout` bounds the whole exchange: resolving, connecting, writing and
/// reading. The error says what failed, e.g. `connect to 127.0.0.1:9101:
/// Connection refused` or `GET /healthz returned 503 Service Unavailable`.
pub fn check_health(addr: &str, path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let host = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    let targets: Vec<SocketAddr> = host
        .to_socket_addrs()
        .map_err(|err| format!("resolve {host:?}: {err}"))?
        .collect();

    let mut last_err = format!("resolve {host:?}: no addresses");
    for target in targets {
        let remaining =
            remaining(deadline).ok_or_else(|| format!("timed out after {timeout:?}"))?;
        match TcpStream::connect_timeout(&target, remaining) {
            Ok(stream) => return exchange(stream, host, path, deadline, timeout),
            Err(err) => last_err = format!("connect to {target}: {err}"),
        }
    }
    Err(last_err)
}

/// The address to probe for a server listening on `listen`: an unspecified
/// address (`0.0.0.0`, `::`) is replaced by the loopback address of the same
/// family, since that is where the server can be reached from inside.
pub fn local_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn exchange(
    mut stream: TcpStream,
    host: &str,
    path: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), String> {
    let timed_out = || format!("timed out after {timeout:?}");
    let io_err = |what: &str, err: std::io::Error| match err.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => timed_out(),
        _ => format!("{what}: {err}"),
    };

    stream
        .set_write_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))
        .map_err(|err| io_err("set timeout", err))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|err| io_err("send request", err))?;

    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        if head.len() > MAX_STATUS_LINE {
            return Err("status line too long".to_owned());
        }
        stream
            .set_read_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))
            .map_err(|err| io_err("set timeout", err))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(io_err("read response", err)),
        }
    }

    let text = String::from_utf8_lossy(&head);
    let status_line = text.split("\r\n").next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if !version.starts_with("HTTP/") || code.len() != 3 {
        return Err(format!("not an HTTP response: {status_line:?}"));
    }
    if code == "200" {
        Ok(())
    } else {
        let reason = parts.next().unwrap_or_default();
        Err(format!("GET {path} returned {code} {reason}")
            .trim_end()
            .to_owned())
    }
}

/// The `health` subcommand's whole job: probe `path` on this process's own admin listener
/// (`listen`, as configured; see [`local_addr`]) and turn the answer into an exit code,
/// printing `failure: <why>` to stderr when it is not 200.
pub fn exit_code(
    listen: SocketAddr,
    path: &str,
    timeout: Duration,
    failure: &str,
) -> std::process::ExitCode {
    match check_health(&local_addr(listen).to_string(), path, timeout) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{failure}: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addr_turns_unspecified_into_loopback() {
        assert_eq!(
            local_addr("0.0.0.0:9101".parse().expect("addr")),
            "127.0.0.1:9101".parse().expect("addr")
        );
        assert_eq!(
            local_addr("[::]:9101".parse().expect("addr")),
            "[::1]:9101".parse().expect("addr")
        );
        assert_eq!(
            local_addr("10.0.0.5:9101".parse().expect("addr")),
            "10.0.0.5:9101".parse().expect("addr")
        );
    }

    #[test]
    fn check_health_rejects_relative_path() {
        let err =
            check_health("127.0.0.1:1", "healthz", Duration::from_secs(1)).expect_err("relative");
        assert!(err.contains("must start with '/'"), "{err}");
    }

    #[test]
    fn check_health_reports_unparseable_address() {
        let err =
            check_health("no-port-here", "/healthz", Duration::from_secs(1)).expect_err("bad addr");
        assert!(err.contains("resolve"), "{err}");
    }
}
