//! Configuration helpers shared by every binary.
//!
//! A binary that cannot start because of its configuration exits with
//! [`EXIT_BAD_CONFIG`] (64, `EX_USAGE` in `sysexits.h`) and one line on stderr,
//! so that an orchestrator can tell "fix the config" from "crashed".
//!
//! The parsers return `Result<_, String>` so they plug straight into clap's
//! `value_parser = ...`; the message names the offending value and says what
//! is accepted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Exit code for a configuration the process cannot start with.
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Prints `error: invalid configuration: {err}` to stderr and exits with
/// [`EXIT_BAD_CONFIG`].
pub fn exit_bad_config(err: impl std::fmt::Display) -> ! {
    eprintln!("error: invalid configuration: {err}");
    std::process::exit(EXIT_BAD_CONFIG)
}

/// Parses the command line (and the environment variables its arguments
/// name) into `T`.
///
/// `--help` and `--version` print and exit 0 as usual; any other parse
/// error goes through [`exit_bad_config`] and exits 64.
#[cfg(feature = "runtime")]
pub fn parse_args_or_exit<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(err) => exit_on_parse_error(err),
    }
}

#[cfg(feature = "runtime")]
fn exit_on_parse_error(err: clap::Error) -> ! {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
        _ => {
            // clap renders "error: <message>\n\n<usage hint>"; keep one prefix.
            let rendered = err.to_string();
            let message = rendered.trim_end();
            exit_bad_config(message.strip_prefix("error: ").unwrap_or(message))
        }
    }
}

/// Parses a duration written as a whole number and a unit: `250us`, `500ms`,
/// `2s`, `1m`, `1h` (also `ns` and `µs`). A number without a unit is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const HELP: &str = "expected a whole number with an optional unit (ns, us, ms, s, m, h), e.g. \"500ms\" or \"2s\"";
    let text = s.trim();
    if text.is_empty() {
        return Err(format!("invalid duration {s:?}: it is empty; {HELP}"));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("invalid duration {s:?}: no number; {HELP}"));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: the number is too large"))?;
    let too_large = || format!("invalid duration {s:?}: too large");
    let duration = match unit.trim_start() {
        "ns" => Duration::from_nanos(value),
        "us" | "µs" => Duration::from_micros(value),
        "ms" => Duration::from_millis(value),
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.checked_mul(60).ok_or_else(too_large)?),
        "h" => Duration::from_secs(value.checked_mul(3600).ok_or_else(too_large)?),
        other => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {other:?}; {HELP}"
            ));
        }
    };
    Ok(duration)
}

