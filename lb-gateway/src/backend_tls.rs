//! TLS from the gateway to its backends, per route (Envoy's upstream TLS context per cluster).
//!
//! Why here and not in the routes file alone: the routes file says *whether* a route's instances
//! are dialled over TLS (`backend.tls`) and what name their certificates must carry
//! (`backend.tls_server_name`), but the key material is the gateway's, the same for every route
//! (`--backend-cacert`, `--backend-cert`, `--backend-key`, read through service-kit's
//! [`ClientTlsFiles`] like every other client of the platform). Routes come and go with
//! config-svc versions; the material stays for the life of the process.
//!
//! - [`BackendTlsArgs`]: the flags. [`BackendTls`]: the loaded material as two connectors that
//!   differ only in ALPN (`h2` for HTTP/2 backends, `http/1.1` for HTTP/1.1 ones), so a
//!   backend serving both on one port picks the protocol the gateway is about to speak.
//! - [`RouteTls`]: what a route with `tls` on carries; [`PeerTls`]: what one backend's
//!   connection pool carries (the connectors and the name checked for that backend).
//! - [`check_routes`]: a route with `tls` on needs `--backend-cacert`; checked at start (exit
//!   64) and for every routes version from config-svc (rejected, the current routes kept).
//! - [`failure_reason`]: a short, stable reason for a failed handshake (metric label).
//!
//! # Caveats
//! - The client certificate and key are re-read when their files change or on SIGHUP (service-kit's
//!   `CertReloader`), at the next handshake; the CA bundle is read at start. Connections already
//!   open keep the certificate they were made with, and so do TLS sessions resumed from an
//!   earlier handshake (resumption is on, as for every client of the platform: a resumed session
//!   presents no certificate, the backend keeps the identity of the first one).
//! - With TLS 1.3 the backend checks the gateway's certificate after the gateway considers the
//!   handshake done, so a backend refusing it shows as a failed exchange on that connection
//!   (`upstream_error`), not as a failed connect.

use std::path::PathBuf;
use std::sync::Arc;

use service_kit::tls::rustls::pki_types::ServerName;
use service_kit::tls::rustls::{self, CertificateError};
use service_kit::tls::{ClientTlsFiles, TlsError, tokio_rustls};

use crate::routes::{Route, RoutesFile};
use crate::upstream::Target;

/// `--backend-cacert`, `--backend-cert`, `--backend-key`: how the gateway dials the backends of
/// routes with `backend.tls = true`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BackendTlsArgs {
    /// CA bundle (PEM) the certificates of TLS backends (routes with `backend.tls = true`) are
    /// verified against; such routes are refused without it.
    #[arg(long, env = "LB_GATEWAY_BACKEND_CACERT", value_name = "FILE")]
    pub backend_cacert: Option<PathBuf>,
    /// Client certificate (PEM) presented to TLS backends that ask for one.
    #[arg(long, env = "LB_GATEWAY_BACKEND_CERT", value_name = "FILE")]
    pub backend_cert: Option<PathBuf>,
    /// Private key (PEM) of --backend-cert.
    #[arg(long, env = "LB_GATEWAY_BACKEND_KEY", value_name = "FILE")]
    pub backend_key: Option<PathBuf>,
}

impl BackendTlsArgs {
    /// The files as a [`ClientTlsFiles`].
    pub fn files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca_file: self.backend_cacert.clone(),
            cert_file: self.backend_cert.clone(),
            key_file: self.backend_key.clone(),
        }
    }

    /// Checks that the flags fit together (a certificate needs its key and the CA).
    pub fn validate(&self) -> Result<(), String> {
        self.files().validate("--backend-")
    }

    /// Whether TLS to backends can be dialled (the CA is given).
    pub fn configured(&self) -> bool {
        self.backend_cacert.is_some()
    }

    /// Reads the files now (so a bad one fails the start), or `None` without `--backend-cacert`.
    pub fn load(&self) -> Result<Option<Arc<BackendTls>>, TlsError> {
        self.validate().map_err(TlsError::Flags)?;
        let Some(config) = self.files().client_config()? else {
            return Ok(None);
        };
        let with_alpn = |alpn: &[u8]| {
            let mut c = (*config).clone();
            c.alpn_protocols = vec![alpn.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(c))
        };
        Ok(Some(Arc::new(BackendTls {
            http1: with_alpn(b"http/1.1"),
            http2: with_alpn(b"h2"),
        })))
    }
}

/// The gateway's TLS client material, as one connector per ALPN offer.
pub struct BackendTls {
    http1: tokio_rustls::TlsConnector,
    http2: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls").finish_non_exhaustive()
    }
}

/// What a route with `backend.tls` on dials its instances with.
#[derive(Debug, Clone)]
pub struct RouteTls {
    connectors: Arc<BackendTls>,
    /// `backend.tls_server_name`, when given.
    server_name: Option<ServerName<'static>>,
}

