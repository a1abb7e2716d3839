//! Who is calling, and may they do this: authentication and per-namespace authorisation for
//! the platform's services (registry-svc and config-svc use it; the coordinator has etcd's own).
//!
//! # Authentication
//! A caller proves who it is in one of the ways `--auth-mode` accepts (comma-separated to accept
//! several):
//! - `token`: a static bearer token from `--auth-tokens-file`, one `TOKEN SUBJECT` pair per line
//!   (`#` starts a comment). For development and tests. Tokens are kept only as SHA-256 digests
//!   and compared in constant time, each against every entry.
//! - `jwt`: a bearer JWT checked against `--auth-jwt-key-file` with `--auth-jwt-alg` (HS256: the
//!   file's bytes are the secret, at least 32, a trailing newline dropped; RS256/ES256: a PEM
//!   public key). `sub` names the caller; `exp` is required, `nbf` checked when present (no
//!   leeway); `iss`/`aud` checked when `--auth-jwt-issuer`/`--auth-jwt-audience` are set.
//! - `mtls`: the client certificate of a TLS connection (see [`subject_from_cert`]): its first
//!   DNS or URI SAN, else its subject CN.
//!
//! Bearer tokens arrive as `Authorization: Bearer <token>` (HTTP header or gRPC metadata). A
//! request that carries a bearer token is judged by it alone (a bad token is not rescued by a
//! client certificate).
//!
//! # Authorisation
//! A policy file (`--auth-policy-file`, TOML) gives roles per-namespace permissions and subjects
//! roles, in the spirit of etcd's roles:
//!
//! ```toml
//! [roles]
//! reader = { "team-*" = "read" }   # "team-*": every namespace starting with "team-"
//! writer = { "team-*" = "write" }
//! root   = { "*" = "admin" }       # "*": every namespace
//!
//! [subjects]
//! alice = ["writer"]
//! lb-gateway = ["reader"]
//! ops = ["root"]
//! "*" = []                         # roles every authenticated caller has
//! ```
//!
//! `admin` implies `write`, which implies `read`. Which operation needs which permission is the
//! service's business (each documents its table); each service checks it in one place, at the
//! top of its core operations, which take the caller's [`Identity`].
//!
//! # Defaults and caveats
//! - No `--auth-mode` (or `none`): authentication is off, every caller is [`Identity::anonymous`]
//!   and may do everything, as before this module existed. The compose stack runs this way.
//! - Denials are logged at `warn` with the subject, how it was proven, the action and the
//!   namespace; never a token. Unauthenticated requests are logged with the reason and the peer.
//! - The policy and token files are read at start; a change needs a restart.
//! - Bearer tokens travel in clear text unless the listener serves TLS.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What a caller may do in a namespace; each level implies the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Read: discover, get, list, watch, history, diff.
    Read,
    /// Write: register, heartbeat, publish, delete, ….
    Write,
    /// Administer: settings that change how a namespace behaves, destructive purges.
    Admin,
}

impl Permission {
    /// `read`, `write` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A way of authenticating, as `--auth-mode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Authentication off: everyone may do everything.
    None,
    /// Static bearer tokens from `--auth-tokens-file`.
    Token,
    /// Bearer JWTs checked with `--auth-jwt-key-file`.
    Jwt,
    /// The TLS client certificate.
    Mtls,
}

/// JWT signature algorithms accepted by `--auth-jwt-alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum JwtAlg {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256, public key in PEM.
    Rs256,
    /// ECDSA P-256 with SHA-256, public key in PEM.
    Es256,
}

/// How an [`Identity`] was proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// Nothing: authentication is off.
    Anonymous,
    /// A static token from the tokens file.
    StaticToken,
    /// A verified JWT.
    Jwt,
    /// A TLS client certificate.
    ClientCert,
}

impl Proof {
    /// `anonymous`, `token`, `jwt` or `mtls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proof::Anonymous => "anonymous",
            Proof::StaticToken => "token",
            Proof::Jwt => "jwt",
            Proof::ClientCert => "mtls",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Who: the token's subject, the JWT's `sub`, the certificate's SAN or CN.
    pub subject: String,
    /// How it was proven.
    pub proof: Proof,
}

