//! The primary's shipper, one per volume: a driver of the session state machine in
//! `core::primary` over quinn. It connects, runs a session until it ends, and starts another
//! (backing off); a refusal that retrying cannot cure stops the loop until an admin asks for a
//! retry or [`SLOW_RETRY`] has passed. Encoding runs off the network threads; a writer task
//! owns the QUIC send stream and a reader task the receive stream, so acknowledgements are
//! handled while a large set is being sent.

use super::core::primary::{
    unix_ms, Event, Limits, PrimaryVolumeState, Session, SessionEnd, Transmit, VerifyProgress,
    VerifyRefusal,
};
use super::core::ReplState;
use super::frame::{Message, Mode, RefuseCode};
use super::stream::{read_message, write_message};
use crate::disk::buf::{SharedPool, VecPool};
use crate::disk::fingerprint::Fingerprint;
use crate::disk::Storage;
use crate::env::Fs;
use crate::journal::Journal;
use crate::repl::identity::GenId;
use crate::transport::{self, Identity};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// After a permanent refusal (split brain, unrelated data, a version or size the mirror will
/// not take), the shipper tries again only this rarely, or when an admin asks: the mirror's
/// admin may have fixed it, and a quiet probe every few minutes costs nothing.
pub const SLOW_RETRY: Duration = Duration::from_secs(600);
/// How often a peer that is a primary too is asked again: an admin's `demote`, `resolve` or
/// failback on either side changes that within seconds, and each ask costs one handshake.
pub const BOTH_PRIMARY_RETRY: Duration = Duration::from_secs(5);
/// The longest wait between retries after an ordinary failure.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What status shows of a shipper. Counters only grow.
#[derive(Default)]
pub struct ShipStats {
    pub link_up: AtomicBool,
    pub sent_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
    pub sent_set: AtomicU64,
    pub acked_set: AtomicU64,
    pub applied_set: AtomicU64,
    pub reconnects: AtomicU64,
    pub copy_total: AtomicU64,
    pub copy_done: AtomicU64,
    pub copying: AtomicBool,
    /// The resync running is of the dirty map's regions (the mirror stays consistent).
    pub dirty_resync: AtomicBool,
    /// The running resync is a comparison (not a plain copy).
    pub comparing: AtomicBool,
    /// The mirror durably holds a consistent copy (as far as this side knows).
    pub mirror_consistent: AtomicBool,
    /// Sessions ended by the stall watchdog.
    pub stalls: AtomicU64,
    pub state: Mutex<ReplState>,
    pub last_error: Mutex<String>,
    /// Why the last session copied or compared (the mirror's decision).
    pub last_decision: Mutex<String>,
    /// Test hook: corrupt the next data set after its CRC is computed.
    pub corrupt_next: AtomicBool,
    /// QUIC path counters, summed over sessions (see `QuicCounters`).
    pub quic: Mutex<QuicCounters>,
    /// When the running resync began (its rate and ETA are reckoned from then).
    pub copy_started: Mutex<Option<std::time::Instant>>,
    /// The admin's online verify: the running one, or the last one.
    pub verify: Mutex<Option<VerifyRun>>,
    /// A planned demotion: the session's answer to "would it lose a write now?" as of the
    /// last time it looked (`Session::demote_blocker`; `Ok`: no, with the data's name then,
    /// (generation, last seq)). None while no session runs.
    pub demotable: Mutex<Option<Result<(GenId, u64), String>>>,
    /// A demotion waits for [`ShipStats::demotable`]: only then does the session answer it
    /// (it takes the journal's lock and the state's copy: not for every set shipped).
    pub demotion_asked: AtomicBool,
    /// The peer answered as a secondary since this start (a decision, or a refusal only a
    /// mirror gives): this side may serve its clients.
    pub peer_is_secondary: AtomicBool,
    /// The peer answered that it is a primary too (promoted while this side was away).
    pub peer_is_primary: AtomicBool,
    /// That primary peer is an old one this side's promotion replaced (its lineage is the
    /// one this side's promoted generation continued): this side goes on serving.
    pub peer_superseded: AtomicBool,
    /// The peer's account of its data when it is a primary too (sent before its refusal),
    /// and when it came: where the two parted, for a failback or `resolve --discard-local`
    /// on this side ([`ShipStats::fresh_peer_claim`]).
    pub peer_claim: Mutex<Option<(crate::repl::identity::PrimaryClaim, std::time::Instant)>>,
    /// Bytes of the regions a peer gave up (its divergent tail) resynced from here since start.
    pub taken_over_bytes: AtomicU64,
    /// The clients are being served (the start gate opened): a primary peer met now that was
    /// promoted from this side's data is a split brain, recorded as such.
    pub serving: AtomicBool,
}

