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
use std::sync::Arc;

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
    /// The state directory holds volumes of the other role (or a role change cannot go on).
    #[error("{0}")]
    WrongRole(String),
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
/// SIGUSR1 too: the daemon sends it to itself when the control socket asks for a role
/// change ([`RoleDesk`]), which the main thread carries out.
pub struct Signals(SigSet);

impl Signals {
    /// Call before spawning any thread: threads inherit the mask of the one that spawns them.
    pub fn block() -> Result<Signals, DaemonError> {
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGUSR1,
        ] {
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
            match self.wait_for_event()? {
                Event::Stop(sig) => return Ok(sig),
                Event::RoleChange => {}
            }
        }
    }

    /// Wait for SIGINT or SIGTERM, or for a role change asked through the control socket.
    pub fn wait_for_event(&self) -> Result<Event, DaemonError> {
        loop {
            match self.0.wait().map_err(DaemonError::Signals)? {
                Signal::SIGHUP => tracing::info!(
                    "SIGHUP received: ignored (blkmirror has no configuration to reload)"
                ),
                Signal::SIGUSR1 => return Ok(Event::RoleChange),
                sig => return Ok(Event::Stop(sig)),
            }
        }
    }
}

/// What woke the main thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Stop(Signal),
    /// A role change waits at the [`RoleDesk`] (or a stray SIGUSR1: nothing waits).
    RoleChange,
}

/// A role change asked through the control socket (`promote`, `demote`), carried out by the
/// main thread, which stops one role's machinery and starts the other's; the asker waits for
/// `reply`.
pub struct RoleRequest {
    pub to: crate::repl::role::Role,
    pub force: bool,
    /// `promote --set N` / `--at UNIX_MS`: the history point to go back to first.
    pub point: Option<(Option<u64>, Option<u64>)>,
    /// How long a demotion waits for the peer to acknowledge every write.
    pub timeout: std::time::Duration,
    /// Become a secondary of a peer primary, giving up (after saving) this side's writes
    /// since the two parted, and what asked: `failback` (the start gate) or `resolve
    /// --discard-local` (an admin, after a split brain).
    pub discard_local: Option<&'static str>,
    pub reply: std::sync::mpsc::Sender<serde_json::Value>,
}

impl RoleRequest {
    /// A promotion that may lose writes: `--force`, or back to a history point (which gives
    /// up every write after it).
    pub fn forced(&self) -> bool {
        self.force || self.point.is_some()
    }
}

/// Where the control socket leaves a role change for the main thread: one at a time.
#[derive(Default)]
pub struct RoleDesk {
    pending: std::sync::Mutex<Option<RoleRequest>>,
}

