//! The mirror daemon's replication side: accepts authenticated primaries, makes every delta set
//! durable in the redo log before acknowledging it, and applies sets in order on a thread per
//! volume.

use super::apply::{self, Applier, CopyState, VolumeState};
use super::fold::Payload;
use super::frame::{DeltaSet, Message, SetKind, PROTOCOL_VERSION};
use super::redo::RedoLog;
use super::stream::{read_message, write_message, StreamError};
use crate::disk::buf::{BlockBytes, SharedPool};
use crate::disk::file::{FileStorage, IoMode};
use crate::disk::spec::VolumeSpec;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
fn apply_cost(set: &DeltaSet) -> u32 {
    let data: usize = set
        .extents
        .iter()
        .map(|e| match &e.payload {
            Payload::Data(d) => d.len(),
            Payload::Zero(_) => 0,
        })
        .sum();
    data.clamp(1, APPLY_QUEUE_BYTES) as u32
}

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
    pub size: u64,
    redo: Mutex<RedoLog>,
    durable: Mutex<Durable>,
    pub state: Arc<Mutex<VolumeState>>,
    apply_tx: Mutex<mpsc::Sender<(DeltaSet, OwnedSemaphorePermit)>>,
    /// Bounds the sets waiting in `apply_tx` (see [`APPLY_QUEUE_BYTES`]).
    apply_budget: Arc<Semaphore>,
    pub stats: MirrorStats,
    session: Mutex<Option<tokio::task::AbortHandle>>,
    /// The applied set as of the last checkpoint (volume synced, state saved).
    checkpointed: AtomicU64,
}