/// How long what a primary peer said of its data is trusted: two primaries ask each other
/// every [`BOTH_PRIMARY_RETRY`], so a claim older than this is a peer that went quiet
/// (stopped, cut off, perhaps demoted since): nothing is given up on its word.
pub const PEER_CLAIM_FRESH: Duration = Duration::from_secs(15);

impl ShipStats {
    /// The peer's claim as a primary, if it said it within [`PEER_CLAIM_FRESH`].
    pub fn fresh_peer_claim(&self) -> Option<crate::repl::identity::PrimaryClaim> {
        self.peer_claim
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(_, at)| at.elapsed() < PEER_CLAIM_FRESH)
            .map(|(c, _)| c.clone())
    }
}

/// An online verify an admin asked for (`blkmirror verify`), as status shows it.
#[derive(Clone, Debug)]
pub struct VerifyRun {
    /// Numbers runs of this volume (1, 2, ...): `blkmirror verify` waits for the one it
    /// started.
    pub run: u64,
    pub repair: bool,
    pub state: VerifyState,
    pub progress: VerifyProgress,
    pub started: std::time::Instant,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyState {
    /// Asked for; the session starts it at its next turn.
    Starting,
    Running,
    Done,
    /// The session ended (or could not start it): why.
    Interrupted(String),
}

impl VerifyRun {
    /// Its entry in status (keys are a contract: extend, never rename).
    pub fn status(&self) -> serde_json::Value {
        let p = &self.progress;
        let ranges = |r: &[(u64, u64)]| -> Vec<serde_json::Value> {
            r.iter()
                .take(MAX_RANGES_SHOWN)
                .map(|&(o, l)| serde_json::json!({ "offset": o, "length": l }))
                .collect()
        };
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = (elapsed > 0.0).then(|| p.compared_bytes as f64 / elapsed);
        let left = p.total_bytes.saturating_sub(p.compared_bytes);
        let (state, why) = match &self.state {
            VerifyState::Starting => ("starting", None),
            VerifyState::Running => ("running", None),
            VerifyState::Done => ("done", None),
            VerifyState::Interrupted(why) => ("interrupted", Some(why.clone())),
        };
        serde_json::json!({
            "run": self.run,
            "state": state,
            "interrupted_by": why,
            "repair": self.repair,
            "total_bytes": p.total_bytes,
            "compared_bytes": p.compared_bytes,
            "differing_bytes": p.differing_bytes(),
            "differing_ranges": ranges(&p.differing),
            "differing_range_count": p.differing.len(),
            "repaired_bytes": p.repaired_bytes,
            "unverified_ranges": ranges(&p.unverified),
            "unverified_range_count": p.unverified.len(),
            "started_at": super::mirror::fmt_time(self.started_ms),
            "finished_at": self.finished_ms.and_then(super::mirror::fmt_time),
            "rate_bytes_per_second": rate,
            "eta_seconds": match rate {
                Some(r) if r > 0.0 && self.state == VerifyState::Running => Some(left as f64 / r),
                _ => None,
            },
        })
    }
}

/// Ranges listed in status, at most (the counts say how many there are): a volume that
/// differs everywhere must not make a status document of megabytes.
const MAX_RANGES_SHOWN: usize = 1000;

/// What the transport reports of the path: packets sent and lost (lost or retransmitted are
/// what a flooded queue shows), congestion window and round-trip time now.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct QuicCounters {
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
    pub congestion_events: u64,
    pub cwnd: u64,
    pub rtt_ms: f64,
    pub min_rtt_ms: f64,
    /// UDP payload size now in use (MTU discovery raises it to what the path carries).
    pub mtu: u16,
    /// Counters of sessions that ended (the current one is added on top).
    #[serde(skip)]
    done: (u64, u64, u64, u64),
}

