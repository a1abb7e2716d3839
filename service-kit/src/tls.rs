//! TLS for every hop of the platform: rustls with the `ring` provider, no OpenSSL.
//!
//! Every service serves and dials TLS the same way, so it is written once here:
//!
//! - [`ServerTlsFiles`]: the etcd-style file flags of one listener (`--cert-file`,
//!   `--key-file`, `--trusted-ca-file`, `--client-cert-auth`), turned into a rustls
//!   [`ServerConfig`] by [`ServerTlsFiles::server_config`]. ALPN offers `h2` and `http/1.1`, so a
//!   port keeps serving gRPC and HTTP/1.1 (JSON, REST) side by side over TLS.
//! - [`ServerTlsArgs`] / [`ClientTlsArgs`]: the same as clap flags for the services
//!   (`--cert-file …` for their own listeners, `--coordinator-cacert|cert|key` for their
//!   coordinator client, in etcdctl's style).
//! - [`CertReloader`]: the certificate and key in use, re-read from disk when either file's
//!   modification time changes or the process gets SIGHUP ([`reload_on_sighup`]); a pair that
//!   cannot be read (or whose key does not match) is logged and the old one kept. It serves both
//!   sides: [`ResolvesServerCert`] and [`ResolvesClientCert`].
//! - [`TlsIncoming`]: accepts TCP connections and runs the handshakes concurrently (a slow or
//!   silent client never holds up the others), yielding [`tokio_rustls::server::TlsStream`]s.
//!   It is a `Stream` for tonic's `serve_with_incoming` and an [`axum::serve::Listener`] for
//!   axum. A connection whose handshake fails (plaintext on a TLS port, no or a foreign
//!   certificate where one is required) is closed.
//! - [`ClientTlsFiles::client_config`] and [`TlsConnector`] / [`lazy_channel`]: tonic channels
//!   over TLS, verifying the server's certificate against the trusted CA for the host of the URL
//!   dialled, presenting a client certificate when configured.
//! - [`HttpsConnector`]: hyper's HTTP/1.1 client dialling `http://` plain and `https://` over
//!   TLS with the same client configuration (REST and admin clients: platformctl, the gateway's
//!   dashboard). Its connection type, [`MaybeTlsStream`], is also what the gateway dials its
//!   backends with.
//! - [`cert_names`] / [`cert_common_name`]: the names a certificate carries (CN, DNS and IP
//!   SANs), for name checks and for etcd's "client certificate CN is the user".
//!
//! # Peer certificates in handlers
//! Servers built on [`TlsIncoming`] hand tonic `TlsStream<TcpStream>` connections, for which
//! tonic implements `Connected` with `TlsConnectInfo<TcpConnectInfo>`: a handler reads the
//! verified client chain with the standard `tonic::Request::peer_certs()` (the end-entity
//! certificate first), and `remote_addr()` keeps working. Plain HTTP layers wrapping a tonic
//! server find the same `TlsConnectInfo<TcpConnectInfo>` in `http::Request::extensions()`
//! ([`peer_certs_of`]).
//!
//! # Caveats
//! - The trusted CA bundle is read at start; only the certificate/key pair reloads.
//! - A reload is noticed at the next handshake (a changed mtime is checked at most once a
//!   second); connections already open keep the certificate they started with.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
pub use {rustls, tokio_rustls};

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often (at most) a handshake looks at the certificate files' modification times.
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What can go wrong setting TLS up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The flags do not fit together.
    #[error("{0}")]
    Flags(String),
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider everything here uses: `ring` (builds without cmake, also for musl).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file (a chain: end entity first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "holds no PEM certificate".into(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: format!("holds no PEM private key: {e}"),
    })
}

/// The CA certificates of a PEM bundle as a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let signer = provider.key_provider.load_private_key(key)?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()?;
    Ok(ck)
}

/// Bumped by SIGHUP; every [`CertReloader`] re-reads its files when it changed.
static GENERATION: AtomicU64 = AtomicU64::new(0);
static SIGHUP: Once = Once::new();

