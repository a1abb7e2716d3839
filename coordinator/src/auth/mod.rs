//! Authentication and role-based access control, compatible with etcd v3's.
//!
//! # Model (etcd's)
//! Users hold roles; roles hold key permissions (READ, WRITE, READWRITE on a key, a range or
//! everything from a key on). The user `root` with the role `root` may do everything and must
//! exist before `auth enable`. While auth is disabled every request is allowed, tokens or not.
//! While it is enabled every request names its user by a token (gRPC metadata `token`, as
//! etcd's clients send it, obtained from `Authenticate`); a request without one is refused with
//! `etcdserver: user name is empty`, a bad or expired token with `etcdserver: invalid auth
//! token`, a request outside the user's permissions with `etcdserver: permission denied`.
//!
//! # Parts
//! - [`store`]: the replicated state (users, roles, auth revision) and its commands.
//! - [`perm`]: permissions merged into intervals per user, and the check of every leaf of a
//!   request (each compare and op of a txn, both branches, nested ones; `prev_kv`; lease keys).
//! - [`token`]: simple and JWT tokens.
//! - this module: [`AuthShared`] (what `apply` publishes), [`Gate`] (what the gRPC adapters ask:
//!   who is calling, and may they) and password hashing.
//!
//! # Where checks happen
//! At the door: each adapter asks the [`Gate`] for the [`Caller`] and checks the request
//! before anything else (reads are answered only if allowed). Writes are checked *again* when
//! applied: a write proposed on a user's behalf travels as `Command::AsUser`, and `apply`
//! checks it against the auth state at that point of the log, so a permission revoked while the
//! write was in flight is still enforced, identically on every member.
//!
//! # Cost
//! With auth disabled a request costs one atomic load ([`Gate::caller`]). With auth enabled:
//! a token is verified once (signature, expiry) and then cached by its SHA-256 until the auth
//! revision changes; permissions are merged once per auth revision ([`store::AuthView`]);
//! a check is a binary search per leaf.
//!
//! # Identity
//! [`Credentials`] are what a request presents: a token, or the verified client certificate's
//! common name with `--client-cert-auth` (etcd uses the CN when no token is given).
//! [`Gate::caller`] turns credentials into a [`Caller`]. The CN reaches the handlers as the
//! [`CERT_CN_HEADER`] metadata, which the client port's outermost layer
//! ([`crate::gateway::Split`]) removes from every request and sets only from the certificate
//! of the TLS connection, so a client cannot claim a name by sending the header.
//!
//! # Passwords
//! Hashed with Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes), salted, before a
//! command is proposed, so `apply` only stores the hash. At least [`MIN_PASSWORD_LEN`] bytes,
//! at most [`MAX_PASSWORD_LEN`]. Hashing and checking run on blocking threads, at most
//! [`HASH_CONCURRENCY`] at once, so a flood of `Authenticate` calls cannot starve the server.

pub mod perm;
pub mod store;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};

pub use perm::{Perm, PermKind, UserPerms};
pub use store::{AuthCmd, AuthState, AuthView, ROOT};
pub use token::TokenConfig;

use crate::command::Command;
use crate::error::{Error, Result};

/// Shortest password accepted, in bytes.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password accepted, in bytes.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Password hashes computed or checked at once.
pub const HASH_CONCURRENCY: usize = 2;
/// Verified tokens remembered (the cache is cleared when full or when the auth state changes).
const TOKEN_CACHE: usize = 8192;

/// The auth state as the request path sees it; published by `apply` after every auth change.
#[derive(Debug, Default)]
pub struct AuthShared {
    enabled: AtomicBool,
    revision: AtomicU64,
    view: RwLock<Arc<AuthView>>,
}

impl AuthShared {
    /// Publish a new view.
    pub fn publish(&self, view: AuthView) {
        let enabled = view.enabled;
        let revision = view.revision;
        *self.view.write() = Arc::new(view);
        self.revision.store(revision, Ordering::Release);
        self.enabled.store(enabled, Ordering::Release);
    }

    /// Whether auth is on (one atomic load).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// The auth revision published last (one atomic load).
    #[inline]
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// The current view.
    pub fn view(&self) -> Arc<AuthView> {
        self.view.read().clone()
    }
}

/// What a request presents to say who it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// The `token` metadata value.
    pub token: Option<&'a str>,
    /// Common name of a verified client certificate (with `--client-cert-auth`).
    pub cert_cn: Option<&'a str>,
}

