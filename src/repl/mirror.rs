//! The mirror daemon's replication side: accepts authenticated primaries, makes every delta set
//! durable in the redo log before acknowledging it, and applies sets in order on a thread per
//! volume.

use super::apply::{self, Applier, CopyState, VolumeState};
use super::frame::{DeltaSet, Message, SetKind, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION};
use super::redo::RedoLog;
use super::stream::{read_message, write_message, StreamError};
use crate::disk::buf::{BlockBytes, SharedPool};
use crate::disk::file::{FileStorage, IoMode};
use crate::disk::spec::VolumeSpec;
use crate::env::{Fs, Handle};
use crate::extent::Payload;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Instant;
use tokio::sync::OwnedSemaphorePermit;

/// Refusal codes in `Message::Refuse`.
pub mod refuse {
    pub const VERSION: u16 = 1;
    pub const UNKNOWN_VOLUME: u16 = 2;
    pub const SIZE_MISMATCH: u16 = 3;
    pub const BAD_SET: u16 = 4;
    pub const BAD_MESSAGE: u16 = 5;
    pub const DISK_FAILED: u16 = 6;
}

/// Bytes received but not yet durable, at most (per session).
const PENDING_BYTES: usize = 32 << 20;
/// Data bytes of sets durable in the redo log but not yet applied, at most, held in memory
/// for the applier (I5). When applying falls behind, the receiver waits and QUIC flow control
/// makes the primary wait: the backlog stays in the primary's journal.
const APPLY_QUEUE_BYTES: usize = 32 << 20;

/// The mirror volume is synced and its applied set saved at most this often.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Free receive buffers kept for reuse: a set's worth of each size class, roughly.
const RECEIVE_POOL_BYTES: usize = 64 << 20;

/// Room a set takes in the apply queue (at least 1, at most the whole queue).
fn apply_cost(set: &DeltaSet) -> usize {
    let data: usize = set
        .extents
        .iter()
        .map(|e| match &e.payload {
            Payload::Data(d) => d.len(),
            Payload::Zero(_) => 0,
        })
        .sum();
    data.clamp(1, APPLY_QUEUE_BYTES)
}

/// Bytes of sets handed to the applier and not yet applied (see [`APPLY_QUEUE_BYTES`]). The
/// sync thread waits for room; both sides are plain threads.
struct ApplyBudget {
    free: Mutex<usize>,
    room: Condvar,
}

struct ApplyPermit {
    budget: Arc<ApplyBudget>,
    bytes: usize,
}

impl ApplyBudget {
    fn new(bytes: usize) -> Arc<ApplyBudget> {
        Arc::new(ApplyBudget {
            free: Mutex::new(bytes),
            room: Condvar::new(),
        })
    }

    fn acquire(self: &Arc<Self>, bytes: usize) -> ApplyPermit {
        let mut free = self.free.lock().unwrap();
        while *free < bytes {
            free = self.room.wait(free).unwrap();
        }
        *free -= bytes;
        ApplyPermit {
            budget: self.clone(),
            bytes,
        }
    }
}

impl Drop for ApplyPermit {
    fn drop(&mut self) {
        *self.budget.free.lock().unwrap() += self.bytes;
        self.budget.room.notify_all();
    }
}

type AckResult = Result<Durable, (u16, String)>;
type AckSender = tokio::sync::mpsc::UnboundedSender<AckResult>;

/// Work for a volume's durability pipeline, from its sessions, in arrival order.
enum Job {
    /// A received set: write it to the redo log, sync, acknowledge, apply.
    Set {
        generation: u64,
        set: DeltaSet,
        raw: BlockBytes,
        /// Holds the session's receive budget until the set is durable.
        received: OwnedSemaphorePermit,
        ack: AckSender,
    },
    /// A session starts: sets still queued from sessions before it are dropped (their primary
    /// is the one reconnecting, and re-sends them), and `reply` gets the durable state once
    /// everything written before has been synced and handed to the applier.
    Barrier {
        generation: u64,
        reply: tokio::sync::oneshot::Sender<Durable>,
    },
}