impl Identity {
    /// The caller when authentication is off.
    pub fn anonymous() -> Identity {
        Identity {
            subject: "anonymous".into(),
            proof: Proof::Anonymous,
        }
    }
}

/// Why a request was refused. Services map it to their own error enum (gRPC
/// `UNAUTHENTICATED` / `PERMISSION_DENIED`, HTTP 401 / 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials that do not prove anything.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
}

/// The authentication flags every service shares (flatten into its `Config`).
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// How callers authenticate: none (default: auth off, everyone may do everything), token,
    /// jwt, mtls; comma-separated to accept several.
    #[arg(
        long,
        env = "AUTH_MODE",
        value_enum,
        value_delimiter = ',',
        default_value = "none",
        value_name = "MODES"
    )]
    pub auth_mode: Vec<AuthMode>,

    /// TOML file mapping subjects to roles and roles to per-namespace permissions (required
    /// when auth is on).
    #[arg(long, env = "AUTH_POLICY_FILE", value_name = "FILE")]
    pub auth_policy_file: Option<PathBuf>,

    /// File of static bearer tokens, one `TOKEN SUBJECT` per line (for `--auth-mode token`).
    #[arg(long, env = "AUTH_TOKENS_FILE", value_name = "FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Key that JWTs are checked with (for `--auth-mode jwt`): the HS256 secret, or a PEM public
    /// key for RS256/ES256.
    #[arg(long, env = "AUTH_JWT_KEY_FILE", value_name = "FILE")]
    pub auth_jwt_key_file: Option<PathBuf>,

    /// JWT signature algorithm.
    #[arg(
        long,
        env = "AUTH_JWT_ALG",
        value_enum,
        ignore_case = true,
        default_value = "HS256"
    )]
    pub auth_jwt_alg: JwtAlg,

    /// Required `iss` claim of JWTs (not checked when empty).
    #[arg(long, env = "AUTH_JWT_ISSUER", default_value = "", value_name = "ISS")]
    pub auth_jwt_issuer: String,

    /// Required `aud` claim of JWTs (not checked when empty).
    #[arg(
        long,
        env = "AUTH_JWT_AUDIENCE",
        default_value = "",
        value_name = "AUD"
    )]
    pub auth_jwt_audience: String,
}

impl AuthArgs {
    /// Whether any mode other than `none` is on.
    pub fn enabled(&self) -> bool {
        self.auth_mode.iter().any(|m| *m != AuthMode::None)
    }

    /// Checks the flags and reads the files they name.
    pub fn validate(&self) -> Result<(), String> {
        Auth::from_args(self).map(drop)
    }

    /// The modes as written (`token,jwt`), for the startup log line.
    pub fn modes(&self) -> String {
        let names: Vec<&str> = self
            .auth_mode
            .iter()
            .map(|m| match m {
                AuthMode::None => "none",
                AuthMode::Token => "token",
                AuthMode::Jwt => "jwt",
                AuthMode::Mtls => "mtls",
            })
            .collect();
        names.join(",")
    }
}

/// One grant of a role: a namespace pattern and a permission.
#[derive(Debug, Clone)]
struct Grant {
    pattern: String,
    permission: Permission,
}

impl Grant {
    fn matches(&self, namespace: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => namespace.starts_with(prefix),
            None => self.pattern == namespace,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    roles: BTreeMap<String, BTreeMap<String, Permission>>,
    #[serde(default)]
    subjects: BTreeMap<String, Vec<String>>,
}

/// Subjects → roles → per-namespace permissions (see the module docs for the file format).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Each subject's grants, roles already resolved; `"*"` holds everyone's.
    grants: BTreeMap<String, Vec<Grant>>,
}