/// The metadata key carrying the verified client certificate's CN (see the module docs).
pub const CERT_CN_HEADER: &str = "x-coordinator-client-cert-cn";

impl<'a> Credentials<'a> {
    /// Credentials of a gRPC request: the `token` metadata (etcd's clients), or an
    /// `authorization` header (etcd 3.5's gateway form); and the [`CERT_CN_HEADER`].
    pub fn from_metadata(md: &'a tonic::metadata::MetadataMap) -> Credentials<'a> {
        let token = md
            .get("token")
            .or_else(|| md.get("authorization"))
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty());
        let cert_cn = md
            .get(CERT_CN_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty());
        Credentials { token, cert_cn }
    }
}

/// Who is calling, as far as permissions go.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Auth is disabled: everything is allowed.
    Open,
    /// An authenticated user.
    User {
        /// Name.
        name: Arc<str>,
        /// Permissions at the current auth revision.
        perms: Arc<UserPerms>,
    },
}

fn lease_keys_none(_: i64) -> Vec<Vec<u8>> {
    Vec::new()
}

impl Caller {
    /// The user's permissions, or `None` when everything is allowed.
    #[inline]
    pub fn perms(&self) -> Option<&UserPerms> {
        match self {
            Caller::Open => None,
            Caller::User { perms, .. } => Some(perms),
        }
    }

    /// The user's name, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::User { name, .. } => Some(name),
        }
    }

    /// Root only (or auth disabled).
    pub fn root(&self) -> Result<()> {
        self.perms().map_or(Ok(()), |p| p.root())
    }

    /// Read permission on a range.
    pub fn read(&self, r: &crate::command::KeyRange) -> Result<()> {
        self.perms().map_or(Ok(()), |p| p.read(r))
    }

    /// Check a command at the door; `lease_keys` lists the keys a lease holds now.
    pub fn command(&self, cmd: &Command, lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>) -> Result<()> {
        self.perms().map_or(Ok(()), |p| p.command(cmd, lease_keys))
    }

    /// Check a txn that writes nothing (it is not proposed).
    pub fn read_txn(&self, t: &crate::command::TxnReq) -> Result<()> {
        self.perms().map_or(Ok(()), |p| p.txn(t, &lease_keys_none))
    }

    /// The command to propose: wrapped with the user's name when auth is on, so `apply`
    /// checks it again at its place in the log.
    pub fn wrap(&self, cmd: Command) -> Command {
        match self {
            Caller::Open => cmd,
            Caller::User { name, .. } => Command::AsUser {
                user: name.to_string(),
                cmd: Box::new(cmd),
            },
        }
    }
}

#[derive(Debug, Clone)]
struct CachedToken {
    user: Arc<str>,
    revision: u64,
    exp: u64,
}

/// What the gRPC adapters ask about auth. Cheap to share (`Arc`).
pub struct Gate {
    shared: Arc<AuthShared>,
    tokens: TokenConfig,
    /// (auth revision the entries were verified at, token SHA-256 → claims).
    cache: Mutex<(u64, HashMap<[u8; 32], CachedToken>)>,
    hashing: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("enabled", &self.shared.enabled())
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Gate {
    /// A gate over the published auth state.
    pub fn new(shared: Arc<AuthShared>, tokens: TokenConfig) -> Gate {
        Gate {
            shared,
            tokens,
            cache: Mutex::new((0, HashMap::new())),
            hashing: tokio::sync::Semaphore::new(HASH_CONCURRENCY),
        }
    }

    /// Whether auth is on (one atomic load).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.shared.enabled()
    }

    /// The published view.
    pub fn view(&self) -> Arc<AuthView> {
        self.shared.view()
    }

    /// The published auth revision (one atomic load): a reader that waited for a read
    /// barrier compares it with the one it checked against, and checks again if it moved.
    #[inline]
    pub fn revision(&self) -> u64 {
        self.shared.revision()
    }

    /// Token settings.
    pub fn tokens(&self) -> &TokenConfig {
        &self.tokens
    }

    /// Who calls with these credentials. With auth disabled: [`Caller::Open`], at the cost of
    /// one atomic load.
    #[inline]
    pub fn caller(&self, creds: Credentials<'_>) -> Result<Caller> {
        if !self.shared.enabled() {
            return Ok(Caller::Open);
        }
        self.caller_slow(creds)
    }