/// A set the redo writer accepted (the next one, inside the volume), with what it holds until
/// it is durable and the durable state once it is.
struct Accepted {
    set: DeltaSet,
    /// The message as received, which the redo log writes.
    raw: BlockBytes,
    received: OwnedSemaphorePermit,
    ack: AckSender,
    after: Durable,
}

/// From the redo writer to the sync thread.
enum ToSync {
    /// Sets written to `file`, durable once it is synced.
    Written {
        file: Handle,
        sets: Vec<Accepted>,
    },
    /// A set refused (not written): answered in order, after the sets before it.
    Refused(AckSender, (u16, String)),
    Barrier(tokio::sync::oneshot::Sender<Durable>),
}

/// Sets written per redo batch, at most: larger groups would only delay the first acks.
const BATCH_BYTES: usize = 32 << 20;

#[derive(Clone, Copy, Debug, Default)]
struct Durable {
    set: u64,
    seq: u64,
    copy_done: bool,
}

#[derive(Default)]
pub struct MirrorStats {
    pub link_up: AtomicBool,
    pub received_bytes: AtomicU64,
    pub sessions: AtomicU64,
    pub refused: AtomicU64,
    pub last_error: Mutex<String>,
    /// Applying to the volume failed: the mirror is no longer being updated.
    pub failed: AtomicBool,
}

pub struct MirrorVolume {
    pub name: String,
    fs: Fs,
    pub size: u64,
    redo: Mutex<RedoLog>,
    durable: Mutex<Durable>,
    pub state: Arc<Mutex<VolumeState>>,
    /// Into the durability pipeline: redo writer thread, then sync thread, then applier thread.
    /// It belongs to the volume, not to a session, so a session that is replaced or dropped
    /// never leaves a durable set unapplied.
    jobs: mpsc::Sender<Job>,
    /// Sessions so far; a new one makes the queued sets of older ones stale.
    generation: AtomicU64,
    /// Bounds the sets waiting for the applier (see [`APPLY_QUEUE_BYTES`]).
    apply_budget: Arc<ApplyBudget>,
    pub stats: MirrorStats,
    session: Mutex<Option<tokio::task::AbortHandle>>,
    /// The applied set as of the last checkpoint (volume synced, state saved).
    checkpointed: AtomicU64,
}

impl MirrorVolume {
    /// Open the volume, replay its redo log, start its applier thread.
    pub fn open(fs: &Fs, spec: &VolumeSpec, state_dir: &Path) -> io::Result<Arc<MirrorVolume>> {
        // Direct I/O: through the page cache, each small write cost more CPU in ext4 than the
        // copy itself (large folios), and fsync then paid for the writeback.
        let storage = FileStorage::open(spec, IoMode::Direct).map_err(io::Error::other)?;
        let size = crate::disk::Storage::size(&storage);
        let mut applier = Applier::new(storage)?;
        let state_path = VolumeState::path(state_dir, &spec.name);
        let mut state = VolumeState::load(&**fs, &state_path)?;
        let mut redo = RedoLog::open(fs, &apply::redo_dir(state_dir, &spec.name))?;
        let replayed = apply::replay(&mut applier, &mut redo, &mut state, &**fs, &state_path)?;
        if replayed > 0 {
            tracing::info!(volume = %spec.name, sets = replayed, "redo log replayed");
        }
        tracing::info!(volume = %spec.name, applied_set = state.applied_set, copy = ?state.copy,
            consistent = state.consistent(), "mirror volume open");
        let durable = Durable {
            set: state.applied_set,
            seq: state.applied_seq,
            copy_done: state.copy == CopyState::Done,
        };
        let (jobs, jobs_rx) = mpsc::channel();
        let (sync_tx, sync_rx) = mpsc::channel();
        let (apply_tx, apply_rx) = mpsc::channel();
        let vol = Arc::new(MirrorVolume {
            name: spec.name.clone(),
            fs: fs.clone(),
            size,
            redo: Mutex::new(redo),
            durable: Mutex::new(durable),
            state: Arc::new(Mutex::new(state)),
            jobs,
            generation: AtomicU64::new(0),
            apply_budget: ApplyBudget::new(APPLY_QUEUE_BYTES),
            stats: MirrorStats::default(),
            session: Mutex::new(None),
            checkpointed: AtomicU64::new(durable.set),
        });
        let v = vol.clone();
        std::thread::Builder::new()
            .name(format!("redo-{}", spec.name))
            .spawn(move || v.redo_loop(jobs_rx, sync_tx))?;
        let v = vol.clone();
        std::thread::Builder::new()
            .name(format!("sync-{}", spec.name))
            .spawn(move || v.sync_loop(sync_rx, apply_tx))?;
        let v = vol.clone();
        std::thread::Builder::new()
            .name(format!("apply-{}", spec.name))
            .spawn(move || v.apply_loop(applier, apply_rx, state_path))?;
        Ok(vol)
    }