impl Policy {
    /// Parses the TOML text of a policy file. Unknown roles and patterns with `*` anywhere but
    /// at the end are errors.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for pattern in file.roles.values().flat_map(|r| r.keys()) {
            if pattern.is_empty() || pattern.trim_end_matches('*').contains('*') {
                return Err(format!(
                    "namespace pattern {pattern:?}: use a name, a prefix ending in '*', or '*'"
                ));
            }
        }
        let mut grants = BTreeMap::new();
        for (subject, roles) in file.subjects {
            let mut list = Vec::new();
            for role in roles {
                let Some(perms) = file.roles.get(&role) else {
                    return Err(format!(
                        "subject {subject:?} has role {role:?}, which [roles] does not define"
                    ));
                };
                list.extend(perms.iter().map(|(pattern, permission)| Grant {
                    pattern: pattern.clone(),
                    permission: *permission,
                }));
            }
            grants.insert(subject, list);
        }
        Ok(Policy { grants })
    }

    /// The highest permission `subject` has in `namespace`, if any.
    pub fn permission(&self, subject: &str, namespace: &str) -> Option<Permission> {
        [subject, "*"]
            .iter()
            .filter_map(|s| self.grants.get(*s))
            .flatten()
            .filter(|g| g.matches(namespace))
            .map(|g| g.permission)
            .max()
    }
}

/// Static tokens, kept as SHA-256 digests.
#[derive(Default)]
struct TokenList {
    entries: Vec<([u8; 32], String)>,
}

impl TokenList {
    fn parse(text: &str) -> Result<TokenList, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(subject), None) = (parts.next(), parts.next(), parts.next())
            else {
                // The line is not echoed: it holds a token.
                return Err(format!("line {}: expected `TOKEN SUBJECT`", n + 1));
            };
            entries.push((digest(token), subject.to_owned()));
        }
        Ok(TokenList { entries })
    }

    /// The subject of `token`; every entry is compared, in constant time each.
    fn lookup(&self, token: &str) -> Option<&str> {
        let presented = digest(token);
        let mut found = None;
        for (d, subject) in &self.entries {
            let diff = d
                .iter()
                .zip(presented.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(subject.as_str());
            }
        }
        found
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Deserialize)]
struct JwtClaims {
    sub: String,
}

struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl JwtVerifier {
    fn load(args: &AuthArgs) -> Result<JwtVerifier, String> {
        let path = args
            .auth_jwt_key_file
            .as_deref()
            .ok_or("--auth-mode jwt needs --auth-jwt-key-file")?;
        let bytes = read(path, "--auth-jwt-key-file")?;
        let bad = |e: jsonwebtoken::errors::Error| {
            format!(
                "--auth-jwt-key-file {}: not a PEM public key: {e}",
                path.display()
            )
        };
        let (alg, key) = match args.auth_jwt_alg {
            JwtAlg::Hs256 => {
                let mut secret = bytes.as_slice();
                while let [rest @ .., b'\n' | b'\r'] = secret {
                    secret = rest;
                }
                if secret.len() < 32 {
                    return Err(format!(
                        "--auth-jwt-key-file {}: an HS256 secret needs at least 32 bytes",
                        path.display()
                    ));
                }
                (Algorithm::HS256, DecodingKey::from_secret(secret))
            }
            JwtAlg::Rs256 => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(&bytes).map_err(bad)?,
            ),
            JwtAlg::Es256 => (
                Algorithm::ES256,
                DecodingKey::from_ec_pem(&bytes).map_err(bad)?,
            ),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if args.auth_jwt_audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&args.auth_jwt_audience]);
        }
        if !args.auth_jwt_issuer.is_empty() {
            validation.set_issuer(&[&args.auth_jwt_issuer]);
        }
        Ok(JwtVerifier { key, validation })
    }

    fn verify(&self, token: &str) -> Result<String, String> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            jsonwebtoken::decode::<JwtClaims>(token, &self.key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => "the JWT has expired",
                    ErrorKind::ImmatureSignature => "the JWT is not valid yet (nbf)",
                    ErrorKind::InvalidSignature => "the JWT's signature does not verify",
                    ErrorKind::InvalidAlgorithm => "the JWT is signed with another algorithm",
                    ErrorKind::InvalidAudience => "the JWT is for another audience",
                    ErrorKind::InvalidIssuer => "the JWT is from another issuer",
                    ErrorKind::MissingRequiredClaim(_) => "the JWT lacks exp or sub",
                    _ => "the bearer token is not a valid JWT",
                }
                .to_owned()
            })?;
        if data.claims.sub.is_empty() {
            return Err("the JWT's sub is empty".into());
        }
        Ok(data.claims.sub)
    }
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// Authentication and policy together, built once at start and shared by a service's faces.
pub struct Auth {
    enabled: bool,
    tokens: Option<TokenList>,
    jwt: Option<JwtVerifier>,
    mtls: bool,
    policy: Policy,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.enabled)
            .field("tokens", &self.tokens.as_ref().map(|t| t.entries.len()))
            .field("jwt", &self.jwt.is_some())
            .field("mtls", &self.mtls)
            .finish()
    }
}

