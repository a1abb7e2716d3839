//! Auth tokens, as etcd's `--auth-token` chooses them.
//!
//! - `simple` (the default, as in etcd): an HS256 JWT signed with a 32-byte secret that the
//!   member taking `auth enable` draws and replicates with the command. Every member can check
//!   it, it survives restarts, and turning auth off and on again draws a new secret (so every
//!   older token dies). etcd's simple tokens are random strings kept in each member's memory;
//!   ours are opaque to clients in the same way.
//! - `jwt,priv-key=FILE,pub-key=FILE,sign-method=METHOD,ttl=5m`: a JWT signed with keys from
//!   files: `HS256/384/512` (the secret is `priv-key`'s bytes), `RS256/384/512`, `PS256/384/512`,
//!   `ES256/384` or `EdDSA` (PEM files). A member given only `pub-key` checks tokens but cannot
//!   issue them (Authenticate answers an error), as etcd allows.
//!
//! Claims are etcd's: `username`, `revision` (the auth revision when issued) and `exp`. A token
//! is valid until `exp`, while its user exists and has not changed password since `revision`.
//! Permissions are looked up at each request, so a permission change applies at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default token lifetime (etcd's `--auth-token-ttl` and the JWT default: 5 minutes).
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User name.
    pub username: String,
    /// Auth revision when issued.
    pub revision: u64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// How tokens are made and checked.
#[derive(Clone)]
pub enum TokenKind {
    /// HS256 with the replicated secret.
    Simple,
    /// A JWT with keys from files.
    Jwt {
        /// Signing method.
        alg: Algorithm,
        /// Signing key (absent on a verify-only member).
        enc: Option<EncodingKey>,
        /// Verifying key.
        dec: DecodingKey,
    },
}