    /// Who calls this gRPC request.
    #[inline]
    pub fn caller_of<T>(&self, req: &tonic::Request<T>) -> Result<Caller> {
        if !self.shared.enabled() {
            return Ok(Caller::Open);
        }
        self.caller_slow(Credentials::from_metadata(req.metadata()))
    }

    fn caller_slow(&self, creds: Credentials<'_>) -> Result<Caller> {
        let view = self.shared.view();
        if !view.enabled {
            return Ok(Caller::Open);
        }
        let (name, issued_at): (Arc<str>, u64) = match (creds.token, creds.cert_cn) {
            (Some(token), _) => {
                let c = self.verify(&view, token)?;
                (c.user, c.revision)
            }
            // A client certificate's CN names the user when no token is given (etcd's rule).
            (None, Some(cn)) => (Arc::from(cn), u64::MAX),
            (None, None) => return Err(Error::UserEmpty),
        };
        let Some((perms, cred_rev)) = view.user(&name) else {
            // Deleted since the token was issued.
            return Err(Error::InvalidAuthToken);
        };
        if issued_at < *cred_rev {
            // Issued before the user was re-created or changed password.
            return Err(Error::InvalidAuthToken);
        }
        Ok(Caller::User {
            name,
            perms: perms.clone(),
        })
    }

    fn verify(&self, view: &AuthView, token: &str) -> Result<CachedToken> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = token::now_secs();
        {
            let mut c = self.cache.lock();
            if c.0 != view.revision {
                c.0 = view.revision;
                c.1.clear();
            }
            if let Some(t) = c.1.get(&digest) {
                if t.exp > now {
                    return Ok(t.clone());
                }
                c.1.remove(&digest);
                return Err(Error::InvalidAuthToken);
            }
        }
        let claims = self.tokens.verify(&view.secret, token)?;
        let t = CachedToken {
            user: Arc::from(claims.username.as_str()),
            revision: claims.revision,
            exp: claims.exp,
        };
        let mut c = self.cache.lock();
        if c.0 == view.revision {
            if c.1.len() >= TOKEN_CACHE {
                c.1.clear();
            }
            c.1.insert(digest, t.clone());
        }
        Ok(t)
    }

    /// Issue a token for a user whose password was checked.
    pub fn issue(&self, view: &AuthView, user: &str) -> Result<String> {
        self.tokens.issue(&view.secret, user, view.revision)
    }

    /// Hash a password (on a blocking thread, at most [`HASH_CONCURRENCY`] at once).
    pub async fn hash_password(&self, password: String) -> Result<String> {
        check_password(&password)?;
        let _permit = self.hashing.acquire().await.map_err(|_| Error::Stopped)?;
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| Error::InvalidArgument(format!("password hashing failed: {e}")))?
    }

    /// Check a password against a stored hash (`None`: the user does not exist or has no
    /// password; a hash is still computed so that the answer takes as long).
    pub async fn check_password(&self, password: String, hash: Option<String>) -> Result<bool> {
        let _permit = self.hashing.acquire().await.map_err(|_| Error::Stopped)?;
        tokio::task::spawn_blocking(move || match hash {
            Some(h) => verify_password(&password, &h),
            None => {
                let _ = hash_password("timing-equaliser");
                false
            }
        })
        .await
        .map_err(|e| Error::InvalidArgument(format!("password check failed: {e}")))
    }
}

/// Refuse passwords outside the length limits.
pub fn check_password(password: &str) -> Result<()> {
    if password.len() < MIN_PASSWORD_LEN {
        return Err(Error::InvalidArgument(format!(
            "password is too short (at least {MIN_PASSWORD_LEN} bytes)"
        )));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(Error::InvalidArgument(format!(
            "password is too long (at most {MAX_PASSWORD_LEN} bytes)"
        )));
    }
    Ok(())
}

/// Argon2id hash of a password, as a PHC string.
pub fn hash_password(password: &str) -> Result<String> {
    use argon2::PasswordHasher;
    let salt_bytes: [u8; 16] = rand::random();
    let salt = argon2::password_hash::SaltString::encode_b64(&salt_bytes)
        .map_err(|e| Error::InvalidArgument(format!("salt: {e}")))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::InvalidArgument(format!("password hashing failed: {e}")))
}