impl RouteTls {
    /// The TLS of `route`: `None` when its `tls` is off; an error when it is on and the gateway
    /// has no material (`--backend-cacert`) or the server name is unusable.
    pub fn of(route: &Route, tls: Option<&Arc<BackendTls>>) -> Result<Option<RouteTls>, String> {
        if !route.backend.tls {
            return Ok(None);
        }
        let Some(connectors) = tls else {
            return Err(missing_ca(route));
        };
        let server_name = match &route.backend.tls_server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|e| {
                format!(
                    "route {:?}: backend.tls_server_name {name:?} is not a server name: {e}",
                    route.name
                )
            })?),
            None => None,
        };
        Ok(Some(RouteTls {
            connectors: Arc::clone(connectors),
            server_name,
        }))
    }

    /// The TLS of one instance at `addr`: the route's server name, else the instance's address.
    pub fn for_target(&self, addr: &Target) -> Result<PeerTls, String> {
        let server_name = match (&self.server_name, addr) {
            (Some(name), _) => name.clone(),
            (None, Target::Ip(a)) => ServerName::IpAddress(a.ip().into()),
            (None, Target::Name { host, .. }) => ServerName::try_from(host.clone())
                .map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))?,
        };
        Ok(PeerTls {
            connectors: Arc::clone(&self.connectors),
            server_name,
        })
    }
}

/// Which protocol a connection is for (the ALPN offer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `http/1.1`.
    Http1,
    /// `h2`.
    Http2,
}

/// The TLS of one backend's connections.
#[derive(Debug, Clone)]
pub struct PeerTls {
    connectors: Arc<BackendTls>,
    server_name: ServerName<'static>,
}

impl PeerTls {
    /// The connector offering `alpn`.
    pub fn connector(&self, alpn: Alpn) -> &tokio_rustls::TlsConnector {
        match alpn {
            Alpn::Http1 => &self.connectors.http1,
            Alpn::Http2 => &self.connectors.http2,
        }
    }

    /// The name the backend's certificate must carry (and the SNI, for a DNS name).
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }
}

fn missing_ca(route: &Route) -> String {
    format!(
        "route {:?}: backend.tls is on but the gateway has no --backend-cacert to check the \
         backends' certificates against",
        route.name
    )
}

/// Refuses routes with `backend.tls` on when the gateway has no `--backend-cacert`.
pub fn check_routes(file: &RoutesFile, configured: bool) -> Result<(), String> {
    match file.routes.iter().find(|r| r.backend.tls) {
        Some(route) if !configured => Err(missing_ca(route)),
        _ => Ok(()),
    }
}

/// A short reason for a failed TLS handshake, for the `reason` label of
/// `lb_gateway_backend_tls_failures_total`: `unknown_issuer`, `name_mismatch`, `expired`,
/// `bad_certificate`, `alert_received` (the backend refused the handshake, e.g. our
/// certificate), `no_common_protocol` (ALPN), `not_tls` (the backend answered something else),
/// `closed` (the connection ended mid-handshake) or `other`.
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => "closed",
            _ => "other",
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "name_mismatch"
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => "expired",
            _ => "bad_certificate",
        },
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoApplicationProtocol => "no_common_protocol",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => "not_tls",
        _ => "other",
    }
}

/// Every reason [`failure_reason`] gives (to remove a backend's series).
pub const FAILURE_REASONS: [&str; 9] = [
    "unknown_issuer",
    "name_mismatch",
    "expired",
    "bad_certificate",
    "alert_received",
    "no_common_protocol",
    "not_tls",
    "closed",
    "other",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_errors_get_stable_reasons() {
        let wrap = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            failure_reason(&wrap(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))),
            "unknown_issuer"
        );
        assert_eq!(
            failure_reason(&wrap(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName
            ))),
            "name_mismatch"
        );
        assert_eq!(
            failure_reason(&wrap(rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRequired
            ))),
            "alert_received"
        );
        assert_eq!(
            failure_reason(&std::io::ErrorKind::UnexpectedEof.into()),
            "closed"
        );
        for reason in [
            failure_reason(&wrap(rustls::Error::NoApplicationProtocol)),
            failure_reason(&wrap(rustls::Error::General("x".into()))),
        ] {
            assert!(FAILURE_REASONS.contains(&reason), "{reason}");
        }
    }

    #[test]
    fn a_tls_route_without_the_ca_is_refused_naming_the_route_and_the_flag() {
        let file = crate::routes::parse(
            "[[routes]]\nname = \"plain\"\nbackend = { namespace = \"n\", service = \"a\" }\n\
             [[routes]]\nname = \"secure\"\nbackend = { namespace = \"n\", service = \"b\", tls = true }\n",
        )
        .expect("valid routes");
        let e = check_routes(&file, false).expect_err("no CA");
        assert!(
            e.contains("\"secure\"") && e.contains("--backend-cacert"),
            "{e}"
        );
        assert_eq!(check_routes(&file, true), Ok(()));
        assert!(
            RouteTls::of(&file.routes[1], None)
                .expect_err("no CA")
                .contains("--backend-cacert")
        );
        assert!(
            RouteTls::of(&file.routes[0], None)
                .expect("plain route")
                .is_none()
        );
    }
}