/// Makes SIGHUP re-read every certificate/key pair (at the next handshake). Idempotent; must be
/// called inside a Tokio runtime (the first call spawns the signal listener there).
pub fn reload_on_sighup() {
    SIGHUP.call_once(|| {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::hangup()) {
                Ok(mut hup) => {
                    handle.spawn(async move {
                        while hup.recv().await.is_some() {
                            GENERATION.fetch_add(1, Ordering::AcqRel);
                            tracing::info!("SIGHUP: certificates will be re-read");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
            }
        }
    });
}

struct ReloadState {
    checked: Instant,
    mtimes: (Option<SystemTime>, Option<SystemTime>),
    generation: u64,
}

/// A certificate and key that follow their files (see the module docs).
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    state: Mutex<ReloadState>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertReloader")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl CertReloader {
    /// Reads the pair now (failing if it cannot), then follows the files.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertReloader>, TlsError> {
        let provider = provider();
        let mtimes = (mtime(cert), mtime(key));
        let pair = load_pair(cert, key, &provider)?;
        Ok(Arc::new(CertReloader {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(pair),
            state: Mutex::new(ReloadState {
                checked: Instant::now(),
                mtimes,
                generation: GENERATION.load(Ordering::Acquire),
            }),
            provider,
        }))
    }

    /// The pair to present now, re-read first if the files changed or SIGHUP arrived.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.maybe_reload();
        self.current.load_full()
    }

    /// Re-reads the files now if they changed (or SIGHUP arrived since the last read).
    pub fn maybe_reload(&self) {
        // A handshake never waits for another one's reload.
        let Some(mut st) = self.state.try_lock() else {
            return;
        };
        let generation = GENERATION.load(Ordering::Acquire);
        if generation == st.generation && st.checked.elapsed() < RELOAD_CHECK_EVERY {
            return;
        }
        st.checked = Instant::now();
        let mtimes = (mtime(&self.cert), mtime(&self.key));
        if generation == st.generation && mtimes == st.mtimes {
            return;
        }
        match load_pair(&self.cert, &self.key, &self.provider) {
            Ok(pair) => {
                self.current.store(Arc::new(pair));
                st.mtimes = mtimes;
                st.generation = generation;
                tracing::info!(cert = %self.cert.display(), "certificate reloaded");
            }
            // Files caught mid-write (a new cert with the old key) settle on a later check.
            Err(e) => tracing::warn!(
                cert = %self.cert.display(),
                error = %e,
                "cannot reload the certificate; keeping the one in use"
            ),
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CertReloader {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Decides whether a verified peer certificate's names (see [`cert_names`]) may connect.
pub type NameCheck = Arc<dyn Fn(&[String]) -> bool + Send + Sync>;

/// The TLS files of one server listener (etcd's `--cert-file` family).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain (PEM). TLS is on when set.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA bundle (PEM) client certificates are verified against.
    pub trusted_ca_file: Option<PathBuf>,
    /// Require a client certificate signed by the trusted CA.
    pub client_cert_auth: bool,
}

impl ServerTlsFiles {
    /// True when the listener serves TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// Checks that the flags fit together; `prefix` is the flags' prefix (`""`, `"peer-"`).
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(format!("--{prefix}cert-file needs --{prefix}key-file"));
            }
            (None, Some(_)) => {
                return Err(format!("--{prefix}key-file needs --{prefix}cert-file"));
            }
            _ => {}
        }
        if self.client_cert_auth && self.trusted_ca_file.is_none() {
            return Err(format!(
                "--{prefix}client-cert-auth needs --{prefix}trusted-ca-file"
            ));
        }
        if self.client_cert_auth && self.cert_file.is_none() {
            return Err(format!(
                "--{prefix}client-cert-auth needs --{prefix}cert-file"
            ));
        }
        Ok(())
    }

    /// The rustls configuration of the listener, or `None` when TLS is off.
    pub fn server_config(&self) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        self.server_config_checked(None)
    }

    /// Like [`server_config`](Self::server_config), and a client certificate is accepted only
    /// if `check` accepts its names (after the CA verified it).
    pub fn server_config_checked(
        &self,
        check: Option<NameCheck>,
    ) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        self.validate("").map_err(TlsError::Flags)?;
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else {
            return Ok(None);
        };
        let provider = provider();
        let resolver = CertReloader::load(cert, key)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let mut config = match &self.trusted_ca_file {
            Some(ca) => {
                let roots = Arc::new(load_roots(ca)?);
                let b = WebPkiClientVerifier::builder_with_provider(roots, provider);
                let b = if self.client_cert_auth {
                    b
                } else {
                    // A certificate is verified if presented, but not required.
                    b.allow_unauthenticated()
                };
                let verifier = b.build().map_err(|e| {
                    TlsError::Flags(format!("cannot use the trusted CA {}: {e}", ca.display()))
                })?;
                let verifier: Arc<dyn ClientCertVerifier> = match check {
                    Some(check) => Arc::new(NameChecked {
                        inner: verifier,
                        check,
                    }),
                    None => verifier,
                };
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        }
        .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// A client verifier that also checks the certificate's names.
struct NameChecked {
    inner: Arc<dyn ClientCertVerifier>,
    check: NameCheck,
}

impl fmt::Debug for NameChecked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NameChecked").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for NameChecked {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_names(&self.check, end_entity, "peer")?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The name check both verifiers add after the usual CA checks: `end_entity` must carry a
/// name `check` allows; a refusal is logged with the names the certificate had.
fn check_names(
    check: &NameCheck,
    end_entity: &CertificateDer<'_>,
    what: &str,
) -> Result<(), rustls::Error> {
    let names = cert_names(end_entity);
    if check(&names) {
        return Ok(());
    }
    tracing::warn!(?names, "refused a {what} certificate: no allowed name");
    Err(rustls::Error::InvalidCertificate(
        CertificateError::ApplicationVerificationFailure,
    ))
}

/// A server verifier (the CA and the host name, as usual) that also checks the names.
struct NameCheckedServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check: NameCheck,
}