impl Auth {
    /// Authentication off: everyone is [`Identity::anonymous`] and may do everything.
    pub fn disabled() -> Arc<Auth> {
        Arc::new(Auth {
            enabled: false,
            tokens: None,
            jwt: None,
            mtls: false,
            policy: Policy::default(),
        })
    }

    /// Builds from the flags, reading the files they name.
    pub fn from_args(args: &AuthArgs) -> Result<Arc<Auth>, String> {
        if !args.enabled() {
            return Ok(Auth::disabled());
        }
        if args.auth_mode.contains(&AuthMode::None) {
            return Err("--auth-mode none cannot be combined with other modes".into());
        }
        let policy_path = args
            .auth_policy_file
            .as_deref()
            .ok_or("auth is on (--auth-mode) but --auth-policy-file is not set")?;
        let text = read(policy_path, "--auth-policy-file")?;
        let policy = Policy::parse(&String::from_utf8_lossy(&text))
            .map_err(|e| format!("--auth-policy-file {}: {e}", policy_path.display()))?;
        let tokens = if args.auth_mode.contains(&AuthMode::Token) {
            let path = args
                .auth_tokens_file
                .as_deref()
                .ok_or("--auth-mode token needs --auth-tokens-file")?;
            let text = read(path, "--auth-tokens-file")?;
            Some(
                TokenList::parse(&String::from_utf8_lossy(&text))
                    .map_err(|e| format!("--auth-tokens-file {}: {e}", path.display()))?,
            )
        } else {
            None
        };
        let jwt = if args.auth_mode.contains(&AuthMode::Jwt) {
            Some(JwtVerifier::load(args)?)
        } else {
            None
        };
        Ok(Arc::new(Auth {
            enabled: true,
            tokens,
            jwt,
            mtls: args.auth_mode.contains(&AuthMode::Mtls),
            policy,
        }))
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Who is calling, from the `Authorization` header (or gRPC metadata) and the TLS client
    /// certificate (DER, leaf first) if the connection has one. `peer` (the remote address, or
    /// whatever names the connection) is only logged.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        client_cert: Option<&[u8]>,
        peer: &dyn fmt::Display,
    ) -> Result<Identity, AuthError> {
        if !self.enabled {
            return Ok(Identity::anonymous());
        }
        let result = self.authenticate_inner(authorization, client_cert);
        if let Err(e) = &result {
            tracing::warn!(peer = %peer, reason = %e, "unauthenticated request refused");
        }
        result
    }

