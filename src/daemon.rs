//! What every daemon needs, whatever its role: the state directory's lock, signals, unix
//! sockets removed when the daemon stops, the control socket, and the error type daemons share.
//! Nothing here knows about primaries or mirrors: a process may later change role without a
//! restart, and keeps all of this across the change.

use crate::control::{self, Handler};
use crate::env::{FileSystem, OsFs};
use nix::sys::signal::{SigSet, Signal};
use std::fs::{File, TryLockError};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
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
    Config(String),
    #[error("{0}")]
    Transport(#[from] crate::transport::TransportError),
    /// `flag` is the option that gave the address (`--mirror`, `--listen`, `--nbd-tcp`).
    #[error("{flag} {addr:?}: {reason}")]
    BadAddress {
        flag: &'static str,
        addr: String,
        reason: String,
    },
    #[error("cannot set up signal handling: {0}")]
    Signals(nix::errno::Errno),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The nice value of the threads that drive QUIC (the runtime's two workers, which send and
/// receive for every volume) in a daemon serving `volumes` volumes.
///
/// Each volume brings client threads of its own (its NBD connection, that connection's io_uring
/// workers, the client program): at equal priority the workers' share of the CPU fell with the
/// number of volumes. With 128 volumes on 2 cores they ran 1-5 % of the time and waited for a
/// CPU up to 90 %, round trips grew to seconds and sets went unacknowledged past the stall
/// watchdog (issue 13). So the two workers weigh as much as the volumes' threads: one nice step
/// is a factor of 1.25 in CPU weight, hence -log1.25(volumes / 2), from 0 (one or two volumes:
/// nothing changes) to -10 (32 volumes and more). Not more for a few volumes: a worker that
/// preempts the clients on every wakeup batches less, and one volume wrote 10-20 % less at -10.
/// Lowering the shipping threads instead (nice 5) had starved the link.
pub fn network_nice(volumes: usize) -> i32 {
    let steps = (volumes as f64 / 2.0).ln() / 1.25f64.ln();
    -(steps.round().clamp(0.0, 10.0) as i32)
}

/// For tokio's `on_thread_park`, which only the runtime's workers call: give the calling
/// worker `nice` ([`network_nice`]), once. A process without the right (not root, no
/// CAP_SYS_NICE nor RLIMIT_NICE) keeps the default priority and says so once.
pub fn prioritize_network_thread(nice: i32) {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};
    thread_local!(static DONE: Cell<bool> = const { Cell::new(false) });
    static WARNED: AtomicBool = AtomicBool::new(false);
    if nice == 0 || DONE.replace(true) {
        return;
    }
    // SAFETY: a plain system call on the calling thread (on Linux a thread has its own nice
    // value, addressed by its thread id).
    let rc = unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            nix::unistd::gettid().as_raw() as libc::id_t,
            nice,
        )
    };
    if rc != 0 && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            nice,
            "cannot raise the network threads' priority ({}): with many volumes, client I/O \
             may starve replication (run as root, or grant CAP_SYS_NICE or LimitNICE)",
            io::Error::last_os_error()
        );
    }
}

/// Resolve HOST:PORT to its first address.
pub fn resolve(flag: &'static str, addr: &str) -> Result<std::net::SocketAddr, DaemonError> {
    let bad = |reason: String| DaemonError::BadAddress {
        flag,
        addr: addr.to_string(),
        reason,
    };
    std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("resolves to nothing".into()))
}

/// The state directory's subdirectories that hold or describe client data (journal, redo log,
/// volume state); their own subdirectories are tightened when the logs open them.
const PRIVATE_SUBDIRS: [&str; 3] = ["journal", "redo", "volumes"];