impl QuicCounters {
    fn update(&mut self, conn: &quinn::Connection) {
        let p = conn.stats().path;
        self.sent_packets = self.done.0 + p.sent_packets;
        self.lost_packets = self.done.1 + p.lost_packets;
        self.lost_bytes = self.done.2 + p.lost_bytes;
        self.congestion_events = self.done.3 + p.congestion_events;
        self.cwnd = p.cwnd;
        self.rtt_ms = p.rtt.as_secs_f64() * 1e3;
        self.min_rtt_ms = p.min_rtt.as_secs_f64() * 1e3;
        self.mtu = p.current_mtu;
    }

    fn end_session(&mut self) {
        self.done = (
            self.sent_packets,
            self.lost_packets,
            self.lost_bytes,
            self.congestion_events,
        );
    }
}

/// The primary's persisted per-volume state (identity, generations, the disk it was last
/// seen on) with where it lives; shared by the shipper, status and admin commands.
pub struct VolumeRecord {
    fs: Fs,
    path: PathBuf,
    state: Mutex<PrimaryVolumeState>,
    /// The volume's disk as found at start.
    pub disk: Fingerprint,
    /// An admin asked for a retry (or accepted the volume): the shipper wakes.
    pub retry: tokio::sync::Notify,
    /// Room for the state file when the journal filled the file system.
    reserve: Option<Arc<crate::env::Reserve>>,
}

impl VolumeRecord {
    pub fn new(fs: Fs, path: PathBuf, state: PrimaryVolumeState, disk: Fingerprint) -> Self {
        VolumeRecord {
            fs,
            path,
            state: Mutex::new(state),
            disk,
            retry: tokio::sync::Notify::new(),
            reserve: None,
        }
    }

    /// Save through `reserve` (`env::Reserve`): given back when the file system is full.
    pub fn with_reserve(mut self, reserve: Arc<crate::env::Reserve>) -> Self {
        self.reserve = Some(reserve);
        self
    }

    pub fn snapshot(&self) -> PrimaryVolumeState {
        self.state.lock().unwrap().clone()
    }

    fn save(&self, st: &PrimaryVolumeState) -> std::io::Result<()> {
        let save = || st.save(&*self.fs, &self.path);
        match &self.reserve {
            Some(r) => r.write_through(save),
            None => save(),
        }
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("state file {}: {e}", self.path.display()))
        })
    }

    /// Change the state and persist it (the caller runs this off the async threads).
    pub fn update(&self, f: impl FnOnce(&mut PrimaryVolumeState)) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let mut next = st.clone();
        f(&mut next);
        self.save(&next)?;
        *st = next;
        Ok(())
    }

    /// Seal the volume's change time at a clean stop (every write is done): the next start
    /// notices a change made while the daemon was stopped.
    pub fn seal(&self, disk: Fingerprint) -> std::io::Result<()> {
        self.update(|st| {
            if st.volume_changed.is_none() {
                st.identity.fingerprint = Some(disk);
            }
        })
    }
}

pub struct Shipper {
    pub volume: String,
    pub journal: Arc<Journal>,
    pub storage: Arc<dyn Storage>,
    /// The volume as replication reads it: never a range with a change in flight.
    pub reader: Arc<dyn crate::volume::VolumeRead>,
    pub link: ShipLink,
    pub identity: Arc<Identity>,
    pub stats: Arc<ShipStats>,
    pub record: Arc<VolumeRecord>,
    pub limits: Limits,
    /// lz4-compress data that shrinks (off for links faster than lz4 itself).
    pub compress: bool,
    /// Buffers for encoded sets, reused once quinn is done with them ([`ENCODE_POOL_BYTES`]).
    pub encode_pool: Arc<VecPool>,
    /// Woken by the journal when records or dirty ranges arrive.
    pub records: Arc<tokio::sync::Notify>,
}

/// How a shipper reaches its peer: who dials is configuration, whatever the roles.
pub enum ShipLink {
    /// This side dials the peer (`--mirror HOST:PORT`).
    Dial {
        endpoint: quinn::Endpoint,
        peer: SocketAddr,
    },
    /// The peer dials (this side was a mirror, `--listen`, and was promoted): its `Pull`
    /// streams are handed over by the listener, one session each.
    Answer(tokio::sync::Mutex<mpsc::Receiver<Pulled>>),
}