impl RoleDesk {
    /// Hand `req` to the main thread and wake it; false when another change is under way.
    pub fn ask(&self, req: RoleRequest) -> bool {
        let mut p = self.pending.lock().unwrap();
        if p.is_some() {
            return false;
        }
        *p = Some(req);
        drop(p);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGUSR1);
        true
    }

    pub fn take(&self) -> Option<RoleRequest> {
        self.pending.lock().unwrap().take()
    }

    /// The control socket's side of `promote`/`demote`: ask, then wait for the answer (the
    /// main thread answers every request it takes).
    pub fn ask_and_wait(&self, mut req: RoleRequest) -> serde_json::Value {
        let (tx, rx) = std::sync::mpsc::channel();
        req.reply = tx;
        let wait = req.timeout + std::time::Duration::from_secs(600);
        if !self.ask(req) {
            return serde_json::json!({
                "error": "another role change is under way",
                "code": "busy",
            });
        }
        rx.recv_timeout(wait).unwrap_or_else(|_| {
            serde_json::json!({
                "error": "the daemon did not answer the role change in time",
                "code": "io",
            })
        })
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
pub fn serve_control(path: &Path, handler: Handler) -> Result<ControlSocket, DaemonError> {
    let (listener, file) = bind_unix(path)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    control::serve(listener, handler, stop.clone()).map_err(|source| DaemonError::Listen {
        what: path.display().to_string(),
        source,
    })?;
    Ok(ControlSocket { _file: file, stop })
}

/// The control socket of a daemon whose role changes: bound once, its commands answered by
/// the handler the running role installed ([`ControlSwitch::install`]); between two roles, by
/// one that says what is going on.
pub struct ControlSwitch {
    path: PathBuf,
    /// `promote` and `demote` go to the main thread through here, whatever the role: the
    /// client's thread waits holding nothing of the role that ends.
    desk: Arc<RoleDesk>,
    handler: Arc<std::sync::RwLock<Handler>>,
    /// Bound when the first role installs its handler (so that the socket answers only once
    /// a role is ready), unbound when this is dropped.
    socket: std::sync::Mutex<Option<ControlSocket>>,
}

impl ControlSwitch {
    /// The control socket at `path`, bound by the first [`ControlSwitch::install`].
    pub fn new(path: &Path, desk: Arc<RoleDesk>) -> Arc<ControlSwitch> {
        Arc::new(ControlSwitch {
            path: path.to_path_buf(),
            desk,
            handler: Arc::new(std::sync::RwLock::new(Arc::new(
                |_: &[&str]| serde_json::json!({ "error": "not ready", "code": "busy" }),
            ))),
            socket: std::sync::Mutex::new(None),
        })
    }

    /// Answer with `handler` from now on (binding the socket the first time).
    pub fn install(&self, handler: Handler) -> Result<(), DaemonError> {
        *self.handler.write().unwrap() = handler;
        let mut socket = self.socket.lock().unwrap();
        if socket.is_none() {
            let h = self.handler.clone();
            let desk = self.desk.clone();
            *socket = Some(serve_control(
                &self.path,
                Arc::new(move |words: &[&str]| match words.first().copied() {
                    Some("promote" | "demote" | "resolve") => role_command(&desk, words),
                    _ => {
                        let current = h.read().unwrap().clone();
                        current(words)
                    }
                }),
            )?);
        }
        Ok(())
    }

    /// Stop answering (the daemon stops).
    pub fn close(&self) {
        self.socket.lock().unwrap().take();
    }

    /// Between roles: `status` says which role comes and that it is on its way; anything else
    /// (but `promote` and `demote`, which wait for the role that comes) to ask again.
    pub fn install_transition(&self, to: crate::repl::role::Role) {
        use crate::repl::role::Role;
        *self.handler.write().unwrap() =
            Arc::new(move |words: &[&str]| match words.first().copied() {
                Some("status") => serde_json::json!({
                    "role": if to == Role::Primary { "primary" } else { "mirror" },
                    "changing_role": true,
                    "volumes": [],
                }),
                _ => serde_json::json!({
                    "error": "the daemon is changing role: ask again in a moment",
                    "code": "busy",
                }),
            });
    }
}

/// `demote SECS`, `promote [force] [set=N|at=UNIX_MS]` and `resolve discard-local`: handed to the main thread, which
/// answers ("already" when this is the role it runs).
fn role_command(desk: &RoleDesk, words: &[&str]) -> serde_json::Value {
    use crate::repl::role::Role;
    let usage = |why: String| serde_json::json!({ "error": why, "code": "usage" });
    let mut req = RoleRequest {
        to: Role::Secondary,
        force: false,
        point: None,
        timeout: std::time::Duration::ZERO,
        discard_local: None,
        reply: std::sync::mpsc::channel().0,
    };
    match words {
        ["resolve", "discard-local"] => req.discard_local = Some("resolve --discard-local"),
        ["demote", secs] => match secs.parse::<u64>() {
            Ok(s) => req.timeout = std::time::Duration::from_secs(s),
            Err(_) => return usage(format!("demote: bad timeout {secs:?}")),
        },
        ["promote", args @ ..] => {
            req.to = Role::Primary;
            for a in args {
                match a.split_once('=') {
                    None if *a == "force" => req.force = true,
                    Some(("set", n)) => match n.parse() {
                        Ok(n) => req.point = Some((Some(n), None)),
                        Err(_) => return usage(format!("promote: bad set {n:?}")),
                    },
                    Some(("at", t)) => match t.parse() {
                        Ok(t) => req.point = Some((None, Some(t))),
                        Err(_) => return usage(format!("promote: bad time {t:?}")),
                    },
                    _ => return usage(format!("promote: unexpected {a:?}")),
                }
            }
        }
        other => return usage(format!("unexpected {other:?}")),
    }
    desk.ask_and_wait(req)
}

/// A control socket being served: dropped, it stops answering new clients and its file goes.
pub struct ControlSocket {
    _file: SocketFile,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
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
