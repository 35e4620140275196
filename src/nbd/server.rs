//! The NBD server: listeners, one thread per connection, the handshake driven over a blocking
//! socket, then the transmission phase handed to [`Conn`]. [`Limits`] bound what clients can
//! hold: connections open at once, and the time a handshake may take.

use super::conn::Conn;
use super::handshake::{self, ExportInfo, Negotiation, Outcome};
use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What clients may hold, whatever they send (`--nbd-max-connections`,
/// `--nbd-handshake-timeout`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once, counting those still in the handshake; more are closed at
    /// once. Each holds a thread (and, attached, its own ring and buffers).
    pub max_connections: usize,
    /// The whole handshake, greeting to transmission phase: not per read, so a client
    /// trickling a byte at a time cannot stretch it.
    pub handshake_timeout: Duration,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections closed at the limit are logged at most this often (with a count): a flood must
/// not become a flood of log lines.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub struct Export {
    pub info: ExportInfo,
    /// Its disk, journal and range locks, shared by all of the volume's connections.
    pub volume: Arc<crate::volume::Volume>,
}

/// How often an accept thread looks for a client and for the server's stop.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

pub struct Server {
    exports: Vec<Export>,
    infos: Vec<ExportInfo>,
    next_conn: AtomicU64,
    limits: Limits,
    /// Connections open now, handshakes included.
    open: AtomicUsize,
    refused: Mutex<Refusals>,
    /// A copy of each open connection's socket, to end it at shutdown.
    live: Mutex<std::collections::HashMap<u64, OwnedFd>>,
    /// Shutting down: new connections are closed at once.
    stopping: std::sync::atomic::AtomicBool,
    /// Connections are closed at once while set ([`Server::hold_doors`]).
    closed_until_open: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Refusals {
    last_logged: Option<Instant>,
    since_logged: u64,
}

/// One of the `max_connections` places, given back when the connection ends.
struct Slot(Arc<Server>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Server {
    pub fn new(exports: Vec<Export>, limits: Limits) -> Arc<Server> {
        let infos = exports.iter().map(|e| e.info.clone()).collect();
        Arc::new(Server {
            exports,
            infos,
            next_conn: AtomicU64::new(1),
            limits,
            open: AtomicUsize::new(0),
            refused: Mutex::new(Refusals::default()),
            live: Mutex::new(std::collections::HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            closed_until_open: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Close every connection at once until [`Server::open_doors`]: a primary that has not yet
    /// heard from its peer takes no client (it may have been replaced by a promotion).
    pub fn hold_doors(&self) {
        self.closed_until_open.store(true, Ordering::SeqCst);
    }

    pub fn open_doors(&self) {
        self.closed_until_open.store(false, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn doors_open(&self) -> bool {
        !self.closed_until_open.load(Ordering::SeqCst)
    }

    /// Stop serving: new connections are closed, open ones are ended (their sockets shut
    /// down; each finishes the disk operations it has in flight and replies to none), and this
    /// waits up to `timeout` for all of them to be gone. Returns whether they all are: only
    /// then has every write reached its end, journal included.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        for fd in self.live.lock().unwrap().values() {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                nix::sys::socket::Shutdown::Both,
            );
        }
        let deadline = Instant::now() + timeout;
        while self.open.load(Ordering::Acquire) > 0 {
            if Instant::now() > deadline {
                tracing::warn!(
                    open = self.open.load(Ordering::Acquire),
                    "NBD connections still busy at shutdown"
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn take_slot(self: &Arc<Self>) -> Option<Slot> {
        let max = self.limits.max_connections;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// A connection over the limit was closed: say so, at most every REFUSAL_LOG_INTERVAL.
    fn log_refusal(&self, peer: &str) {
        let mut r = self.refused.lock().unwrap();
        r.since_logged += 1;
        let now = Instant::now();
        if r.last_logged
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(%peer, "NBD connection limit reached: {} connections open \
                (--nbd-max-connections); closed {} new connection(s) since the last such message",
                self.limits.max_connections, r.since_logged);
            r.last_logged = Some(now);
            r.since_logged = 0;
        }
    }

    pub fn spawn_unix(
        self: &Arc<Self>,
        listener: UnixListener,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let server = self.clone();
        listener.set_nonblocking(true)?;
        std::thread::Builder::new()
            .name("nbd-unix-accept".into())
            .spawn(move || {
                while let Some(accepted) = server.next_accept(|| listener.accept()) {
                    let (s, _) = accepted;
                    if s.set_nonblocking(false).is_ok() {
                        server.spawn_conn(s, "unix".into());
                    }
                }
            })
    }

    pub fn spawn_tcp(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let server = self.clone();
        listener.set_nonblocking(true)?;
        std::thread::Builder::new()
            .name("nbd-tcp-accept".into())
            .spawn(move || {
                while let Some(accepted) = server.next_accept(|| listener.accept()) {
                    let (s, peer) = accepted;
                    let _ = s.set_nodelay(true);
                    if s.set_nonblocking(false).is_ok() {
                        server.spawn_conn(s, peer.to_string());
                    }
                }
            })
    }

    /// The next client from a non-blocking listener, or None once the server stops: the
    /// accept thread then ends, closing its listener and its hold on the volumes (a demoted
    /// primary's role change opens them again).
    fn next_accept<T>(&self, mut accept: impl FnMut() -> io::Result<T>) -> Option<T> {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return None;
            }
            match accept() {
                Ok(t) => return Some(t),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL);
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    std::thread::sleep(ACCEPT_POLL);
                }
            }
        }
    }

    fn spawn_conn<S: Stream>(self: &Arc<Self>, stream: S, peer: String) {
        let accepted = Instant::now();
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        if self.closed_until_open.load(Ordering::SeqCst) {
            tracing::debug!(%peer, "connection closed: not serving until the peer is heard from");
            return;
        }
        let Some(slot) = self.take_slot() else {
            drop(stream); // closed before a byte is sent: the client reads EOF
            self.log_refusal(&peer);
            return;
        };
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let server = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _slot = slot;
                tracing::debug!(conn = id, %peer, "connected");
                if let Ok(copy) = stream.try_clone() {
                    server.live.lock().unwrap().insert(id, copy.into_fd());
                }
                if let Err(e) = server.serve(id, stream, accepted) {
                    tracing::warn!(conn = id, %peer, "connection ended with an error: {e}");
                }
                server.live.lock().unwrap().remove(&id);
            });
        if let Err(e) = spawned {
            tracing::error!(conn = id, "cannot start a connection thread: {e}");
        }
    }

    fn serve<S: Stream>(&self, id: u64, stream: S, accepted: Instant) -> io::Result<()> {
        let until = accepted + self.limits.handshake_timeout;
        let mut w = Deadline {
            s: stream.try_clone()?,
            until,
        };
        let mut r = BufReader::with_capacity(64 << 10, Deadline { s: stream, until });
        w.write_all(&handshake::greeting())?;
        let mut flags = [0u8; 4];
        r.read_exact(&mut flags)?;
        let flags = match handshake::parse_client_flags(flags) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(conn = id, "handshake refused: {e}");
                return Ok(());
            }
        };
        let mut neg = Negotiation::new(&self.infos, flags);
        let mut out = Vec::new();
        let agreed = loop {
            let mut h = [0u8; 16];
            r.read_exact(&mut h)?;
            let h = match handshake::parse_option_header(&h) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(conn = id, "handshake refused: {e}; disconnecting");
                    return Ok(());
                }
            };
            let mut data = vec![0u8; h.len as usize];
            r.read_exact(&mut data)?;
            out.clear();
            let outcome = neg.handle(h.option, &data, &mut out);
            match &neg.last_refusal {
                // Clients probe for optional features all the time: not worth a log line.
                Some(why) if why.contains("not supported") => tracing::debug!(conn = id, "{why}"),
                Some(why) => tracing::warn!(conn = id, "{why}"),
                None => {}
            }
            w.write_all(&out)?;
            match outcome {
                Outcome::Continue => {}
                Outcome::Abort => {
                    tracing::debug!(conn = id, "client aborted the handshake");
                    return Ok(());
                }
                Outcome::Disconnect(why) => {
                    tracing::warn!(conn = id, "handshake refused: {why}; disconnecting");
                    return Ok(());
                }
                Outcome::Transmit(a) => break a,
            }
        };
        let export = &self.exports[agreed.export];
        tracing::info!(conn = id, export = %export.info.name, structured = agreed.structured,
            base_allocation = agreed.base_allocation, "client attached");
        let leftover = r.buffer().to_vec();
        let stream = r.into_inner().s;
        stream.set_timeout(None)?;
        drop(w);
        let conn = Conn::new(id, export, &agreed, stream.into_fd(), &leftover)?;
        let stats = conn.run()?;
        tracing::info!(conn = id, export = %export.info.name, requests = stats.requests,
            refused = stats.rejected, "client detached");
        Ok(())
    }
}

/// What the server needs of a connected socket, unix or TCP.
trait Stream: Read + Write + Send + Sized + 'static {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn try_clone(&self) -> io::Result<Self>;
    fn into_fd(self) -> OwnedFd;
}

impl Stream for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn into_fd(self) -> OwnedFd {
        self.into()
    }
}

impl Stream for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn into_fd(self) -> OwnedFd {
        self.into()
    }
}

/// The handshake's socket: each read and write may block only for what is left until `until`.
struct Deadline<S> {
    s: S,
    until: Instant,
}

impl<S: Stream> Deadline<S> {
    fn arm(&self) -> io::Result<()> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Self::expired());
        }
        self.s.set_timeout(Some(left))
    }

    fn expired() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "handshake not finished in time (--nbd-handshake-timeout); disconnected",
        )
    }

    fn check<T>(r: io::Result<T>) -> io::Result<T> {
        match r {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(Self::expired())
            }
            r => r,
        }
    }
}

impl<S: Stream> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        Self::check(self.s.read(buf))
    }
}

impl<S: Stream> Write for Deadline<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        Self::check(self.s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}