/// A stream a secondary opened and asked this primary to ship on (`Message::Pull`).
pub struct Pulled {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// Pull streams waiting for their shipper: a secondary asks again when one is not taken.
pub const PULLS_QUEUED: usize = 4;

/// Free encode buffers kept for reuse: a few sets' worth.
pub const ENCODE_POOL_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Transport(#[from] transport::TransportError),
    #[error("{0}")]
    Stream(#[from] super::stream::StreamError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Core(#[from] SessionEnd),
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl SessionError {
    fn core(&self) -> Option<&SessionEnd> {
        match self {
            SessionError::Core(e) => Some(e),
            _ => None,
        }
    }
}

impl Shipper {
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        // The peer being a primary too is logged once, not at every ask.
        let mut told_both_primary = false;
        let mut first = true;
        loop {
            if let Some(why) = self.record.snapshot().volume_changed {
                // Nothing is shipped from a volume this state does not describe: the mirror's
                // copy may be the only good one.
                self.set_state(ReplState::VolumeChanged);
                *self.stats.last_error.lock().unwrap() = format!(
                    "{why}; nothing is shipped until an admin accepts the volume (blkmirror \
                     accept-volume)"
                );
                tracing::error!(volume = %self.volume, "{why}: replication is stopped");
                self.record.retry.notified().await;
                continue;
            }
            if !first {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            let was_up = self.stats.link_up.load(Ordering::Relaxed);
            let result = self.session().await;
            self.verify_interrupted(&match &result {
                Ok(()) => "it closed".to_string(),
                Err(e) => e.to_string(),
            });
            let was_up = was_up || self.stats.link_up.swap(false, Ordering::Relaxed);
            *self.stats.demotable.lock().unwrap() = None;
            self.stats.copying.store(false, Ordering::Relaxed);
            if was_up {
                self.peer_lost().await;
            }
            let wait = match result {
                Ok(()) => {
                    self.set_state(ReplState::Connecting);
                    backoff = Duration::from_millis(100);
                    backoff
                }
                Err(e) => {
                    let end = e.core();
                    let state = end.map_or(ReplState::Connecting, SessionEnd::state);
                    if let Some(SessionEnd::Refused { code, .. }) = end {
                        let primary = *code == RefuseCode::BothPrimary as u16;
                        self.stats.peer_is_primary.store(primary, Ordering::Relaxed);
                        self.stats
                            .peer_is_secondary
                            .fetch_or(!primary, Ordering::Relaxed);
                    }
                    self.set_state(state);
                    if matches!(end, Some(SessionEnd::Stalled(_))) {
                        self.stats.stalls.fetch_add(1, Ordering::Relaxed);
                    }
                    *self.stats.last_error.lock().unwrap() = e.to_string();
                    let both_primary = matches!(end, Some(SessionEnd::Refused { code, .. })
                        if *code == RefuseCode::BothPrimary as u16);
                    if !both_primary {
                        told_both_primary = false;
                    }
                    if both_primary {
                        if !std::mem::replace(&mut told_both_primary, true) {
                            tracing::error!(volume = %self.volume, "the peer is a primary too: \
                                {e}; nothing is shipped (asking again every {} s)",
                                BOTH_PRIMARY_RETRY.as_secs());
                        }
                        BOTH_PRIMARY_RETRY
                    } else if end.is_some_and(SessionEnd::permanent) {
                        tracing::error!(volume = %self.volume, "replication refused for good: {e}; \
                            nothing is shipped (retrying every {} s or on `blkmirror retry`)",
                            SLOW_RETRY.as_secs());
                        SLOW_RETRY
                    } else {
                        tracing::warn!(volume = %self.volume, "replication link down: {e}");
                        let b = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        b
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.record.retry.notified() => {}
            }
        }
    }

    fn set_state(&self, s: ReplState) {
        *self.stats.state.lock().unwrap() = s;
    }

    /// The link went down after being up: writes from now on are ones the mirror has not
    /// seen. A new generation is minted for them (DRBD does the same), persisted off the
    /// network threads.
    async fn peer_lost(&self) {
        let next_seq = self.journal.last_seq() + 1;
        let record = self.record.clone();
        let volume = self.volume.clone();
        let minted = tokio::task::spawn_blocking(move || {
            let gen = GenId::random();
            record
                .update(|st| st.identity.lineage.mint(gen, next_seq, true))
                .map(|()| gen)
        })
        .await;
        match minted {
            Ok(Ok(gen)) => {
                tracing::info!(volume = %volume, %gen, first_seq = next_seq, "peer lost: new generation")
            }
            Ok(Err(e)) => {
                tracing::warn!(volume = %volume, "cannot persist a new generation: {e}")
            }
            Err(e) => tracing::warn!(volume = %volume, "generation task failed: {e}"),
        }
    }

    async fn session(self: &Arc<Self>) -> Result<(), SessionError> {
        let (conn, mut send, recv) = match &self.link {
            ShipLink::Dial { endpoint, peer } => {
                let conn = transport::connect(endpoint, *peer, &self.identity).await?;
                let (send, recv) = conn.open_bi().await?;
                (conn, send, recv)
            }
            ShipLink::Answer(pulls) => {
                let p =
                    pulls.lock().await.recv().await.ok_or_else(|| {
                        SessionEnd::Protocol("this side no longer listens".into())
                    })?;
                tracing::info!(volume = %self.volume, peer = %p.conn.remote_address(),
                    "the secondary asks for the volume: shipping to it");
                (p.conn, p.send, p.recv)
            }
        };
        let claim = self
            .record
            .snapshot()
            .claim(&self.journal, &self.record.disk);
        let (mut sess, opening) = Session::start(
            self.limits.clone(),
            &self.volume,
            self.storage.size(),
            claim,
            Instant::now().into_std(),
        );
        #[cfg(feature = "test-hooks")]
        if std::env::var_os("BLKMIRROR_TEST_PLANT_ACK_EARLY").is_some() {
            sess.bugs.ack_one_set_early = true;
        }
        for m in &opening {
            write_message(&mut send, m).await?;
        }
        // The reader: whole messages from the mirror, in order.
        let (in_tx, mut in_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut recv = recv;
            // The mirror's messages are small: a few pages each.
            let pool = SharedPool::new(1 << 20);
            loop {
                let m = read_message(&mut recv, &pool).await;
                let end = !matches!(m, Ok(Some(_)));
                if in_tx.send(m).is_err() || end {
                    return;
                }
            }
        });
        // The writer: encodes and sends what the session hands out, two at most queued.
        let (out_tx, out_rx) = mpsc::channel::<Transmit>(2);
        let writer = tokio::spawn(self.clone().writer(send, out_rx));
        let sampler = {
            let (stats, conn) = (self.stats.clone(), conn.clone());
            tokio::spawn(async move {
                loop {
                    stats.quic.lock().unwrap().update(&conn);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let result = self.drive(&mut sess, &mut in_rx, &out_tx, writer).await;
        sampler.abort();
        reader.abort();
        // A peer that closed on us usually said why (a refusal): that is the error to show.
        let result = match (result, conn.close_reason()) {
            (Err(SessionError::Stream(e)), Some(reason)) => Err(SessionError::Core(
                SessionEnd::Protocol(format!("{e}; {reason}")),
            )),
            (r, _) => r,
        };
        {
            let mut q = self.stats.quic.lock().unwrap();
            q.update(&conn);
            q.end_session();
        }
        conn.close(0u32.into(), b"session over");
        result
    }

    /// Run `sess` until it ends: hand out transmits while the writer has room, feed it the
    /// mirror's messages and the passing of time.
    async fn drive(
        &self,
        sess: &mut Session,
        in_rx: &mut mpsc::UnboundedReceiver<
            Result<Option<(Message, crate::disk::buf::BlockBytes)>, super::stream::StreamError>,
        >,
        out_tx: &mpsc::Sender<Transmit>,
        mut writer: tokio::task::JoinHandle<Result<(), SessionError>>,
    ) -> Result<(), SessionError> {
        loop {
            let notified = self.records.notified();
            let mut writer_full = false;
            loop {
                // Every message already received first: acknowledgements trim the journal and
                // clear resynced regions now, not once the window is full (a resync's window
                // is 256 MiB: status and the dirty map would lag by as much).
                while let Ok(m) = in_rx.try_recv() {
                    self.on_incoming(sess, m).await?;
                }
                let Ok(permit) = out_tx.try_reserve() else {
                    writer_full = true;
                    break;
                };
                let now = Instant::now().into_std();
                // Blocking calls (the journal's lock, which a client's write holds across its
                // file write; the volume, read 8 MiB at a time during a copy): in place, so the
                // worker's other connections go on on another thread meanwhile (issue 13).
                match tokio::task::block_in_place(|| {
                    sess.poll_transmit(now, &self.journal, &*self.reader)
                })? {
                    Some(t) => permit.send(t),
                    None => break,
                }
                self.show_resync_progress(sess);
            }
            self.show_resync_progress(sess);
            self.show_demotable(sess);
            if self.verify_turn(sess) {
                // Started now: its first units are due.
                continue;
            }
            let timeout = Instant::from_std(sess.poll_timeout());
            tokio::select! {
                m = in_rx.recv() => match m {
                    Some(m) => self.on_incoming(sess, m).await?,
                    None => {
                        return Err(SessionEnd::Protocol("mirror closed the stream".into()).into())
                    }
                },
                _ = tokio::time::sleep_until(timeout) => sess.on_timeout(Instant::now().into_std())?,
                _ = notified => {}
                r = out_tx.reserve(), if writer_full => drop(r),
                r = &mut writer => {
                    return match r {
                        Ok(Ok(())) => Err(SessionEnd::Protocol("sending stopped".into()).into()),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(SessionEnd::Protocol(format!("sender: {e}")).into()),
                    };
                }
            }
        }
    }

    /// Whether a demotion would lose a write now, for `demote` (the writes have stopped when it
    /// asks).
    fn show_demotable(&self, sess: &Session) {
        if !self.stats.demotion_asked.load(Ordering::Relaxed) {
            return;
        }
        let answer = match sess.demote_blocker(&self.journal, 0) {
            Some(why) => Err(why),
            None => match self.record.snapshot().identity.lineage.current() {
                Some(span) => Ok((span.gen, self.journal.last_seq())),
                None => Err("the volume has no generation yet".into()),
            },
        };
        *self.stats.demotable.lock().unwrap() = Some(answer);
    }

    /// A running copy's, comparison's or resync's progress, for status.
    fn show_resync_progress(&self, sess: &Session) {
        if let Some((done, total)) = sess.resync_progress() {
            self.stats.copy_done.store(done, Ordering::Relaxed);
            self.stats.copy_total.store(total, Ordering::Relaxed);
        }
    }

    /// One message from the reader: handed to the session, its events acted on.
    async fn on_incoming(
        &self,
        sess: &mut Session,
        m: Result<Option<(Message, crate::disk::buf::BlockBytes)>, super::stream::StreamError>,
    ) -> Result<(), SessionError> {
        let msg = match m {
            Ok(Some((msg, _))) => msg,
            Ok(None) => return Err(SessionEnd::Protocol("mirror closed the stream".into()).into()),
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now().into_std();
        // An acknowledgement trims the journal (its lock, segment files): blocking, in place.
        let events = tokio::task::block_in_place(|| sess.on_message(msg, now, &self.journal))?;
        for ev in events {
            self.on_event(ev, sess).await?;
        }
        Ok(())
    }

    /// Start the verify an admin asked for, and show the running one's progress. True when
    /// one was started now.
    fn verify_turn(&self, sess: &mut Session) -> bool {
        let mut guard = self.stats.verify.lock().unwrap();
        let Some(v) = guard.as_mut() else {
            return false;
        };
        match v.state {
            VerifyState::Starting => match sess.start_verify(v.repair, Instant::now().into_std()) {
                Ok(()) => {
                    tracing::info!(volume = %self.volume, run = v.run, repair = v.repair, "online verify started");
                    v.state = VerifyState::Running;
                    v.started = std::time::Instant::now();
                    return true;
                }
                // The decision is still to come.
                Err(VerifyRefusal::NotConnected) => {}
                Err(VerifyRefusal::Resyncing) => {
                    v.state = VerifyState::Interrupted(
                        "a resync runs (the mirror is not yet a complete copy): verify once it \
                         is done"
                            .into(),
                    );
                }
                Err(VerifyRefusal::Running) => {
                    v.state = VerifyState::Interrupted("another verify runs".into());
                }
            },
            VerifyState::Running => {
                if let Some(p) = sess.verify_progress() {
                    v.progress = p.clone();
                    if p.done {
                        v.state = VerifyState::Done;
                        v.finished_ms = Some(unix_ms(std::time::SystemTime::now()));
                        tracing::info!(volume = %self.volume, run = v.run,
                            compared_bytes = p.compared_bytes,
                            differing_bytes = p.differing_bytes(),
                            differing_ranges = p.differing.len(),
                            repaired_bytes = p.repaired_bytes,
                            unverified_ranges = p.unverified.len(),
                            "online verify finished");
                    }
                }
            }
            VerifyState::Done | VerifyState::Interrupted(_) => {}
        }
        false
    }

    /// The session ended: a verify it ran (or was to start) is interrupted.
    fn verify_interrupted(&self, why: &str) {
        let mut guard = self.stats.verify.lock().unwrap();
        if let Some(v) = guard
            .as_mut()
            .filter(|v| matches!(v.state, VerifyState::Starting | VerifyState::Running))
        {
            tracing::warn!(volume = %self.volume, run = v.run, "online verify interrupted: {why}");
            v.state = VerifyState::Interrupted(format!("the session with the mirror ended: {why}"));
            v.finished_ms = Some(unix_ms(std::time::SystemTime::now()));
        }
    }

    async fn on_event(&self, ev: Event, sess: &Session) -> Result<(), SessionError> {
        match ev {
            Event::AdoptUuid(uuid) => {
                let record = self.record.clone();
                tokio::task::spawn_blocking(move || {
                    record.update(|st| st.identity.uuid = Some(uuid))
                })
                .await
                .map_err(|e| SessionEnd::Protocol(e.to_string()))??;
                tracing::info!(volume = %self.volume, %uuid, "volume identity adopted from the mirror");
            }
            Event::Up {
                mode,
                durable_set,
                durable_seq,
                reason,
            } => {
                // Both sides' identities with the decision: this side's generation and
                // lineage, the mirror's answer (the pair's UUID, the durable point it holds).
                let ours = self.record.snapshot().identity;
                tracing::info!(volume = %self.volume, ?mode, uuid = ?ours.uuid,
                    generation = ?ours.lineage.current().map(|s| s.gen),
                    mirror_durable_set = durable_set, mirror_durable_seq = durable_seq, %reason,
                    "replication link up");
                self.stats.link_up.store(true, Ordering::Relaxed);
                self.stats.peer_is_secondary.store(true, Ordering::Relaxed);
                self.stats.peer_is_primary.store(false, Ordering::Relaxed);
                self.stats.peer_claim.lock().unwrap().take();
                let st = self.record.snapshot();
                if st.split_brain.is_some() || st.served_unconfirmed {
                    // The peer answers as a secondary: no split brain (any more).
                    let record = self.record.clone();
                    tokio::task::spawn_blocking(move || {
                        record.update(|st| {
                            st.split_brain = None;
                            st.served_unconfirmed = false;
                        })
                    })
                    .await
                    .map_err(|e| SessionEnd::Protocol(e.to_string()))??;
                }
                self.stats.acked_set.store(durable_set, Ordering::Relaxed);
                self.stats.last_error.lock().unwrap().clear();
                *self.stats.last_decision.lock().unwrap() = reason;
                let resync = mode != Mode::Resume;
                // A resync of dirty regions keeps the mirror consistent (it is staged there).
                let dirty = sess.resyncing_dirty();
                self.stats
                    .mirror_consistent
                    .store(!resync, Ordering::Relaxed);
                self.stats.copying.store(resync || dirty, Ordering::Relaxed);
                self.stats.dirty_resync.store(dirty, Ordering::Relaxed);
                self.stats
                    .comparing
                    .store(mode == Mode::Compare, Ordering::Relaxed);
                self.stats.copy_done.store(0, Ordering::Relaxed);
                *self.stats.copy_started.lock().unwrap() = Some(std::time::Instant::now());
                self.stats.copy_total.store(
                    sess.resync_progress().map_or(self.storage.size(), |p| p.1),
                    Ordering::Relaxed,
                );
                self.set_state(if resync || dirty {
                    ReplState::Resyncing
                } else {
                    ReplState::Replicating
                });
                if resync {
                    tracing::info!(volume = %self.volume, bytes = self.storage.size(),
                        compare = mode == Mode::Compare, "full copy starts");
                }
            }
            Event::Acked { set, applied_set } => {
                self.stats.acked_set.store(set, Ordering::Relaxed);
                self.stats.applied_set.store(applied_set, Ordering::Relaxed);
                if sess.resync_progress().is_none()
                    && self.stats.copying.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(volume = %self.volume, "full copy sent");
                }
            }
            Event::MirrorConsistent => {
                tracing::info!(volume = %self.volume, "the mirror holds a consistent copy again");
                self.stats.mirror_consistent.store(true, Ordering::Relaxed);
                self.set_state(ReplState::Replicating);
            }
            Event::PeerPrimary(claim) => {
                let promoted = claim
                    .lineage
                    .latest_promoted()
                    .map(|i| claim.lineage.spans[i].gen);
                let ours = self.record.snapshot();
                let seen = self.stats.serving.load(Ordering::Relaxed)
                    && crate::repl::identity::supersedes(&claim.lineage, &ours.identity.lineage)
                    && ours.split_brain != promoted;
                *self.stats.peer_claim.lock().unwrap() = Some((*claim, std::time::Instant::now()));
                if seen {
                    tracing::error!(volume = %self.volume, "split brain: this side serves its \
                        clients, and its peer was promoted from its data; nothing is resolved \
                        automatically (blkmirror resolve --discard-local on the side whose \
                        writes are given up)");
                    let record = self.record.clone();
                    tokio::task::spawn_blocking(move || {
                        record.update(|st| st.split_brain = promoted)
                    })
                    .await
                    .map_err(|e| SessionEnd::Protocol(e.to_string()))??;
                }
            }
            Event::TakenOver { bytes, .. } => {
                self.stats
                    .taken_over_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Encode and send whatever the session hands out, in order.
    async fn writer(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut rx: mpsc::Receiver<Transmit>,
    ) -> Result<(), SessionError> {
        while let Some(t) = rx.recv().await {
            match t {
                Transmit::Message(m) => {
                    write_message(&mut send, &m).await?;
                }
                Transmit::Set { set, known } => {
                    let number = set.set;
                    let compress = self.compress;
                    let pool = self.encode_pool.clone();
                    // Folding, CRCs and lz4 take milliseconds per set: off the network threads.
                    #[allow(unused_mut)]
                    let (mut chunks, stats) = tokio::task::spawn_blocking(move || {
                        if compress {
                            // Sized once: growing an 8 MiB buffer by doubling copies it again
                            // and again.
                            let mut buf = pool.take(
                                usize::try_from(set.max_body_len()).unwrap_or(0)
                                    + super::frame::PREFIX_LEN,
                            );
                            let stats = super::frame::encode_with_crcs(
                                &Message::Set(set),
                                &mut buf,
                                true,
                                &known,
                            );
                            (vec![pool.lend(buf)], stats)
                        } else {
                            // Uncompressed, the data is sent from the journal's own buffers.
                            super::frame::encode_set_chunks(&set, &known)
                        }
                    })
                    .await
                    .map_err(|e| SessionEnd::Protocol(format!("encoder task: {e}")))?;
                    #[cfg(feature = "test-hooks")]
                    if self.stats.corrupt_next.load(Ordering::Relaxed) {
                        let mut flat = chunks.concat();
                        if super::frame::corrupt_first_data_byte(&mut flat) {
                            chunks = vec![bytes::Bytes::from(flat)];
                            self.stats.corrupt_next.store(false, Ordering::Relaxed);
                            tracing::warn!(volume = %self.volume, set = number, "test hook: corrupted a byte of this set after its CRC");
                        }
                    }
                    // Handed over, not copied: quinn keeps the chunks until the mirror
                    // acknowledges them.
                    send.write_all_chunks(&mut chunks)
                        .await
                        .map_err(super::stream::StreamError::from)?;
                    self.stats
                        .sent_bytes
                        .fetch_add(stats.raw_bytes, Ordering::Relaxed);
                    self.stats
                        .wire_bytes
                        .fetch_add(stats.wire_bytes, Ordering::Relaxed);
                    self.stats.sent_set.store(number, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}