impl MirrorVolume {
    /// Open the volume, replay its redo log, start its applier thread.
    pub fn open(spec: &VolumeSpec, state_dir: &Path) -> io::Result<Arc<MirrorVolume>> {
        // Direct I/O: through the page cache, each small write cost more CPU in ext4 than the
        // copy itself (large folios), and fsync then paid for the writeback.
        let storage = FileStorage::open(spec, IoMode::Direct).map_err(io::Error::other)?;
        let size = crate::disk::Storage::size(&storage);
        let mut applier = Applier::new(storage)?;
        let state_path = VolumeState::path(state_dir, &spec.name);
        let mut state = VolumeState::load(&state_path)?;
        let mut redo = RedoLog::open(&apply::redo_dir(state_dir, &spec.name))?;
        let replayed = apply::replay(&mut applier, &mut redo, &mut state, &state_path)?;
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
        let (tx, rx) = mpsc::channel();
        let vol = Arc::new(MirrorVolume {
            name: spec.name.clone(),
            size,
            redo: Mutex::new(redo),
            durable: Mutex::new(durable),
            state: Arc::new(Mutex::new(state)),
            apply_tx: Mutex::new(tx),
            apply_budget: Arc::new(Semaphore::new(APPLY_QUEUE_BYTES)),
            stats: MirrorStats::default(),
            session: Mutex::new(None),
            checkpointed: AtomicU64::new(durable.set),
        });
        let v = vol.clone();
        std::thread::Builder::new()
            .name(format!("apply-{}", spec.name))
            .spawn(move || v.apply_loop(applier, rx, state_path))?;
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
        rx: mpsc::Receiver<(DeltaSet, OwnedSemaphorePermit)>,
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
                    state.save(&state_path)?;
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
                // I2: never silent. The redo log still holds the sets; status says the disk failed.
                tracing::error!(volume = %self.name, "applying to the mirror volume failed: {e}; replication to it is stopped");
                *self.stats.last_error.lock().unwrap() = format!("mirror disk failed: {e}");
                self.stats.failed.store(true, Ordering::Relaxed);
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

    fn hello_ack(&self) -> Message {
        let d = *self.durable.lock().unwrap();
        Message::HelloAck {
            durable_set: d.set,
            durable_seq: d.seq,
            needs_full_copy: !d.copy_done,
        }
    }

    /// Make a run of sets durable with one fsync (group commit), if each is the next one.
    /// Blocking. Returns the durable state after each set, for its acknowledgement.
    fn make_durable(
        &self,
        batch: &[(DeltaSet, BlockBytes)],
    ) -> Result<Vec<Durable>, (u16, String)> {
        let mut redo = self.redo.lock().unwrap();
        let mut d = *self.durable.lock().unwrap();
        let mut after = Vec::with_capacity(batch.len());
        for (set, _) in batch {
            if set.set != d.set + 1 {
                let what = if set.set > d.set + 1 {
                    "from the future"
                } else {
                    "already durable"
                };
                return Err((
                    refuse::BAD_SET,
                    format!("set {} is {what} (next expected {})", set.set, d.set + 1),
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
            d.set = set.set;
            match set.kind {
                SetKind::Journal => d.seq = d.seq.max(set.last_seq),
                SetKind::Copy { done } => d.copy_done = done,
            }
            after.push(d);
        }
        // Only what a checkpoint made durable on the volume may leave the redo log.
        if let Err(e) = redo.trim(self.checkpointed.load(Ordering::Relaxed)) {
            tracing::warn!(volume = %self.name, "cannot trim the redo log: {e}");
        }
        let entries: Vec<(u64, &BlockBytes)> = batch.iter().map(|(s, raw)| (s.set, raw)).collect();
        redo.append(&entries)
            .map_err(|e| (refuse::DISK_FAILED, format!("redo log: {e}")))?;
        *self.durable.lock().unwrap() = d;
        Ok(after)
    }
}

pub struct Mirror {
    pub volumes: Vec<Arc<MirrorVolume>>,
    /// Memory for received messages, shared by all sessions.
    pool: Arc<SharedPool>,
}

impl Mirror {
    pub fn open(specs: &[VolumeSpec], state_dir: &Path) -> io::Result<Arc<Mirror>> {
        let volumes = specs
            .iter()
            .map(|s| MirrorVolume::open(s, state_dir))
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
            ))) if version == PROTOCOL_VERSION => (volume, size),
            Ok(Some((Message::Hello { version, .. }, _))) => {
                return refuse_and_close(
                    &conn,
                    &mut send,
                    refuse::VERSION,
                    format!("protocol version {version} unsupported (want {PROTOCOL_VERSION})"),
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
        write_message(send, &self.hello_ack()).await.map_err(bad)?;
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.stats.link_up.store(true, Ordering::Relaxed);
        tracing::info!(volume = %self.name, "primary attached");
        // Receiving and making durable overlap: while one batch is being fsynced, the next
        // sets are read off the stream. Received-but-not-durable bytes are bounded.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(
            DeltaSet,
            BlockBytes,
            tokio::sync::OwnedSemaphorePermit,
        )>();
        let budget = Arc::new(tokio::sync::Semaphore::new(PENDING_BYTES));
        let durability = self.clone().durability_loop(send, rx);
        let reading = async {
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
                let permit = budget
                    .clone()
                    .acquire_many_owned(want)
                    .await
                    .expect("budget never closes");
                if tx.send((set, raw, permit)).is_err() {
                    return Ok(()); // the durability side ended; its result says why
                }
            }
        };
        tokio::pin!(durability);
        tokio::select! {
            r = reading => {
                // Let what was received become durable and be acknowledged before leaving.
                drop(tx);
                let d = durability.await;
                r.and(d)
            }
            d = &mut durability => d,
        }
    }

    /// Group commit: take every set waiting, one redo append + fsync, one Ack per set, then hand
    /// the sets to the applier.
    async fn durability_loop(
        self: Arc<Self>,
        send: &mut quinn::SendStream,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<(
            DeltaSet,
            BlockBytes,
            tokio::sync::OwnedSemaphorePermit,
        )>,
    ) -> Result<(), (u16, String)> {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let (sets, permits): (Vec<(DeltaSet, BlockBytes)>, Vec<_>) =
                batch.into_iter().map(|(s, raw, p)| ((s, raw), p)).unzip();
            let v = self.clone();
            let (sets, result) = tokio::task::spawn_blocking(move || {
                let r = v.make_durable(&sets);
                (sets, r)
            })
            .await
            .map_err(|e| (refuse::DISK_FAILED, format!("durability task: {e}")))?;
            drop(permits);
            let after = result?;
            let applied_set = self.state.lock().unwrap().applied_set;
            for d in &after {
                let ack = Message::Ack {
                    set: d.set,
                    last_seq: d.seq,
                    applied_set,
                };
                write_message(send, &ack)
                    .await
                    .map_err(|e| (refuse::BAD_MESSAGE, e.to_string()))?;
            }
            for (set, _) in sets {
                let permit = self
                    .apply_budget
                    .clone()
                    .acquire_many_owned(apply_cost(&set))
                    .await
                    .expect("the apply budget is never closed");
                // The applier thread only ends after a disk failure, which the next set reports.
                let _ = self.apply_tx.lock().unwrap().send((set, permit));
            }
        }
        Ok(())
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