    /// Apply sets in order. The volume is synced and the state saved (a checkpoint) at most
    /// every [`CHECKPOINT_EVERY`], not per batch: until then the redo log still holds every
    /// set since the last checkpoint, and a crash replays them (idempotent). Per batch, the
    /// volume fsync, the state file's fsync and its directory's fsync had stalled applying
    /// for several milliseconds each time.
    fn apply_loop(
        &self,
        mut applier: Applier,
        rx: mpsc::Receiver<(DeltaSet, ApplyPermit)>,
        state_path: PathBuf,
    ) {
        let mut last_checkpoint = Instant::now();
        let mut unsaved = false;
        loop {
            let first = if unsaved {
                let wait = CHECKPOINT_EVERY.saturating_sub(last_checkpoint.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(s) => Some(s),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(s) => Some(s),
                    Err(_) => return,
                }
            };
            let result = (|| -> io::Result<()> {
                if let Some(first) = first {
                    let mut batch = vec![first];
                    while batch.len() < 64 {
                        match rx.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                    let mut next = self.state.lock().unwrap().clone();
                    for (set, _) in &batch {
                        // Sets arrive in order, each once; a gap would be silent divergence.
                        if set.set != next.applied_set + 1 {
                            return Err(io::Error::other(format!(
                                "set {} reached the applier after set {}",
                                set.set, next.applied_set
                            )));
                        }
                        applier.apply(set)?;
                        next.advance(set);
                    }
                    // Applied, not yet durable: status shows it, the redo log keeps it.
                    *self.state.lock().unwrap() = next;
                    unsaved = true;
                }
                if unsaved && last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                    applier.sync()?;
                    let state = self.state.lock().unwrap().clone();
                    state.save(&*self.fs, &state_path)?;
                    self.checkpointed
                        .store(state.applied_set, Ordering::Relaxed);
                    last_checkpoint = Instant::now();
                    unsaved = false;
                    // Not behind a redo fsync: if the log is busy, the next append trims.
                    if let Ok(mut redo) = self.redo.try_lock() {
                        if let Err(e) = redo.trim(state.applied_set) {
                            tracing::warn!(volume = %self.name, "cannot trim the redo log: {e}");
                        }
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                // The redo log still holds the sets.
                self.fail_disk(
                    format!("mirror disk failed: {e}"),
                    "applying to the mirror volume",
                );
                return;
            }
        }
    }

    /// This volume's entry in the mirror's status document.
    pub fn status(&self) -> serde_json::Value {
        let d = *self.durable.lock().unwrap();
        let st = self.state.lock().unwrap().clone();
        let failed = self.stats.failed.load(Ordering::Relaxed);
        let sessions = self.stats.sessions.load(Ordering::Relaxed);
        serde_json::json!({
            "name": self.name,
            "link": if self.stats.link_up.load(Ordering::Relaxed) { "up" } else { "down" },
            "lag_bytes": serde_json::Value::Null,
            "lag_seconds": serde_json::Value::Null,
            "journal_bytes": self.redo.lock().unwrap().bytes(),
            "sent_bytes": 0,
            "wire_bytes": self.stats.received_bytes.load(Ordering::Relaxed),
            "received_bytes": self.stats.received_bytes.load(Ordering::Relaxed),
            "acked_set": d.set,
            "durable_seq": d.seq,
            "applied_set": st.applied_set,
            "applied_seq": st.applied_seq,
            "reconnects": sessions.saturating_sub(1),
            "refused": self.stats.refused.load(Ordering::Relaxed),
            "copy": st.copy,
            "consistent": st.consistent() && !failed,
            "state": if failed { "disk failed: mirror is NOT being updated" }
                     else if st.consistent() { "consistent" }
                     else if st.copy == CopyState::Done { "catching up after the full copy: not yet consistent" }
                     else { "initial copy not complete: NOT consistent" },
            "last_error": self.stats.last_error.lock().unwrap().clone(),
        })
    }

    /// The mirror's disk failed: replication to this volume stops (I2: never silent), and
    /// status and every new session say why.
    fn fail_disk(&self, why: String, doing: &str) {
        tracing::error!(volume = %self.name, "{doing}: {why}; replication to it is stopped");
        *self.stats.last_error.lock().unwrap() = why;
        self.stats.failed.store(true, Ordering::Relaxed);
    }

    /// `set` must be the one after `written`, and inside the volume; the state after it.
    fn check_next(&self, written: &Durable, set: &DeltaSet) -> AckResult {
        if set.set != written.set + 1 {
            let what = if set.set > written.set + 1 {
                "from the future"
            } else {
                "already durable"
            };
            return Err((
                refuse::BAD_SET,
                format!(
                    "set {} is {what} (next expected {})",
                    set.set,
                    written.set + 1
                ),
            ));
        }
        if let Some(e) = set.extents.iter().find(|e| e.end() > self.size) {
            return Err((
                refuse::BAD_SET,
                format!(
                    "set {} writes past the volume's end ({} > {})",
                    set.set,
                    e.end(),
                    self.size
                ),
            ));
        }
        let mut d = *written;
        d.set = set.set;
        match set.kind {
            SetKind::Journal => d.seq = d.seq.max(set.last_seq),
            SetKind::Copy { done } => d.copy_done = done,
        }
        Ok(d)
    }

    /// The redo writer: checks each set follows the last one written, writes the sets waiting
    /// in one go, and hands them to the sync thread. It writes the next batch while the sync
    /// thread syncs the previous one: waiting for each sync here had kept the redo log idle
    /// for 40 % of its time.
    fn redo_loop(&self, jobs: mpsc::Receiver<Job>, to_sync: mpsc::Sender<ToSync>) {
        let mut generation = 0;
        let mut written = *self.durable.lock().unwrap();
        let mut batch = Vec::new();
        let mut from = written;
        while let Ok(first) = jobs.recv() {
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    // A replaced session's: its primary re-sends after the barrier's state.
                    Job::Set { generation: g, .. } if g < generation => {}
                    Job::Set {
                        set,
                        raw,
                        received,
                        ack,
                        ..
                    } => {
                        let checked = if self.stats.failed.load(Ordering::Relaxed) {
                            Err((
                                refuse::DISK_FAILED,
                                self.stats.last_error.lock().unwrap().clone(),
                            ))
                        } else {
                            self.check_next(&written, &set)
                        };
                        match checked {
                            Ok(d) => {
                                if batch.is_empty() {
                                    from = written;
                                }
                                written = d;
                                batch.push(Accepted {
                                    set,
                                    raw,
                                    received,
                                    ack,
                                    after: d,
                                });
                            }
                            Err(e) => {
                                self.write_batch(&mut batch, from, &mut written, &to_sync);
                                let _ = to_sync.send(ToSync::Refused(ack, e));
                            }
                        }
                    }
                    Job::Barrier {
                        generation: g,
                        reply,
                    } => {
                        generation = generation.max(g);
                        self.write_batch(&mut batch, from, &mut written, &to_sync);
                        let _ = to_sync.send(ToSync::Barrier(reply));
                    }
                }
                let batch_bytes: usize = batch.iter().map(|a| a.raw.len()).sum();
                if batch_bytes < BATCH_BYTES {
                    next = jobs.try_recv().ok();
                }
            }
            self.write_batch(&mut batch, from, &mut written, &to_sync);
        }
    }

    /// Write `batch` to the redo log (not yet synced) and pass it on; on failure, refuse its
    /// sets and forget them (`written` goes back to `from`, the state before
    /// them).
    fn write_batch(
        &self,
        batch: &mut Vec<Accepted>,
        from: Durable,
        written: &mut Durable,
        to_sync: &mpsc::Sender<ToSync>,
    ) {
        if batch.is_empty() {
            return;
        }
        let sets = std::mem::take(batch);
        let result = {
            let mut redo = self.redo.lock().unwrap();
            // Only what a checkpoint made durable on the volume may leave the redo log.
            if let Err(e) = redo.trim(self.checkpointed.load(Ordering::Relaxed)) {
                tracing::warn!(volume = %self.name, "cannot trim the redo log: {e}");
            }
            let entries: Vec<(u64, &BlockBytes)> =
                sets.iter().map(|a| (a.set.set, &a.raw)).collect();
            redo.write(&entries)
        };
        match result {
            Ok(file) => {
                let _ = to_sync.send(ToSync::Written { file, sets });
            }
            Err(e) => {
                // Not durable, not acknowledged: the primary re-sends them. The log's tail is
                // rewritten from where this batch began.
                let why = format!("redo log: {e}");
                tracing::error!(volume = %self.name, "{why}");
                *written = from;
                for a in sets {
                    let _ =
                        to_sync.send(ToSync::Refused(a.ack, (refuse::DISK_FAILED, why.clone())));
                }
            }
        }
    }

    /// The sync thread: one fdatasync per file for every batch written meanwhile (group
    /// commit), then the acknowledgements, then the sets go to the applier in order.
    fn sync_loop(
        &self,
        from_redo: mpsc::Receiver<ToSync>,
        apply: mpsc::Sender<(DeltaSet, ApplyPermit)>,
    ) {
        while let Ok(first) = from_redo.recv() {
            let mut items = vec![first];
            while let Ok(more) = from_redo.try_recv() {
                items.push(more);
            }
            let mut synced: Vec<&Handle> = Vec::new();
            let mut result = Ok(());
            for item in &items {
                if let ToSync::Written { file, .. } = item {
                    if !synced.iter().any(|f| Arc::ptr_eq(f, file)) {
                        result = file.sync_data();
                        if result.is_err() {
                            break;
                        }
                        synced.push(file);
                    }
                }
            }
            // After a failed sync the log's content is unknown: nothing of this round counts
            // as durable.
            let failed = result.err().map(|e| {
                let why = format!("mirror disk failed: redo log sync: {e}");
                self.fail_disk(why.clone(), "syncing the redo log");
                why
            });
            let mut to_apply = Vec::new();
            for item in items {
                match item {
                    ToSync::Written { sets, .. } => {
                        for a in sets {
                            if let Some(why) = &failed {
                                let _ = a.ack.send(Err((refuse::DISK_FAILED, why.clone())));
                                continue;
                            }
                            *self.durable.lock().unwrap() = a.after;
                            drop(a.received);
                            let _ = a.ack.send(Ok(a.after));
                            to_apply.push(a.set);
                        }
                    }
                    ToSync::Refused(ack, why) => {
                        let _ = ack.send(Err(why));
                    }
                    ToSync::Barrier(reply) => {
                        let _ = reply.send(*self.durable.lock().unwrap());
                    }
                }
            }
            for set in to_apply {
                let permit = self.apply_budget.acquire(apply_cost(&set));
                // The applier only ends after a disk failure, which status and sessions report.
                let _ = apply.send((set, permit));
            }
        }
    }
}

pub struct Mirror {
    pub volumes: Vec<Arc<MirrorVolume>>,
    /// Memory for received messages, shared by all sessions.
    pool: Arc<SharedPool>,
}

impl Mirror {
    pub fn open(fs: &Fs, specs: &[VolumeSpec], state_dir: &Path) -> io::Result<Arc<Mirror>> {
        let volumes = specs
            .iter()
            .map(|s| MirrorVolume::open(fs, s, state_dir))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Arc::new(Mirror {
            volumes,
            pool: SharedPool::new(RECEIVE_POOL_BYTES),
        }))
    }