/// Whether `password` matches a PHC hash made by [`hash_password`] (the comparison inside is
/// constant-time).
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::PasswordVerifier;
    match argon2::password_hash::PasswordHash::new(hash) {
        Ok(h) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// A 32-byte random secret for simple tokens.
pub fn new_secret() -> Vec<u8> {
    let s: [u8; 32] = rand::random();
    s.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct hors", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(check_password("short").is_err());
        assert!(check_password("long enough").is_ok());
    }

    fn gate_with(state: &mut AuthState) -> Gate {
        let shared = Arc::new(AuthShared::default());
        shared.publish(state.view());
        Gate::new(shared, TokenConfig::default())
    }

    /// The request path's cost: one atomic load while auth is off; a cached token lookup and a
    /// binary search while it is on. Bounds are loose (debug build, shared machine); the
    /// figures are printed.
    #[test]
    fn checks_are_cheap_off_and_on() {
        use crate::command::KeyRange;
        let mut st = AuthState::default();
        let gate = gate_with(&mut st);
        let key = KeyRange::single(b"app/k".to_vec());
        const N: u32 = 100_000;
        let t = std::time::Instant::now();
        for _ in 0..N {
            let c = gate.caller(Credentials::default()).expect("open");
            c.read(&key).expect("allowed");
        }
        let off = t.elapsed() / N;
        for c in [
            AuthCmd::UserAdd {
                name: ROOT.into(),
                hash: Some("h".into()),
            },
            AuthCmd::UserGrantRole {
                user: ROOT.into(),
                role: ROOT.into(),
            },
            AuthCmd::RoleAdd { name: "r".into() },
            AuthCmd::UserAdd {
                name: "u".into(),
                hash: Some("h".into()),
            },
            AuthCmd::UserGrantRole {
                user: "u".into(),
                role: "r".into(),
            },
            AuthCmd::Enable {
                secret: new_secret(),
            },
        ] {
            st.apply(&c).expect("apply");
        }
        // A role with many permissions: the check stays a binary search.
        for i in 0..200 {
            st.apply(&AuthCmd::RoleGrantPermission {
                role: "r".into(),
                perm: Perm {
                    kind: PermKind::ReadWrite,
                    key: format!("app{i:03}/").into_bytes(),
                    end: format!("app{i:03}0").into_bytes(),
                },
            })
            .expect("grant");
        }
        gate.shared.publish(st.view());
        let token = gate.issue(&gate.view(), "u").expect("issue");
        let creds = Credentials {
            token: Some(&token),
            cert_cn: None,
        };
        let key = KeyRange::single(b"app150/k".to_vec());
        let t = std::time::Instant::now();
        for _ in 0..N / 10 {
            let c = gate.caller(creds).expect("user");
            c.read(&key).expect("allowed");
        }
        let on = t.elapsed() / (N / 10);
        println!("per request: auth off {off:?}, auth on (cached token, 200 permissions) {on:?}");
        assert!(
            off < std::time::Duration::from_micros(2),
            "auth off costs {off:?}"
        );
        assert!(
            on < std::time::Duration::from_micros(100),
            "auth on costs {on:?}"
        );
    }

    #[test]
    fn callers_follow_tokens_and_credential_changes() {
        let mut st = AuthState::default();
        let gate = gate_with(&mut st);
        assert!(matches!(
            gate.caller(Credentials::default()),
            Ok(Caller::Open)
        ));
        for c in [
            AuthCmd::UserAdd {
                name: ROOT.into(),
                hash: Some("h".into()),
            },
            AuthCmd::UserGrantRole {
                user: ROOT.into(),
                role: ROOT.into(),
            },
            AuthCmd::UserAdd {
                name: "u".into(),
                hash: Some("h".into()),
            },
            AuthCmd::Enable {
                secret: new_secret(),
            },
        ] {
            st.apply(&c).expect("apply");
        }
        gate.shared.publish(st.view());
        assert!(matches!(
            gate.caller(Credentials::default()),
            Err(Error::UserEmpty)
        ));
        let token = gate.issue(&gate.view(), "u").expect("issue");
        let creds = Credentials {
            token: Some(&token),
            cert_cn: None,
        };
        assert_eq!(gate.caller(creds).expect("caller").name(), Some("u"));
        // A password change invalidates tokens issued before it.
        st.apply(&AuthCmd::UserChangePassword {
            name: "u".into(),
            hash: "h2".into(),
        })
        .expect("passwd");
        gate.shared.publish(st.view());
        assert!(matches!(gate.caller(creds), Err(Error::InvalidAuthToken)));
        let bad = Credentials {
            token: Some("garbage"),
            cert_cn: None,
        };
        assert!(matches!(gate.caller(bad), Err(Error::InvalidAuthToken)));
    }
}