/// Token settings (from `--auth-token` and `--auth-token-ttl`).
#[derive(Clone)]
pub struct TokenConfig {
    /// Kind and keys.
    pub kind: TokenKind,
    /// Lifetime of issued tokens.
    pub ttl: Duration,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        let kind = match &self.kind {
            TokenKind::Simple => "simple".to_string(),
            TokenKind::Jwt { alg, enc, .. } => {
                format!(
                    "jwt({alg:?}{})",
                    if enc.is_some() { "" } else { ", verify only" }
                )
            }
        };
        f.debug_struct("TokenConfig")
            .field("kind", &kind)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Default for TokenConfig {
    fn default() -> TokenConfig {
        TokenConfig {
            kind: TokenKind::Simple,
            ttl: DEFAULT_TTL,
        }
    }
}

fn parse_alg(s: &str) -> std::result::Result<Algorithm, String> {
    Ok(match s {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other => return Err(format!("unknown JWT sign-method {other:?}")),
    })
}

impl TokenConfig {
    /// Parse etcd's `--auth-token` value; `ttl` is `--auth-token-ttl` (a `ttl=` option of a jwt
    /// spec overrides it).
    pub fn parse(spec: &str, ttl: Duration) -> std::result::Result<TokenConfig, String> {
        let mut parts = spec.split(',').map(str::trim);
        let kind = parts.next().unwrap_or("");
        match kind {
            "simple" => {
                if let Some(extra) = parts.next() {
                    return Err(format!(
                        "--auth-token simple takes no options, got {extra:?}"
                    ));
                }
                Ok(TokenConfig {
                    kind: TokenKind::Simple,
                    ttl,
                })
            }
            "jwt" => {
                let (mut pubk, mut privk, mut method, mut ttl) = (None, None, None, ttl);
                for p in parts.filter(|p| !p.is_empty()) {
                    let (k, v) = p
                        .split_once('=')
                        .ok_or_else(|| format!("--auth-token option {p:?} is not key=value"))?;
                    match k {
                        "pub-key" => pubk = Some(v.to_string()),
                        "priv-key" => privk = Some(v.to_string()),
                        "sign-method" => method = Some(parse_alg(v)?),
                        "ttl" => ttl = service_kit::config::parse_duration(v)?,
                        other => return Err(format!("unknown --auth-token option {other:?}")),
                    }
                }
                let alg = method.ok_or("--auth-token jwt needs sign-method=")?;
                let read = |path: &str| {
                    std::fs::read(path).map_err(|e| format!("cannot read JWT key {path}: {e}"))
                };
                let (enc, dec) = match alg {
                    Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                        let path = privk.as_deref().ok_or("HMAC JWT needs priv-key=")?;
                        let secret = read(path)?;
                        if secret.len() < 32 {
                            return Err(format!(
                                "JWT HMAC key {path} is {} bytes; at least 32 are required",
                                secret.len()
                            ));
                        }
                        (
                            Some(EncodingKey::from_secret(&secret)),
                            DecodingKey::from_secret(&secret),
                        )
                    }
                    _ => {
                        let path = pubk.as_deref().ok_or("asymmetric JWT needs pub-key=")?;
                        let pem = read(path)?;
                        let bad = |e: jsonwebtoken::errors::Error| {
                            format!("bad JWT public key {path}: {e}")
                        };
                        let dec = match alg {
                            Algorithm::ES256 | Algorithm::ES384 => {
                                DecodingKey::from_ec_pem(&pem).map_err(bad)?
                            }
                            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem).map_err(bad)?,
                            _ => DecodingKey::from_rsa_pem(&pem).map_err(bad)?,
                        };
                        let enc = match privk {
                            None => None,
                            Some(path) => {
                                let pem = read(&path)?;
                                let bad = |e: jsonwebtoken::errors::Error| {
                                    format!("bad JWT private key {path}: {e}")
                                };
                                Some(match alg {
                                    Algorithm::ES256 | Algorithm::ES384 => {
                                        EncodingKey::from_ec_pem(&pem).map_err(bad)?
                                    }
                                    Algorithm::EdDSA => {
                                        EncodingKey::from_ed_pem(&pem).map_err(bad)?
                                    }
                                    _ => EncodingKey::from_rsa_pem(&pem).map_err(bad)?,
                                })
                            }
                        };
                        (enc, dec)
                    }
                };
                if ttl.is_zero() {
                    return Err("JWT ttl must be positive".into());
                }
                Ok(TokenConfig {
                    kind: TokenKind::Jwt { alg, enc, dec },
                    ttl,
                })
            }
            other => Err(format!(
                "--auth-token must be simple or jwt,..., not {other:?}"
            )),
        }
    }

    /// Issue a token for `username` at auth revision `revision`.
    pub fn issue(&self, secret: &[u8], username: &str, revision: u64) -> Result<String> {
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp: now_secs() + self.ttl.as_secs().max(1),
        };
        let (alg, key) = match &self.kind {
            TokenKind::Simple => (Algorithm::HS256, EncodingKey::from_secret(secret)),
            TokenKind::Jwt { alg, enc, .. } => match enc {
                Some(k) => (*alg, k.clone()),
                None => {
                    return Err(Error::InvalidArgument(
                        "this member only verifies tokens (no JWT private key)".into(),
                    ));
                }
            },
        };
        jsonwebtoken::encode(&Header::new(alg), &claims, &key)
            .map_err(|e| Error::InvalidArgument(format!("cannot sign token: {e}")))
    }

    /// Check a token's signature and expiry; any failure is `invalid auth token`.
    pub fn verify(&self, secret: &[u8], token: &str) -> Result<Claims> {
        let (alg, key) = match &self.kind {
            TokenKind::Simple => (Algorithm::HS256, DecodingKey::from_secret(secret)),
            TokenKind::Jwt { alg, dec, .. } => (*alg, dec.clone()),
        };
        if secret.is_empty() && matches!(self.kind, TokenKind::Simple) {
            return Err(Error::InvalidAuthToken);
        }
        let mut v = Validation::new(alg);
        v.leeway = 0;
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|_| Error::InvalidAuthToken)?;
        if data.claims.exp <= now_secs() {
            return Err(Error::InvalidAuthToken);
        }
        Ok(data.claims)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_verify_with_their_secret_only() {
        let c = TokenConfig::default();
        let t = c.issue(&[1; 32], "alice", 4).expect("issue");
        let claims = c.verify(&[1; 32], &t).expect("verify");
        assert_eq!((claims.username.as_str(), claims.revision), ("alice", 4));
        assert!(matches!(
            c.verify(&[2; 32], &t),
            Err(Error::InvalidAuthToken)
        ));
        let mut tampered = t.clone();
        tampered.pop();
        assert!(c.verify(&[1; 32], &tampered).is_err());
        assert!(c.verify(&[1; 32], "not-a-token").is_err());
    }

    /// A throwaway Ed25519 key pair for this test only.
    const ED_PRIV: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIGNbLmh/U37CeW74BryHkjv//x9otQuwd3F92gUIX+Bs\n-----END PRIVATE KEY-----\n";
    const ED_PUB: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEArnqzxKed0FwACB1/1GXU4/caN/ZaGWtO57lY1Oa/xZI=\n-----END PUBLIC KEY-----\n";

    #[test]
    fn eddsa_tokens_from_pem_files_and_verify_only_members() {
        let dir = tempfile::tempdir().expect("dir");
        let (privk, pubk) = (dir.path().join("ed.key"), dir.path().join("ed.pub"));
        std::fs::write(&privk, ED_PRIV).expect("priv");
        std::fs::write(&pubk, ED_PUB).expect("pub");
        let full = TokenConfig::parse(
            &format!(
                "jwt,pub-key={},priv-key={},sign-method=EdDSA",
                pubk.display(),
                privk.display()
            ),
            DEFAULT_TTL,
        )
        .expect("parse");
        let t = full.issue(&[], "carol", 3).expect("issue");
        assert_eq!(full.verify(&[], &t).expect("verify").username, "carol");
        // A member with the public key only checks tokens but cannot issue them.
        let verify_only = TokenConfig::parse(
            &format!("jwt,pub-key={},sign-method=EdDSA", pubk.display()),
            DEFAULT_TTL,
        )
        .expect("parse");
        assert_eq!(verify_only.verify(&[], &t).expect("verify").revision, 3);
        assert!(verify_only.issue(&[], "carol", 3).is_err());
        // A simple (HS256) token is not accepted by an EdDSA member, and vice versa.
        let simple = TokenConfig::default()
            .issue(&[1; 32], "carol", 3)
            .expect("issue");
        assert!(verify_only.verify(&[], &simple).is_err());
        assert!(TokenConfig::default().verify(&[1; 32], &t).is_err());
        // A public key given as the wrong kind is refused at start.
        let e = TokenConfig::parse(
            &format!("jwt,pub-key={},sign-method=RS256", pubk.display()),
            DEFAULT_TTL,
        )
        .expect_err("wrong key kind");
        assert!(e.contains("bad JWT public key"), "{e}");
    }

    #[test]
    fn jwt_specs_are_parsed_and_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("hs.key");
        std::fs::write(&key, [9u8; 48]).expect("key");
        let spec = format!("jwt,priv-key={},sign-method=HS256,ttl=2m", key.display());
        let c = TokenConfig::parse(&spec, DEFAULT_TTL).expect("parse");
        assert_eq!(c.ttl, Duration::from_secs(120));
        let t = c.issue(&[], "bob", 1).expect("issue");
        assert_eq!(c.verify(&[], &t).expect("verify").username, "bob");
        assert!(TokenConfig::parse("jwt,sign-method=HS256", DEFAULT_TTL).is_err());
        assert!(TokenConfig::parse("jwt,sign-method=XX1", DEFAULT_TTL).is_err());
        assert!(TokenConfig::parse("bogus", DEFAULT_TTL).is_err());
        std::fs::write(&key, [9u8; 8]).expect("short key");
        let e = TokenConfig::parse(&spec, DEFAULT_TTL).expect_err("short key");
        assert!(e.contains("at least 32"), "{e}");
    }
}