impl fmt::Debug for NameCheckedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NameCheckedServer").finish_non_exhaustive()
    }
}

impl rustls::client::danger::ServerCertVerifier for NameCheckedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_names(&self.check, end_entity, "server")?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS files of a client (etcdctl's `--cacert`, `--cert`, `--key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA bundle (PEM) the server's certificate is verified against. TLS is on when set.
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain (PEM), for servers that require one.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// True when the client dials TLS.
    pub fn enabled(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// Checks that the flags fit together; `what` names them in the message
    /// (`"--coordinator-"` gives `--coordinator-cacert`).
    pub fn validate(&self, what: &str) -> Result<(), String> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return Err(format!("{what}cert needs {what}key")),
            (None, Some(_)) => return Err(format!("{what}key needs {what}cert")),
            _ => {}
        }
        if self.cert_file.is_some() && self.ca_file.is_none() {
            return Err(format!(
                "{what}cert needs {what}cacert (the CA the server's certificate is checked against)"
            ));
        }
        Ok(())
    }

    /// The rustls client configuration, or `None` when TLS is off.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        self.client_config_checked(None)
    }

    /// Like [`client_config`](Self::client_config), and a server certificate is accepted only
    /// if `check` accepts its names (after the CA and the host name verified it).
    pub fn client_config_checked(
        &self,
        check: Option<NameCheck>,
    ) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        self.validate("--").map_err(TlsError::Flags)?;
        let Some(ca) = &self.ca_file else {
            return Ok(None);
        };
        let roots = Arc::new(load_roots(ca)?);
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match check {
            Some(check) => {
                let inner =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| {
                            TlsError::Flags(format!("cannot use the CA {}: {e}", ca.display()))
                        })?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NameCheckedServer { inner, check }))
            }
            None => builder.with_root_certificates(roots),
        };
        let mut config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                builder.with_client_cert_resolver(CertReloader::load(cert, key)?)
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth` for a service's own
/// listeners (gRPC and HTTP), as clap flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Certificate chain (PEM) of this service's gRPC and HTTP listeners; TLS is on when set.
    #[arg(long, env = "TLS_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of --cert-file.
    #[arg(long, env = "TLS_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// CA bundle (PEM) client certificates are verified against.
    #[arg(long, env = "TLS_TRUSTED_CA_FILE", value_name = "FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require a client certificate signed by --trusted-ca-file.
    #[arg(long, env = "TLS_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,
}

impl ServerTlsArgs {
    /// The files as a [`ServerTlsFiles`].
    pub fn files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            trusted_ca_file: self.trusted_ca_file.clone(),
            client_cert_auth: self.client_cert_auth,
        }
    }
}

/// `--coordinator-cacert`, `--coordinator-cert`, `--coordinator-key`: how a service's
/// coordinator client dials TLS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// CA bundle (PEM) the coordinator's certificate is verified against; TLS is on when set.
    #[arg(long, env = "COORDINATOR_CACERT", value_name = "FILE")]
    pub coordinator_cacert: Option<PathBuf>,
    /// Client certificate (PEM) presented to the coordinator.
    #[arg(long, env = "COORDINATOR_CERT", value_name = "FILE")]
    pub coordinator_cert: Option<PathBuf>,
    /// Private key (PEM) of --coordinator-cert.
    #[arg(long, env = "COORDINATOR_KEY", value_name = "FILE")]
    pub coordinator_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The files as a [`ClientTlsFiles`].
    pub fn files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca_file: self.coordinator_cacert.clone(),
            cert_file: self.coordinator_cert.clone(),
            key_file: self.coordinator_key.clone(),
        }
    }

    /// The rustls client configuration, or `None` when TLS is off.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        let files = self.files();
        files.validate("--coordinator-").map_err(TlsError::Flags)?;
        files.client_config()
    }
}

/// `--client-cacert`, `--client-cert`, `--client-key`: how a service dials the platform's
/// other services (registry-svc, config-svc) over TLS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceClientTlsArgs {
    /// CA bundle (PEM) the certificates of registry-svc and config-svc are verified against;
    /// TLS to them is on when set.
    #[arg(long, env = "CLIENT_CACERT", value_name = "FILE")]
    pub client_cacert: Option<PathBuf>,
    /// Client certificate (PEM) presented to them.
    #[arg(long, env = "CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, env = "CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
}

impl ServiceClientTlsArgs {
    /// The files as a [`ClientTlsFiles`].
    pub fn files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca_file: self.client_cacert.clone(),
            cert_file: self.client_cert.clone(),
            key_file: self.client_key.clone(),
        }
    }

    /// The rustls client configuration, or `None` when TLS is off.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        let files = self.files();
        files.validate("--client-").map_err(TlsError::Flags)?;
        files.client_config()
    }
}

/// TLS connections accepted on a TCP listener, handshakes run concurrently (module docs).
pub struct TlsIncoming {
    rx: mpsc::Receiver<tokio_rustls::server::TlsStream<TcpStream>>,
    local_addr: SocketAddr,
}

impl TlsIncoming {
    /// Starts accepting on `listener` (inside a Tokio runtime). Accepting stops when this is
    /// dropped.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsIncoming> {
        let local_addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and alike: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(stream).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsIncoming { rx, local_addr })
    }

    /// The address accepted on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl futures::Stream for TlsIncoming {
    type Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|s| s.map(Ok))
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.recv().await {
                Some(stream) => {
                    let Ok(peer) = stream.get_ref().0.peer_addr() else {
                        continue;
                    };
                    return (stream, peer);
                }
                // The accept task ended (its runtime is shutting down): nothing more comes.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

/// Plain TCP connections of `listener` with `TCP_NODELAY` set, for tonic's
/// `serve_with_incoming` when TLS is off.
pub fn plain_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves a tonic `router` on `listener`, over TLS when `tls` is set, until `shutdown`.
/// Accepted connections get `TCP_NODELAY` either way.
pub async fn serve_tonic<L, ResBody>(
    router: tonic::transport::server::Router<L>,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()>
where
    L: tower::Layer<tonic::service::Routes>,
    L::Service: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(TlsIncoming::new(listener, tls)?, shutdown)
                .await?
        }
        None => {
            router
                .serve_with_incoming_shutdown(plain_incoming(listener), shutdown)
                .await?
        }
    }
    Ok(())
}

/// Serves an axum `router` on `listener`, over TLS when `tls` is set, until `shutdown`.
pub async fn serve_axum(
    router: axum::Router,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        Some(tls) => {
            axum::serve(TlsIncoming::new(listener, tls)?, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// The verified client chain of a TLS connection, from an HTTP request's extensions (what
/// `tonic::Request::peer_certs()` reads), for layers in front of tonic services.
pub fn peer_certs_of<B>(req: &http::Request<B>) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    req.extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
}

/// Dials TLS for tonic channels: TCP to the URI's host and port, then a handshake that checks
/// the server's certificate for that host.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
}

impl TlsConnector {
    /// A connector using `config`.
    pub fn new(config: Arc<ClientConfig>) -> TlsConnector {
        TlsConnector { config }
    }
}

type ConnectFuture = Pin<
    Box<
        dyn Future<
                Output = std::io::Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                >,
            > + Send,
    >,
>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} has no host")))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(host.clone())
                .map_err(|e| invalid(format!("{host:?} is not a server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// `url` with an `https://` scheme written `http://`: tonic refuses `https` URIs on a channel
