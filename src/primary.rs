//! The primary daemon: opens the volumes, locks the state directory, serves NBD until SIGINT or
//! SIGTERM.

use crate::disk::faults::{FaultRule, Faulty};
use crate::disk::file::FileStorage;
use crate::disk::spec::VolumeSpec;
use crate::disk::Storage;
use crate::nbd::handshake::ExportInfo;
use crate::nbd::server::{bind_unix, Export, Server};
use std::fs::File;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct PrimaryOptions {
    pub volumes: Vec<VolumeSpec>,
    pub nbd_unix: PathBuf,
    pub nbd_tcp: Option<String>,
    pub state_dir: PathBuf,
    /// Test-only fault rules (see `disk::faults`), applied to every volume.
    pub faults: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("no --volume given")]
    NoVolumes,
    #[error("volume name {0:?} given twice")]
    DuplicateName(String),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {0} is in use by another blkmirror process")]
    StateDirLocked(PathBuf),
    #[error(transparent)]
    Open(#[from] crate::disk::file::OpenError),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Fault(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Hold an exclusive lock on STATE_DIR/lock for the life of the process.
pub fn lock_state_dir(dir: &Path) -> Result<File, PrimaryError> {
    let err = |source| PrimaryError::StateDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(err)?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(PrimaryError::StateDirLocked(dir.to_path_buf()));
    }
    Ok(f)
}

/// Block SIGINT/SIGTERM in every thread so that `wait_for_signal` alone receives them.
/// Call before spawning any thread.
pub fn block_termination_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

pub fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

pub fn run(opts: PrimaryOptions) -> Result<(), PrimaryError> {
    let signals = block_termination_signals();
    if opts.volumes.is_empty() {
        return Err(PrimaryError::NoVolumes);
    }
    let _lock = lock_state_dir(&opts.state_dir)?;
    let mut exports = Vec::new();
    for spec in &opts.volumes {
        if exports.iter().any(|e: &Export| e.info.name == spec.name) {
            return Err(PrimaryError::DuplicateName(spec.name.clone()));
        }
        let file = FileStorage::open(spec)?;
        tracing::info!(volume = %spec.name, path = %spec.path.display(), size = file.size(),
            read_only = spec.read_only, direct_io = file.direct_io(), "volume open");
        let storage: Arc<dyn Storage> = if opts.faults.is_empty() {
            Arc::new(file)
        } else {
            let rules = opts
                .faults
                .iter()
                .map(|r| r.parse::<FaultRule>())
                .collect::<Result<Vec<_>, _>>();
            tracing::warn!(volume = %spec.name, rules = ?opts.faults, "fault injection is ON (test only)");
            Arc::new(Faulty::new(file, rules.map_err(PrimaryError::Fault)?))
        };
        exports.push(Export {
            info: ExportInfo {
                name: spec.name.clone(),
                size: storage.size(),
                read_only: spec.read_only,
                description: format!("blkmirror volume {}", spec.name),
            },
            storage,
        });
    }
    let server = Server::new(exports);
    let unix = bind_unix(&opts.nbd_unix).map_err(|source| PrimaryError::Listen {
        what: opts.nbd_unix.display().to_string(),
        source,
    })?;
    server.spawn_unix(unix)?;
    if let Some(addr) = &opts.nbd_tcp {
        let tcp = TcpListener::bind(addr).map_err(|source| PrimaryError::Listen {
            what: addr.clone(),
            source,
        })?;
        server.spawn_tcp(tcp)?;
    }
    tracing::info!(socket = %opts.nbd_unix.display(), tcp = opts.nbd_tcp.as_deref().unwrap_or("-"),
        "serving NBD");
    let sig = wait_for_signal(&signals);
    tracing::info!(signal = sig, "shutting down");
    let _ = std::fs::remove_file(&opts.nbd_unix);
    Ok(())
}
