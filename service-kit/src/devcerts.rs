//! A development certificate authority (rcgen): a CA and certificates for every service, for
//! the compose stack with TLS on, local runs and tests. Not for production: keys are written
//! unencrypted and readable by all, and everything is valid until 2099.
//!
//! Each certificate is good for both sides (server and client authentication), so one pair
//! per service serves its listeners and its outgoing calls. The CN is the identity the
//! coordinator checks: a coordinator member's CN is its member name (peer name check), any
//! other client's CN is the user name `--client-cert-auth` gives it.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

/// A development CA that issues [`Pair`]s.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl DevCa {
    /// A new CA (ECDSA P-256) named `cn`.
    pub fn new(cn: &str) -> Result<DevCa, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(DevCa { issuer })
    }

    /// The CA certificate (what `--trusted-ca-file` / `--cacert` point at).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate with subject CN `cn` and `sans` as subject alternative names (IP
    /// addresses become IP SANs, anything else DNS SANs), for server and client use.
    pub fn issue(&self, cn: &str, sans: &[&str]) -> Result<Pair, rcgen::Error> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem` and, for each `(file stem, cn, sans)`, `<stem>.pem` and `<stem>-key.pem`
    /// into `dir` (created if missing).
    pub fn write_all(&self, dir: &Path, certs: &[(&str, &str, Vec<&str>)]) -> anyhow::Result<()> {
        self.write_ca(dir)?;
        for (stem, cn, sans) in certs {
            self.write_pair(dir, stem, cn, sans)?;
        }
        Ok(())
    }

    /// Writes the CA certificate as `dir/ca.pem` and returns its path.
    pub fn write_ca(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        write(dir, "ca.pem", &self.cert_pem())
    }

    /// Issues a pair ([`issue`](Self::issue)) and writes it as `dir/<stem>.pem` and
    /// `dir/<stem>-key.pem`; returns both paths.
    pub fn write_pair(
        &self,
        dir: &Path,
        stem: &str,
        cn: &str,
        sans: &[&str],
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let pair = self.issue(cn, sans)?;
        Ok((
            write(dir, &format!("{stem}.pem"), &pair.cert_pem)?,
            write(dir, &format!("{stem}-key.pem"), &pair.key_pem)?,
        ))
    }
}

/// Writes `text` to `dir/name` (creating `dir`). Keys are world-readable on purpose: the
/// compose containers read them as a non-root user from a bind mount (development only).
fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The pairs of the compose stack, as `(file stem, CN, SANs)`: `coordinator-1..3` (CN = member
/// name, as the peer name check wants), `registry-svc`, `config-svc`, `lb-gateway`, `demo-svc`
/// (each naming the compose host names of its replicas) and `client` (CN `root`: etcdctl with
/// `--cert`/`--key` acts as root when the coordinator runs `--client-cert-auth` with auth
/// enabled). Every one also names `localhost` and `127.0.0.1`, for clients on the host.
pub fn stack_certs() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    let with = |names: &[&'static str]| -> Vec<&'static str> {
        names
            .iter()
            .copied()
            .chain(["localhost", "127.0.0.1"])
            .collect()
    };
    vec![
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
    ]
}

/// Writes a new development CA (`ca.pem`) and every pair of [`stack_certs`] into `dir` (what
/// `compose/docker-compose.tls.yml` mounts); how many pairs.
pub fn write_stack(dir: &Path) -> anyhow::Result<usize> {
    let certs = stack_certs();
    let ca = DevCa::new("platform development CA")?;
    ca.write_all(dir, &certs)?;
    Ok(certs.len())
}