/// whose TLS it does not do itself, and [`TlsConnector`] does it.
pub fn plain_scheme(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => format!("http://{rest}"),
        _ => url.to_owned(),
    }
}

/// A client's TCP connection to a server, over TLS or not: what [`HttpsConnector`] yields
/// (`http://` plain, `https://` TLS), and the gateway's connections to its backends (plain, or
/// TLS for routes with `backend.tls`). Plain connections stay unboxed and reads and writes go
/// straight to the socket (vectored writes included), so the plain path costs one branch.
#[derive(Debug)]
pub enum MaybeTlsStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, the server's certificate verified (boxed: the session state is large).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl MaybeTlsStream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTlsStream::Plain(tcp) => tcp,
            MaybeTlsStream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// The application protocol the TLS handshake agreed on (ALPN), if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match self {
            MaybeTlsStream::Plain(_) => None,
            MaybeTlsStream::Tls(tls) => tls.get_ref().1.alpn_protocol(),
        }
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTlsStream::Tls(_))
    }
}

impl hyper_util::client::legacy::connect::Connection for MaybeTlsStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let connected = hyper_util::client::legacy::connect::Connection::connected(self.tcp());
        match self {
            MaybeTlsStream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(&b"h2"[..]) => {
                connected.negotiated_h2()
            }
            _ => connected,
        }
    }
}

