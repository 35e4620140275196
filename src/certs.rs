//! Certificate authority and peer certificates (rcgen).
//!
//! `blkmirror certs init --dir DIR` makes a private CA (`DIR/ca.crt`, `DIR/ca.key`);
//! `blkmirror certs issue --dir DIR NAME` makes `DIR/NAME.crt` and `DIR/NAME.key`, signed by
//! that CA, for the peer called NAME (NAME is the certificate's DNS subject alternative name and
//! its CN); it refuses to replace an existing NAME.crt or NAME.key unless `--force` (renewal).
//! Both peers of a replication link trust only that CA and check each other's NAME
//! (promise I3, see `transport`).
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM, written with mode 0600. Files are written to a temporary
//! name, fsync'd and renamed into place, so a crash never leaves a half-written key.
//!
//! The CA's subject is `CN=blkmirror CA <id>, O=blkmirror`, where `<id>` is derived from the CA's
//! public key. `issue` rebuilds that subject from `ca.key` alone (no X.509 parser is needed),
//! and checks each new certificate against `ca.crt` with the same verifier the transport uses
//! before writing it, so a `ca.key` that does not belong to `ca.crt` is refused.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File name of the CA certificate inside a certificate directory.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA private key inside a certificate directory.
pub const CA_KEY: &str = "ca.key";
/// Default lifetime of a peer certificate, in days (the CA/Browser Forum's old maximum).
pub const DEFAULT_DAYS: u32 = 825;
/// Lifetime of the CA certificate, in days (about ten years).
pub const CA_DAYS: u32 = 3650;
/// Peer certificates start this long before "now", to tolerate clock skew between sites.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const DAY: u64 = 24 * 60 * 60;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --force to replace the CA (every certificate it issued stops being trusted)")]
    CaExists { path: PathBuf },
    #[error("{path} already exists; pass --force to replace its certificate and key (renewal)", path = .path.display())]
    CertExists { path: PathBuf },
    #[error("no CA in {dir}: {missing} is missing (run `blkmirror certs init --dir {dir}` first)", dir = .dir.display(), missing = .missing.display())]
    NoCa { dir: PathBuf, missing: PathBuf },
    #[error("{path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("invalid peer name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid lifetime: {0}")]
    InvalidDays(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

impl CertError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
        move |source| CertError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `blkmirror certs ...` subcommands (the CLI contract: names and flags are stable).
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create a private CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue DIR/NAME.crt and DIR/NAME.key for peer NAME, signed by the CA in DIR.
    Issue {
        /// Directory holding ca.crt and ca.key; the new files go there too.
        #[arg(long)]
        dir: PathBuf,
        /// Peer name (DNS name syntax); the other side configures it as its peer name.
        name: String,
        /// Lifetime in days.
        #[arg(long, default_value_t = DEFAULT_DAYS)]
        days: u32,
        /// Replace an existing NAME.crt and NAME.key (renewal).
        #[arg(long)]
        force: bool,
        /// Test only: make a certificate whose validity lies entirely in the past.
        #[arg(long, hide = true)]
        expired: bool,
    },
}

/// Runs a `certs` subcommand, printing the files written on stdout.
pub fn run(cmd: CertsCommand) -> Result<(), CertError> {
    match cmd {
        CertsCommand::Init { dir, force } => {
            init_ca(&dir, force)?;
            println!(
                "wrote {} and {}",
                dir.join(CA_CERT).display(),
                dir.join(CA_KEY).display()
            );
        }
        CertsCommand::Issue {
            dir,
            name,
            days,
            force,
            expired,
        } => {
            if force {
                renew(&dir, &name, days, expired)?;
            } else {
                issue(&dir, &name, days, expired)?;
            }
            println!(
                "wrote {} and {}",
                dir.join(format!("{name}.crt")).display(),
                dir.join(format!("{name}.key")).display()
            );
        }
    }
    Ok(())
}

/// Creates a CA in `dir` (`ca.crt`, `ca.key`), creating `dir` if needed. Refuses to replace an
/// existing CA unless `force`.
pub fn init_ca(dir: &Path, force: bool) -> Result<(), CertError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !force {
        for path in [&cert_path, &key_path] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(CertError::CaExists { path: path.clone() });
            }
        }
    }
    create_dir(dir)?;
    let key = KeyPair::generate()?;
    let mut params = ca_params(&key);
    let now = SystemTime::now();
    set_validity(
        &mut params,
        now.checked_sub(BACKDATE).unwrap_or(now),
        now + Duration::from_secs(u64::from(CA_DAYS) * DAY),
    );
    let cert = params.self_signed(&key)?;
    // Key first: a crash in between leaves a key without a certificate, which `issue` reports.
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), "created CA");
    Ok(())
}

/// Issues `dir/NAME.crt` and `dir/NAME.key` for peer `name`, signed by the CA in `dir`, valid
/// for `days` days from now (or, with `expired`, a validity period entirely in the past: test
/// only). Refuses when `NAME.crt` or `NAME.key` exists: a key is never overwritten unasked.
pub fn issue(dir: &Path, name: &str, days: u32, expired: bool) -> Result<(), CertError> {
    issue_cert(dir, name, days, expired, false)
}

/// [`issue`], replacing an existing certificate and key for `name` (renewal).
pub fn renew(dir: &Path, name: &str, days: u32, expired: bool) -> Result<(), CertError> {
    issue_cert(dir, name, days, expired, true)
}