/// An exclusive lock on STATE_DIR/lock, held until the returned file is dropped.
pub fn lock_state_dir(dir: &Path) -> Result<File, DaemonError> {
    let err = |source| DaemonError::StateDir {
        path: dir.to_path_buf(),
        source,
    };
    // The state directory holds client data (the journal, the redo log) and what describes
    // it: owner only, like everything in it (`env::os`), also when an older release or an
    // admin's mkdir left it open to others.
    FileSystem::create_dir_all(&OsFs, dir).map_err(err)?;
    for sub in PRIVATE_SUBDIRS {
        let path = dir.join(sub);
        if path.is_dir() {
            FileSystem::create_dir_all(&OsFs, &path).map_err(err)?;
        }
    }
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join("lock"))
        .map_err(err)?;
    if f.metadata().map_err(err)?.permissions().mode() & 0o777 != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    // std's try_lock is flock(LOCK_EX|LOCK_NB): the same lock earlier versions took.
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(TryLockError::WouldBlock) => Err(DaemonError::StateDirLocked(dir.to_path_buf())),
        Err(TryLockError::Error(e)) => Err(err(e)),
    }
}

/// SIGINT, SIGTERM and SIGHUP, blocked in every thread so that [`Signals::wait_for_termination`]
/// receives them (a blocked signal stays pending until then: none is lost during startup).
pub struct Signals(SigSet);

impl Signals {
    /// Call before spawning any thread: threads inherit the mask of the one that spawns them.
    pub fn block() -> Result<Signals, DaemonError> {
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block().map_err(DaemonError::Signals)?;
        Ok(Signals(set))
    }

    /// Wait for SIGINT or SIGTERM and return it. SIGHUP (a closed terminal, a service
    /// manager's "reload") is logged and ignored: there is nothing to reload, and dying on it
    /// would stop serving and replicating.
    pub fn wait_for_termination(&self) -> Result<Signal, DaemonError> {
        loop {
            match self.0.wait().map_err(DaemonError::Signals)? {
                Signal::SIGHUP => tracing::info!(
                    "SIGHUP received: ignored (blkmirror has no configuration to reload)"
                ),
                sig => return Ok(sig),
            }
        }
    }
}

/// The file of a unix socket this daemon listens on, removed when dropped: at a clean stop and
/// when startup fails after binding.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Listen on a unix socket at `path`, replacing a stale socket file but never a live server's
/// socket nor a file that is not a socket.
pub fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), DaemonError> {
    let err = |source| DaemonError::Listen {
        what: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "in use by a running server",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    Ok((listener, SocketFile(path.to_path_buf())))
}

/// Serve the control socket at `path` (see [`control`]) until the returned guard drops.
pub fn serve_control(path: &Path, handler: Handler) -> Result<SocketFile, DaemonError> {
    let (listener, file) = bind_unix(path)?;
    control::serve(listener, handler).map_err(|source| DaemonError::Listen {
        what: path.display().to_string(),
        source,
    })?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_threads_weigh_as_much_as_the_volumes_threads() {
        // One or two volumes: the clients' priority, as before.
        assert_eq!((network_nice(1), network_nice(2)), (0, 0));
        assert_eq!(network_nice(4), -3);
        assert_eq!(network_nice(8), -6);
        assert_eq!(network_nice(16), -9);
        assert_eq!(
            (network_nice(32), network_nice(128), network_nice(10_000)),
            (-10, -10, -10)
        );
    }

    #[test]
    fn state_dir_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_state_dir(dir.path()).unwrap();
        let err = lock_state_dir(dir.path()).unwrap_err();
        assert!(matches!(err, DaemonError::StateDirLocked(_)), "{err}");
        drop(first);
        lock_state_dir(dir.path()).unwrap();
    }

    #[test]
    fn bind_unix_replaces_stale_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (live, file) = bind_unix(&path).unwrap();
        let err = bind_unix(&path).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(live); // the file stays: stale
        let (_l, file2) = bind_unix(&path).unwrap();
        std::mem::forget(file);
        drop(file2);
        assert!(!path.exists(), "the guard removes the socket file");

        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"keep me").unwrap();
        let err = bind_unix(&plain).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
    }
}