impl tokio::io::AsyncRead for MaybeTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for MaybeTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTlsStream::Plain(s) => s.is_write_vectored(),
            MaybeTlsStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A connector for hyper's HTTP/1.1 client (`hyper_util::client::legacy::Client`) that dials
/// `http://` URLs over plain TCP and `https://` URLs over TLS, checking the server's certificate
/// for the URL's host against the configured CA and presenting the client certificate when one
/// is configured (ALPN offers `http/1.1` only). An `https://` URL without a TLS configuration
/// fails to connect, saying so; so does any connection not made within the connect timeout.
#[derive(Clone)]
pub struct HttpsConnector {
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
}

impl HttpsConnector {
    /// A connector using `tls` (from [`ClientTlsFiles::client_config`]) for `https://` URLs;
    /// each connection (TCP and handshake) must be made within `connect_timeout`.
    pub fn new(tls: Option<Arc<ClientConfig>>, connect_timeout: Duration) -> HttpsConnector {
        let tls = tls.map(|config| {
            let mut config = (*config).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        });
        HttpsConnector {
            tls,
            connect_timeout,
        }
    }
}

impl tower::Service<http::Uri> for HttpsConnector {
    type Response = hyper_util::rt::TokioIo<MaybeTlsStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let https = match uri.scheme_str() {
                Some("https") => true,
                Some("http") => false,
                other => return Err(invalid(format!("{uri}: unsupported scheme {other:?}"))),
            };
            let tls = match (https, &this.tls) {
                (true, None) => {
                    return Err(invalid(format!(
                        "{uri} is https:// but no CA to check its certificate against was given"
                    )));
                }
                (true, Some(tls)) => Some(tls.clone()),
                (false, _) => None,
            };
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} has no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                match tls {
                    None => Ok(MaybeTlsStream::Plain(tcp)),
                    Some(tls) => {
                        let name = ServerName::try_from(host.clone())
                            .map_err(|e| invalid(format!("{host:?} is not a server name: {e}")))?;
                        let stream = tls.connect(name, tcp).await?;
                        Ok(MaybeTlsStream::Tls(Box::new(stream)))
                    }
                }
            };
            match tokio::time::timeout(this.connect_timeout, connect).await {
                Ok(stream) => stream.map(hyper_util::rt::TokioIo::new),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no connection to {host}:{port} within {:?}",
                        this.connect_timeout
                    ),
                )),
            }
        })
    }
}