    /// Accept primaries until the endpoint closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        // Handshakes run concurrently: a stalled or hostile peer does not hold up a good one.
        let mut acceptor = crate::transport::Acceptor::new(endpoint);
        while let Some(incoming) = acceptor.accept().await {
            // Refusals were already logged, with the reason, by the transport.
            if let Ok(conn) = incoming {
                let m = self.clone();
                tokio::spawn(async move { m.connection(conn).await });
            }
        }
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection) {
        let peer = conn.remote_address();
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%peer, "peer left before opening a stream: {e}");
                return;
            }
        };
        let (volume, size) = match read_message(&mut recv, &self.pool).await {
            Ok(Some((
                Message::Hello {
                    version,
                    volume,
                    size,
                },
                _,
            ))) if (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) => {
                (volume, size)
            }
            Ok(Some((Message::Hello { version, .. }, _))) => {
                return refuse_and_close(
                    &conn,
                    &mut send,
                    refuse::VERSION,
                    format!("protocol version {version} unsupported (this mirror speaks {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION})"),
                )
                .await;
            }
            Ok(other) => {
                let what = other.map_or("nothing".to_string(), |(m, _)| {
                    format!("{m:?}").chars().take(80).collect()
                });
                return refuse_and_close(
                    &conn,
                    &mut send,
                    refuse::BAD_MESSAGE,
                    format!("expected Hello, got {what}"),
                )
                .await;
            }
            Err(e) => {
                return refuse_and_close(&conn, &mut send, refuse::BAD_MESSAGE, e.to_string()).await
            }
        };
        let Some(vol) = self.volumes.iter().find(|v| v.name == volume).cloned() else {
            return refuse_and_close(
                &conn,
                &mut send,
                refuse::UNKNOWN_VOLUME,
                format!("no volume named {volume:?} here"),
            )
            .await;
        };
        if size != vol.size {
            return refuse_and_close(
                &conn,
                &mut send,
                refuse::SIZE_MISMATCH,
                format!(
                    "volume {volume}: primary has {size} bytes, mirror has {}",
                    vol.size
                ),
            )
            .await;
        }
        if vol.stats.failed.load(Ordering::Relaxed) {
            let why = vol.stats.last_error.lock().unwrap().clone();
            return refuse_and_close(&conn, &mut send, refuse::DISK_FAILED, why).await;
        }
        // A reconnecting primary replaces its stale session.
        let task = {
            let v = vol.clone();
            let conn = conn.clone();
            let pool = self.pool.clone();
            tokio::spawn(async move {
                let result = v.clone().session(&mut send, &mut recv, &pool).await;
                v.stats.link_up.store(false, Ordering::Relaxed);
                if let Err((code, why)) = result {
                    tracing::warn!(volume = %v.name, %peer, "replication session dropped: {why}");
                    *v.stats.last_error.lock().unwrap() = why.clone();
                    v.stats.refused.fetch_add(1, Ordering::Relaxed);
                    send_refusal(&conn, &mut send, code, why).await;
                }
            })
        };
        let stale = vol.session.lock().unwrap().replace(task.abort_handle());
        if let Some(old) = stale {
            old.abort();
        }
    }
}