/// Parses the address a server listens on, written as a URL or a bare
/// `host:port`: `http://127.0.0.1:2379`, `127.0.0.1:2379`,
/// `http://0.0.0.0:2379`, `http://[::1]:2379`. `localhost` means `127.0.0.1`.
/// `https://` is accepted too (TLS is switched on by the certificate flags).
/// A trailing `/` is allowed; any other path, a scheme other than these, a
/// host name other than `localhost` and a missing port are rejected.
pub fn parse_listen_url(s: &str) -> Result<SocketAddr, String> {
    let text = s.trim();
    let rest = match text.split_once("://") {
        // The scheme does not switch TLS on (the certificate flags do); https is accepted so
        // that etcd's `--listen-client-urls https://…` runs unchanged.
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            rest
        }
        Some((scheme, _)) => {
            return Err(format!(
                "invalid listen address {s:?}: scheme {scheme:?} is not supported; use http://, https:// or a bare host:port"
            ));
        }
        None => text,
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') {
        return Err(format!(
            "invalid listen address {s:?}: a listen address has no path; expected host:port"
        ));
    }
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(format!(
            "invalid listen address {s:?}: missing port; expected host:port, e.g. 127.0.0.1:2379"
        ));
    };
    if port.is_empty() {
        return Err(format!(
            "invalid listen address {s:?}: missing port after ':'"
        ));
    }
    let port: u16 = port.parse().map_err(|_| {
        format!("invalid listen address {s:?}: port {port:?} is not a number from 0 to 65535")
    })?;
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "invalid listen address {s:?}: write an IPv6 address in brackets, e.g. [::1]:2379"
        ));
    } else {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.parse().map_err(|_| {
            format!("invalid listen address {s:?}: host {host:?} is not an IP address or localhost")
        })?
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn duration_accepts_every_unit() {
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
    }

    #[test]
    fn duration_without_unit_is_seconds() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn duration_tolerates_surrounding_whitespace() {
        assert_eq!(parse_duration(" 5s "), Ok(Duration::from_secs(5)));
    }

    #[test]
    fn duration_rejects_empty_input() {
        let err = parse_duration("").expect_err("empty");
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn duration_rejects_unknown_unit_and_names_it() {
        let err = parse_duration("5d").expect_err("days are not a unit");
        assert!(err.contains("\"d\"") && err.contains("ms"), "{err}");
    }

    #[test]
    fn duration_rejects_missing_number() {
        let err = parse_duration("ms").expect_err("no number");
        assert!(err.contains("no number"), "{err}");
    }

    #[test]
    fn duration_rejects_negative_and_fractional_values() {
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn duration_rejects_overflow_instead_of_wrapping() {
        let err = parse_duration(&format!("{}h", u64::MAX)).expect_err("overflows");
        assert!(err.contains("too large"), "{err}");
        let err = parse_duration("99999999999999999999999s").expect_err("overflows u64");
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn listen_url_accepts_http_and_bare_forms() {
        assert_eq!(
            parse_listen_url("http://127.0.0.1:2379"),
            Ok(addr("127.0.0.1:2379"))
        );
        assert_eq!(
            parse_listen_url("127.0.0.1:2379"),
            Ok(addr("127.0.0.1:2379"))
        );
        assert_eq!(
            parse_listen_url("http://0.0.0.0:2379"),
            Ok(addr("0.0.0.0:2379"))
        );
        assert_eq!(
            parse_listen_url("HTTP://127.0.0.1:2379/"),
            Ok(addr("127.0.0.1:2379"))
        );
    }

    #[test]
    fn listen_url_maps_localhost_to_ipv4_loopback() {
        assert_eq!(
            parse_listen_url("http://localhost:2379"),
            Ok(addr("127.0.0.1:2379"))
        );
        assert_eq!(
            parse_listen_url("localhost:9101"),
            Ok(addr("127.0.0.1:9101"))
        );
    }

    #[test]
    fn listen_url_accepts_bracketed_ipv6() {
        assert_eq!(
            parse_listen_url("http://[::1]:2379"),
            Ok(addr("[::1]:2379"))
        );
    }

    #[test]
    fn listen_url_accepts_https_and_rejects_other_schemes() {
        assert_eq!(
            parse_listen_url("https://127.0.0.1:2379"),
            Ok("127.0.0.1:2379".parse().expect("addr"))
        );
        let err = parse_listen_url("unix:///tmp/sock").expect_err("unix");
        assert!(
            err.contains("\"unix\"") && err.contains("not supported"),
            "{err}"
        );
    }

    #[test]
    fn listen_url_rejects_missing_port() {
        let err = parse_listen_url("http://127.0.0.1").expect_err("no port");
        assert!(err.contains("missing port"), "{err}");
        let err = parse_listen_url("localhost:").expect_err("empty port");
        assert!(err.contains("missing port"), "{err}");
    }

    #[test]
    fn listen_url_rejects_out_of_range_port() {
        let err = parse_listen_url("127.0.0.1:70000").expect_err("port too large");
        assert!(err.contains("70000"), "{err}");
    }

    #[test]
    fn listen_url_rejects_host_names_other_than_localhost() {
        let err = parse_listen_url("http://example.com:80").expect_err("dns name");
        assert!(err.contains("not an IP address"), "{err}");
    }

    #[test]
    fn listen_url_rejects_paths() {
        let err = parse_listen_url("http://127.0.0.1:2379/v3").expect_err("path");
        assert!(err.contains("no path"), "{err}");
    }
}
