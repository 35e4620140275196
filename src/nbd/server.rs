//! The NBD server: listeners, one thread per connection, the handshake driven over a blocking
//! socket, then the transmission phase handed to [`Conn`].

use super::conn::Conn;
use super::handshake::{self, ExportInfo, Negotiation, Outcome};
use crate::disk::Storage;
use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A client that says nothing useful for this long during the handshake is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Export {
    pub info: ExportInfo,
    pub storage: Arc<dyn Storage>,
    /// Present when the volume is replicated: every change is journaled before its reply.
    pub journal: Option<Arc<crate::journal::Journal>>,
    /// Block ranges of changes in flight, across all of the volume's connections.
    pub locks: Arc<crate::disk::ranges::RangeLocks>,
}

pub struct Server {
    exports: Vec<Export>,
    infos: Vec<ExportInfo>,
    next_conn: AtomicU64,
}

impl Server {
    pub fn new(exports: Vec<Export>) -> Arc<Server> {
        let infos = exports.iter().map(|e| e.info.clone()).collect();
        Arc::new(Server {
            exports,
            infos,
            next_conn: AtomicU64::new(1),
        })
    }

    pub fn spawn_unix(
        self: &Arc<Self>,
        listener: UnixListener,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let server = self.clone();
        std::thread::Builder::new()
            .name("nbd-unix-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => server.spawn_conn(s, "unix".into()),
                        Err(e) => tracing::warn!("accept on unix socket: {e}"),
                    }
                }
            })
    }

    pub fn spawn_tcp(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let server = self.clone();
        std::thread::Builder::new()
            .name("nbd-tcp-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => {
                            let peer = s
                                .peer_addr()
                                .map_or_else(|_| "tcp".into(), |a| a.to_string());
                            let _ = s.set_nodelay(true);
                            server.spawn_conn(s, peer)
                        }
                        Err(e) => tracing::warn!("accept on tcp socket: {e}"),
                    }
                }
            })
    }

    fn spawn_conn<S: Stream>(self: &Arc<Self>, stream: S, peer: String) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let server = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                tracing::debug!(conn = id, %peer, "connected");
                if let Err(e) = server.serve(id, stream) {
                    tracing::warn!(conn = id, %peer, "connection ended with an error: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::error!(conn = id, "cannot start a connection thread: {e}");
        }
    }

    fn serve<S: Stream>(&self, id: u64, stream: S) -> io::Result<()> {
        stream.set_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut w = stream.try_clone_stream()?;
        let mut r = BufReader::with_capacity(64 << 10, stream);
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
        let stream = r.into_inner();
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
trait Stream: Read + Send + 'static {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn try_clone_stream(&self) -> io::Result<Box<dyn Write>>;
    fn into_fd(self) -> OwnedFd;
}

impl Stream for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn try_clone_stream(&self) -> io::Result<Box<dyn Write>> {
        Ok(Box::new(self.try_clone()?))
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
    fn try_clone_stream(&self) -> io::Result<Box<dyn Write>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn into_fd(self) -> OwnedFd {
        self.into()
    }
}