impl MirrorVolume {
    async fn session(
        self: Arc<Self>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        pool: &Arc<SharedPool>,
    ) -> Result<(), (u16, String)> {
        let bad = |e: StreamError| (refuse::BAD_MESSAGE, e.to_string());
        // Whatever earlier sessions left in the pipeline is synced and applied first, or
        // dropped if not yet written: the primary resumes after what is durable now.
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (reply, durable) = tokio::sync::oneshot::channel();
        let stopped = || {
            (
                refuse::DISK_FAILED,
                "the mirror's redo log thread stopped".to_string(),
            )
        };
        self.jobs
            .send(Job::Barrier { generation, reply })
            .map_err(|_| stopped())?;
        let d = durable.await.map_err(|_| stopped())?;
        let hello_ack = Message::HelloAck {
            durable_set: d.set,
            durable_seq: d.seq,
            needs_full_copy: !d.copy_done,
        };
        write_message(send, &hello_ack).await.map_err(bad)?;
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.stats.link_up.store(true, Ordering::Relaxed);
        tracing::info!(volume = %self.name, "primary attached");
        // Receiving, writing the redo log and syncing it overlap; received-but-not-durable
        // bytes are bounded.
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<AckResult>();
        let budget = Arc::new(tokio::sync::Semaphore::new(PENDING_BYTES));
        let reading = async {
            let ack_tx = ack_tx;
            let r = async {
                loop {
                    let (msg, raw) = match read_message(recv, pool).await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            tracing::info!(volume = %self.name, "primary closed the stream");
                            return Ok(());
                        }
                        Err(StreamError::Read(quinn::ReadExactError::ReadError(e))) => {
                            return Err((refuse::BAD_MESSAGE, format!("link lost: {e}")));
                        }
                        Err(e) => return Err(bad(e)),
                    };
                    let Message::Set(set) = msg else {
                        return Err((refuse::BAD_MESSAGE, "expected a delta set".into()));
                    };
                    if self.stats.failed.load(Ordering::Relaxed) {
                        return Err((
                            refuse::DISK_FAILED,
                            self.stats.last_error.lock().unwrap().clone(),
                        ));
                    }
                    self.stats
                        .received_bytes
                        .fetch_add(raw.len() as u64, Ordering::Relaxed);
                    let want = (raw.len() as u32).min(PENDING_BYTES as u32);
                    let received = budget
                        .clone()
                        .acquire_many_owned(want)
                        .await
                        .expect("budget never closes");
                    let job = Job::Set {
                        generation,
                        set,
                        raw,
                        received,
                        ack: ack_tx.clone(),
                    };
                    if self.jobs.send(job).is_err() {
                        return Err(stopped());
                    }
                }
            }
            .await;
            // The acknowledgements end once the pipeline has answered every set sent.
            drop(ack_tx);
            r
        };
        let acking = async {
            while let Some(result) = ack_rx.recv().await {
                let d = result?;
                let applied_set = self.state.lock().unwrap().applied_set;
                let ack = Message::Ack {
                    set: d.set,
                    last_seq: d.seq,
                    applied_set,
                };
                write_message(send, &ack)
                    .await
                    .map_err(|e| (refuse::BAD_MESSAGE, e.to_string()))?;
            }
            Ok(())
        };
        tokio::pin!(acking);
        tokio::select! {
            r = reading => {
                // Let what was received become durable and be acknowledged before leaving.
                let a = acking.await;
                r.and(a)
            }
            a = &mut acking => a,
        }
    }
}