    fn authenticate_inner(
        &self,
        authorization: Option<&[u8]>,
        client_cert: Option<&[u8]>,
    ) -> Result<Identity, AuthError> {
        let bearer_modes = self.tokens.is_some() || self.jwt.is_some();
        if let (Some(header), true) = (authorization, bearer_modes) {
            let token = std::str::from_utf8(header)
                .ok()
                .and_then(|h| {
                    let (scheme, token) = h.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    AuthError::Unauthenticated(
                        "the Authorization header is not `Bearer <token>`".into(),
                    )
                })?;
            if let Some(subject) = self.tokens.as_ref().and_then(|t| t.lookup(token)) {
                return Ok(Identity {
                    subject: subject.to_owned(),
                    proof: Proof::StaticToken,
                });
            }
            return match &self.jwt {
                Some(jwt) => jwt
                    .verify(token)
                    .map(|subject| Identity {
                        subject,
                        proof: Proof::Jwt,
                    })
                    .map_err(AuthError::Unauthenticated),
                None => Err(AuthError::Unauthenticated(
                    "the bearer token is not known".into(),
                )),
            };
        }
        if self.mtls
            && let Some(der) = client_cert
        {
            return subject_from_cert(der)
                .map(|subject| Identity {
                    subject,
                    proof: Proof::ClientCert,
                })
                .ok_or_else(|| {
                    AuthError::Unauthenticated(
                        "the client certificate names no subject (no SAN, no CN)".into(),
                    )
                });
        }
        let wanted = match (bearer_modes, self.mtls) {
            (true, true) => "send `Authorization: Bearer <token>` or a TLS client certificate",
            (true, false) => "send `Authorization: Bearer <token>`",
            _ => "connect with a TLS client certificate",
        };
        Err(AuthError::Unauthenticated(format!(
            "authentication required: {wanted}"
        )))
    }

    /// Whether `who` may do `action` in `namespace`, which needs `need`. Denials are logged.
    pub fn authorize(
        &self,
        who: &Identity,
        action: &str,
        namespace: &str,
        need: Permission,
    ) -> Result<(), AuthError> {
        if self.allows(who, namespace, need) {
            return Ok(());
        }
        tracing::warn!(
            subject = %who.subject,
            proof = who.proof.as_str(),
            action,
            namespace,
            need = need.as_str(),
            "permission denied"
        );
        Err(AuthError::PermissionDenied(format!(
            "{} may not {action} in namespace {namespace:?}: that needs {need} permission",
            who.subject
        )))
    }

    /// Whether `who` has `need` in `namespace` (no log; for filtering lists).
    pub fn allows(&self, who: &Identity, namespace: &str, need: Permission) -> bool {
        !self.enabled
            || self
                .policy
                .permission(&who.subject, namespace)
                .is_some_and(|p| p >= need)
    }
}

/// The gRPC side: a tonic interceptor that authenticates every call (bearer token in the
/// `authorization` metadata, or the TLS client certificate) and puts the caller's [`Identity`]
/// into the request's extensions, or refuses the call with `E`'s status (the service's own
/// error mapping). Handlers take it with `request.extensions().get::<Identity>()`.
pub struct GrpcAuth<E> {
    auth: Arc<Auth>,
    error: PhantomData<fn() -> E>,
}

impl<E> GrpcAuth<E> {
    /// An interceptor over `auth`.
    pub fn new(auth: Arc<Auth>) -> GrpcAuth<E> {
        GrpcAuth {
            auth,
            error: PhantomData,
        }
    }
}

impl<E> Clone for GrpcAuth<E> {
    fn clone(&self) -> Self {
        GrpcAuth::new(self.auth.clone())
    }
}

impl<E: From<AuthError> + Into<tonic::Status>> tonic::service::Interceptor for GrpcAuth<E> {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let peer = match req.remote_addr() {
            Some(addr) => format!("gRPC from {addr}"),
            None => "gRPC".to_owned(),
        };
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        // The verified chain of a TLS connection (end-entity first); none over plain TCP.
        let certs = req.peer_certs();
        let cert = certs.as_deref().and_then(|c| c.first()).map(|c| c.as_ref());
        match self.auth.authenticate(header, cert, &peer) {
            Ok(id) => {
                req.extensions_mut().insert(id);
                Ok(req)
            }
            Err(e) => Err(E::from(e).into()),
        }
    }
}

/// The token in a client's token file (`--registry-token-file` and alike): its first line,
/// trimmed, so a trailing newline is not part of it. `None` reads nothing and gives `""` (no
/// token). Errors name the file, never its content.
pub fn read_token_file(path: Option<&Path>) -> Result<String, String> {
    let Some(path) = path else {
        return Ok(String::new());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    Ok(token)
}

/// The client side: a tonic interceptor that sends `authorization: Bearer <token>` with every
/// call (nothing when empty). The registry and config client libraries take one, so services
/// can call them with auth on. Its `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// Sends `token`; an empty token sends nothing. Fails if the token is not visible ASCII.
    pub fn new(token: &str) -> Result<BearerToken, String> {
        let token = token.trim();
        if token.is_empty() {
            return Ok(BearerToken(None));
        }
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "the bearer token must be visible ASCII".to_owned())?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }

    /// Whether a token is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// The REST side: an axum middleware (`axum::middleware::from_fn_with_state(auth,