fn issue_cert(
    dir: &Path,
    name: &str,
    days: u32,
    expired: bool,
    replace: bool,
) -> Result<(), CertError> {
    validate_name(name)?;
    let key_path = dir.join(format!("{name}.key"));
    let cert_path = dir.join(format!("{name}.crt"));
    if !replace {
        for path in [&key_path, &cert_path] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(CertError::CertExists { path: path.clone() });
            }
        }
    }
    if days == 0 {
        return Err(CertError::InvalidDays("--days must be at least 1".into()));
    }
    if u64::from(days) > 100 * 366 {
        return Err(CertError::InvalidDays(format!(
            "--days {days} is more than a century"
        )));
    }
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    for path in [&ca_cert_path, &ca_key_path] {
        if !path.exists() {
            return Err(CertError::NoCa {
                dir: dir.to_path_buf(),
                missing: path.clone(),
            });
        }
    }
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(CertError::io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| CertError::BadCa {
        path: ca_key_path.clone(),
        reason: format!("not a usable private key: {e}"),
    })?;
    let ca_pem = fs::read(&ca_cert_path).map_err(CertError::io(&ca_cert_path))?;
    let ca_der = CertificateDer::from_pem_slice(&ca_pem).map_err(|e| CertError::BadCa {
        path: ca_cert_path.clone(),
        reason: format!("no PEM certificate: {e}"),
    })?;
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Each peer is a TLS client on one link and may be a server on another.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    let span = Duration::from_secs(u64::from(days) * DAY);
    let (not_before, not_after) = if expired {
        let not_after = now - Duration::from_secs(DAY);
        (not_after - span, not_after)
    } else {
        (now.checked_sub(BACKDATE).unwrap_or(now), now + span)
    };
    set_validity(&mut params, not_before, not_after);
    let cert = params.signed_by(&key, &issuer)?;

    // Self-check with the transport's own verifier: the new certificate must chain to ca.crt
    // (this catches a ca.key that does not belong to ca.crt, or a CA not made by `certs init`).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).map_err(|e| CertError::BadCa {
        path: ca_cert_path.clone(),
        reason: format!("unusable CA certificate: {e}"),
    })?;
    let check_time = if expired {
        not_before + (not_after.duration_since(not_before).unwrap_or_default() / 2)
    } else {
        now
    };
    let parsed =
        rustls::server::ParsedCertificate::try_from(cert.der()).map_err(|e| CertError::BadCa {
            path: ca_cert_path.clone(),
            reason: format!("issued certificate does not parse: {e}"),
        })?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &[],
        UnixTime::since_unix_epoch(check_time.duration_since(UNIX_EPOCH).unwrap_or_default()),
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
    )
    .map_err(|e| CertError::BadCa {
        path: ca_cert_path.clone(),
        reason: format!(
            "{} does not match it, or it was not made by `blkmirror certs init` ({e})",
            ca_key_path.display()
        ),
    })?;

    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), name, days, expired, "issued certificate");
    Ok(())
}

/// Checks that `name` can be a peer name: a DNS name (letters, digits, '-' and '.'; labels of 1
/// to 63 characters not starting or ending with '-'), not an IP address, and not "ca".
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let bad = |reason| {
        Err(CertError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    if name.eq_ignore_ascii_case("ca") {
        return bad("\"ca\" is reserved for the CA's own files");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("empty label (leading, trailing or double '.')");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("only letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    // The transport turns the peer name into a TLS server name: it must be a DNS name there too.
    match ServerName::try_from(name) {
        Ok(ServerName::DnsName(_)) => Ok(()),
        Ok(_) => bad("looks like an IP address; use a DNS-style name"),
        Err(_) => bad("not a valid DNS name"),
    }
}

/// The CA's parameters, derived from its key only so `issue` can rebuild the issuer name.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let id: String = key
        .public_key_raw()
        .iter()
        .skip(1) // SEC1 point format byte
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("blkmirror CA {id}"));
    dn.push(DnType::OrganizationName, "blkmirror");
    params.distinguished_name = dn;
    // Path length 0: the CA signs peer certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Sets the validity period (rcgen's time type is not named: `time` is not a direct dependency).
fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    let since_epoch = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(since_epoch(not_before).as_secs());
    params.not_after = epoch + Duration::from_secs(since_epoch(not_after).as_secs());
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(CertError::io(dir))
}

/// Writes `data` to `path` atomically (temporary file, fsync, rename) with permissions `mode`.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; for keys that is fine, but make it exact.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        CertError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["primary", "mirror-1", "lux.safe.example", "A1"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "ca",
            "CA",
            "-x",
            "x-",
            "a..b",
            ".a",
            "a/b",
            "../x",
            "a b",
            "10.0.0.1",
            "é",
            &"a".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn init_issue_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("pki");
        init_ca(&d, false).unwrap();
        let err = init_ca(&d, false).unwrap_err();
        assert!(matches!(err, CertError::CaExists { .. }), "{err}");
        assert!(err.to_string().contains("--force"));
        let mode = fs::metadata(d.join(CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        issue(&d, "primary", DEFAULT_DAYS, false).unwrap();
        let err = issue(&d, "primary", 1, true).unwrap_err();
        assert!(matches!(err, CertError::CertExists { .. }), "{err}");
        renew(&d, "primary", 1, true).unwrap();
        let mode = fs::metadata(d.join("primary.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(issue(&d, "ca", 10, false).is_err());
        assert!(issue(&d, "x", 0, false).is_err());
        init_ca(&d, true).unwrap();
    }

    #[test]
    fn issue_without_ca_or_with_foreign_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue(dir.path(), "primary", 10, false).unwrap_err();
        assert!(err.to_string().contains("certs init"), "{err}");
        let other = tempfile::tempdir().unwrap();
        init_ca(dir.path(), false).unwrap();
        init_ca(other.path(), false).unwrap();
        fs::copy(other.path().join(CA_KEY), dir.path().join(CA_KEY)).unwrap();
        let err = issue(dir.path(), "primary", 10, false).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!dir.path().join("primary.crt").exists());
    }
}