/// A lazily connecting channel for `endpoint`: over TLS with `tls`, plain TCP without.
/// With TLS the endpoint's URI must use `http://` ([`plain_scheme`]).
pub fn lazy_channel(
    endpoint: tonic::transport::Endpoint,
    tls: Option<&Arc<ClientConfig>>,
) -> tonic::transport::Channel {
    match tls {
        Some(config) => endpoint.connect_with_connector_lazy(TlsConnector::new(config.clone())),
        None => endpoint.connect_lazy(),
    }
}

/// The names a certificate carries: subject CNs, then DNS and IP subject alternative names.
/// Empty for a certificate that cannot be parsed.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                        names.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                        names.push(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    names
}

/// The subject common name of a certificate (etcd's user name for `--client-cert-auth`).
pub fn cert_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok().map(str::to_owned))
}

/// The host of a URL (`https://host:port/…` → `host`, brackets of IPv6 removed).
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_are_found_in_every_form() {
        assert_eq!(url_host("https://n1.local:2380"), Some("n1.local"));
        assert_eq!(url_host("http://127.0.0.1:2380/"), Some("127.0.0.1"));
        assert_eq!(url_host("https://[::1]:2380"), Some("::1"));
        assert_eq!(url_host("host:1"), Some("host"));
        assert_eq!(url_host("https://:1"), None);
    }

    #[test]
    fn https_becomes_http_for_tonic() {
        assert_eq!(plain_scheme("https://a:1"), "http://a:1");
        assert_eq!(plain_scheme("HTTPS://a:1"), "http://a:1");
        assert_eq!(plain_scheme("http://a:1"), "http://a:1");
        assert_eq!(plain_scheme("a:1"), "a:1");
    }

    #[test]
    fn server_flags_that_do_not_fit_are_refused() {
        let f = ServerTlsFiles {
            cert_file: Some("c".into()),
            ..Default::default()
        };
        assert!(
            f.validate("peer-")
                .expect_err("no key")
                .contains("--peer-key-file")
        );
        let f = ServerTlsFiles {
            cert_file: Some("c".into()),
            key_file: Some("k".into()),
            client_cert_auth: true,
            ..Default::default()
        };
        assert!(
            f.validate("")
                .expect_err("no CA")
                .contains("--trusted-ca-file")
        );
        let f = ClientTlsFiles {
            cert_file: Some("c".into()),
            key_file: Some("k".into()),
            ..Default::default()
        };
        assert!(
            f.validate("--coordinator-")
                .expect_err("no CA")
                .contains("--coordinator-cacert")
        );
    }
}