async fn refuse_and_close(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: u16,
    reason: String,
) {
    tracing::warn!(peer = %conn.remote_address(), "refused replication stream: {reason}");
    send_refusal(conn, send, code, reason).await;
}

/// Send a Refuse and let it arrive: the primary closes when it reads it; closing first would
/// discard the queued message. The reason also goes in the close frame.
async fn send_refusal(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: u16,
    reason: String,
) {
    let close_reason: Vec<u8> = reason.bytes().take(200).collect();
    let _ = write_message(send, &Message::Refuse { code, reason }).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
    conn.close(code.into(), &close_reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;
    use bytes::Bytes;
    use std::os::unix::fs::FileExt;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    const BLOCK: usize = 4096;

    /// Set `n` writes block n-1 full of the byte n.
    fn set_job(n: u64, generation: u64, ack: &AckSender) -> Job {
        let set = DeltaSet {
            set: n,
            first_seq: n,
            last_seq: n,
            newest_write_ms: 0,
            kind: SetKind::Journal,
            extents: vec![Extent {
                offset: (n - 1) * BLOCK as u64,
                payload: Payload::Data(Bytes::from(vec![n as u8; BLOCK])),
            }],
        };
        let mut raw = Vec::new();
        super::super::frame::encode(&Message::Set(set.clone()), &mut raw);
        let budget = Arc::new(tokio::sync::Semaphore::new(1));
        Job::Set {
            generation,
            set,
            raw: BlockBytes::copy_from(&raw),
            received: budget.try_acquire_owned().unwrap(),
            ack: ack.clone(),
        }
    }

    fn answers(mut rx: UnboundedReceiver<AckResult>) -> Vec<Result<u64, u16>> {
        let mut out = Vec::new();
        while let Some(r) = rx.blocking_recv() {
            out.push(r.map(|d| d.set).map_err(|(code, _)| code));
        }
        out
    }

    fn barrier(vol: &MirrorVolume, generation: u64) -> Durable {
        let (reply, rx) = tokio::sync::oneshot::channel();
        vol.jobs.send(Job::Barrier { generation, reply }).unwrap();
        rx.blocking_recv().unwrap()
    }

    #[test]
    fn a_replaced_sessions_sets_are_applied_or_dropped_never_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let spec = VolumeSpec {
            name: "v".into(),
            path: path.clone(),
            size: None,
            read_only: false,
        };
        let vol = MirrorVolume::open(&crate::env::os(), &spec, dir.path()).unwrap();
        assert_eq!(barrier(&vol, 1).set, 0);

        // Session 1 queues sets 1-3; session 2 starts; then session 1's set 4 arrives late.
        let (ack1, acks1) = unbounded_channel();
        for n in 1..=3 {
            vol.jobs.send(set_job(n, 1, &ack1)).unwrap();
        }
        let d = barrier(&vol, 2);
        vol.jobs.send(set_job(4, 1, &ack1)).unwrap();
        drop(ack1);
        // Session 2 is told everything session 1 got written: it resumes at set 4.
        assert_eq!(d.set, 3);
        assert_eq!(
            answers(acks1),
            vec![Ok(1), Ok(2), Ok(3)],
            "set 4 of the old session is dropped, not acknowledged"
        );

        let (ack2, acks2) = unbounded_channel();
        vol.jobs.send(set_job(4, 2, &ack2)).unwrap();
        // A set that skips one, and one already durable, are refused.
        vol.jobs.send(set_job(6, 2, &ack2)).unwrap();
        vol.jobs.send(set_job(2, 2, &ack2)).unwrap();
        drop(ack2);
        assert_eq!(
            answers(acks2),
            vec![Ok(4), Err(refuse::BAD_SET), Err(refuse::BAD_SET)]
        );

        // Every durable set reaches the volume, in order.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while vol.state.lock().unwrap().applied_set < 4 {
            assert!(Instant::now() < deadline, "sets not applied");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!vol.stats.failed.load(Ordering::Relaxed));
        let file = std::fs::File::open(&path).unwrap();
        for n in 1..=5u64 {
            let mut block = vec![0u8; BLOCK];
            file.read_exact_at(&mut block, (n - 1) * BLOCK as u64)
                .unwrap();
            let want = if n <= 4 { n as u8 } else { 0 };
            assert!(
                block.iter().all(|&b| b == want),
                "block {} holds {}",
                n - 1,
                block[0]
            );
        }
    }
}