/// http_middleware::<Error>)`) that authenticates every request from its `Authorization`
/// header and puts the caller's [`Identity`] into its extensions (handlers take it with
/// `Extension<Identity>`), or answers `E`'s response (401 with the service's JSON body).
pub async fn http_middleware<E>(
    axum::extract::State(auth): axum::extract::State<Arc<Auth>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response
where
    E: From<AuthError> + axum::response::IntoResponse,
{
    let what = format!("{} {}", req.method(), req.uri().path());
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let certs = crate::tls::peer_certs_of(&req);
    let cert = certs.as_deref().and_then(|c| c.first()).map(|c| c.as_ref());
    match auth.authenticate(header, cert, &what) {
        Ok(id) => {
            req.extensions_mut().insert(id);
            next.run(req).await
        }
        Err(e) => E::from(e).into_response(),
    }
}

/// The subject a client certificate (DER) names: its first DNS or URI subjectAltName, else the
/// CN of its subject. `None` if it names neither or does not parse.
pub fn subject_from_cert(der: &[u8]) -> Option<String> {
    let cert = der::read(der)?.0; // Certificate ::= SEQUENCE { tbsCertificate, … }
    let (tbs, _) = der::read(cert.contents)?;
    let mut fields = tbs.contents;
    let mut items = Vec::new();
    while !fields.is_empty() {
        let (item, rest) = der::read(fields)?;
        items.push(item);
        fields = rest;
    }
    // [0] version (optional), serial, signature, issuer, validity, subject, spki, … [3] exts.
    let offset = usize::from(items.first()?.tag == 0xa0);
    let subject = items.get(offset + 4)?;
    let san = items
        .iter()
        .find(|i| i.tag == 0xa3)
        .and_then(|exts| der::san(exts.contents));
    san.or_else(|| der::common_name(subject.contents))
}

/// Just enough DER to find a certificate's subject CN and subjectAltName.
mod der {
    pub struct Item<'a> {
        pub tag: u8,
        pub contents: &'a [u8],
    }

    /// One TLV from the front of `input`, and what follows it.
    pub fn read(input: &[u8]) -> Option<(Item<'_>, &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (bytes, after) = rest.split_at(n);
            rest = after;
            bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        if rest.len() < len {
            return None;
        }
        let (contents, after) = rest.split_at(len);
        Some((Item { tag, contents }, after))
    }

    fn all(mut input: &[u8]) -> Option<Vec<Item<'_>>> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (item, rest) = read(input)?;
            out.push(item);
            input = rest;
        }
        Some(out)
    }

    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

    /// Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
    pub fn common_name(name: &[u8]) -> Option<String> {
        for rdn in all(name)? {
            for atv in all(rdn.contents)? {
                let parts = all(atv.contents)?;
                if let [oid, value] = parts.as_slice()
                    && oid.tag == 0x06
                    && oid.contents == OID_CN
                {
                    return std::str::from_utf8(value.contents).ok().map(str::to_owned);
                }
            }
        }
        None
    }

    /// [3] { SEQUENCE OF Extension { OID, critical BOOLEAN?, value OCTET STRING } }
    pub fn san(explicit: &[u8]) -> Option<String> {
        let (exts, _) = read(explicit)?;
        for ext in all(exts.contents)? {
            let parts = all(ext.contents)?;
            let (Some(oid), Some(value)) = (parts.first(), parts.last()) else {
                continue;
            };
            if oid.tag != 0x06 || oid.contents != OID_SAN {
                continue;
            }
            let (names, _) = read(value.contents)?;
            // GeneralName: [2] dNSName, [6] URI (both IA5String, implicit).
            return all(names.contents)?
                .into_iter()
                .find(|n| n.tag == 0x82 || n.tag == 0x86)
                .and_then(|n| std::str::from_utf8(n.contents).ok().map(str::to_owned));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [roles]
        reader = { "team-*" = "read" }
        writer = { "team-*" = "write", "shared" = "read" }
        root = { "*" = "admin" }
        [subjects]
        alice = ["reader"]
        bob = ["writer"]
        ops = ["root"]
        "*" = []
    "#;

    fn who(s: &str) -> Identity {
        Identity {
            subject: s.into(),
            proof: Proof::StaticToken,
        }
    }

    #[test]
    fn permissions_follow_roles_prefixes_and_imply_lower_levels() {
        let p = Policy::parse(POLICY).expect("policy");
        assert_eq!(p.permission("alice", "team-a"), Some(Permission::Read));
        assert_eq!(p.permission("alice", "other"), None);
        assert_eq!(p.permission("bob", "team-b"), Some(Permission::Write));
        assert_eq!(p.permission("bob", "shared"), Some(Permission::Read));
        assert_eq!(p.permission("ops", "anything"), Some(Permission::Admin));
        assert_eq!(p.permission("mallory", "team-a"), None);
        let auth = Auth {
            enabled: true,
            tokens: None,
            jwt: None,
            mtls: false,
            policy: p,
        };
        assert!(auth.allows(&who("bob"), "team-x", Permission::Read));
        assert!(!auth.allows(&who("bob"), "team-x", Permission::Admin));
        let e = auth
            .authorize(&who("alice"), "register", "team-a", Permission::Write)
            .expect_err("reader cannot write");
        assert!(matches!(e, AuthError::PermissionDenied(_)));
        assert!(
            e.to_string()
                .contains("alice may not register in namespace \"team-a\"")
        );
    }

    #[test]
    fn policies_with_unknown_roles_or_bad_patterns_are_refused() {
        let e = Policy::parse("[subjects]\nalice = [\"ghost\"]").expect_err("unknown role");
        assert!(e.contains("ghost"), "{e}");
        let e = Policy::parse("[roles]\nr = { \"a*b\" = \"read\" }").expect_err("bad pattern");
        assert!(e.contains("a*b"), "{e}");
        assert!(Policy::parse("[roles]\nr = { \"a\" = \"sudo\" }").is_err());
    }

    #[test]
    fn static_tokens_name_their_subject_and_bad_lines_do_not_echo_the_token() {
        let t = TokenList::parse("# dev tokens\ns3cret-a alice\n\ns3cret-b bob # comment\n")
            .expect("tokens");
        assert_eq!(t.lookup("s3cret-a"), Some("alice"));
        assert_eq!(t.lookup("s3cret-b"), Some("bob"));
        assert_eq!(t.lookup("s3cret-"), None);
        let e = TokenList::parse("lonely-secret-token")
            .err()
            .expect("no subject");
        assert!(!e.contains("lonely"), "{e}");
    }

    #[test]
    fn disabled_auth_lets_everyone_do_everything() {
        let auth = Auth::disabled();
        let id = auth.authenticate(None, None, &"test").expect("anonymous");
        assert_eq!(id, Identity::anonymous());
        auth.authorize(&id, "purge", "x", Permission::Admin)
            .expect("allowed");
    }

    #[test]
    fn client_certificates_name_their_first_san_else_their_cn() {
        // Self-signed, made with openssl: CN=cn-client with SAN DNS:svc.example, DNS:other.example;
        // and CN=cn-only without SAN.
        let san = include_bytes!("testdata/cert-san.der");
        let cn = include_bytes!("testdata/cert-cn.der");
        assert_eq!(subject_from_cert(san).as_deref(), Some("svc.example"));
        assert_eq!(subject_from_cert(cn).as_deref(), Some("cn-only"));
    }

    #[test]
    fn certificate_parser_refuses_garbage() {
        assert_eq!(subject_from_cert(b""), None);
        assert_eq!(subject_from_cert(&[0x30, 0x82, 0xff]), None);
        assert_eq!(
            subject_from_cert(&include_bytes!("testdata/cert-cn.der")[..200]),
            None
        );
    }
}
