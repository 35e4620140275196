//! The mirror daemon's replication side, a driver of [`MirrorCore`] (which holds the rules):
//! accepts authenticated primaries, takes the decision on connect, makes every delta set
//! durable in the redo log before acknowledging it, and applies sets in order. Per volume a
//! pipeline of three threads does the disk work: the **redo writer** writes whatever sets are
//! waiting in one batch, the **sync thread** fdatasyncs everything written meanwhile (one sync
//! per file per round) then acknowledges those sets in order and hands them on, the
//! **applier** writes them in place and checkpoints. The pipeline belongs to the volume, not to
//! a session, so a session that is replaced or dropped never leaves a durable set unapplied.

use super::apply::{self, Applier, ApplyTarget, Step, VolumeState};
use super::core::mirror::{check_hello, Accepted, Durable, Failure, MirrorCore, Refusal};
use super::core::primary::{chunk_sum, unix_ms};
use super::frame::{DeltaSet, Message, RefuseCode, SUM_LEN};
use super::history::{HistoryError, Keeper, Point, Retention, WhenFull, WithHistory};
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
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::OwnedSemaphorePermit;

/// Bytes received but not yet durable, at most (per session).
const PENDING_BYTES: usize = 32 << 20;
/// Data bytes of sets durable in the redo log but not yet applied, at most, held in memory
/// for the applier (I5). When applying falls behind, the receiver waits and QUIC flow control
/// makes the primary wait: the backlog stays in the primary's journal.
const APPLY_QUEUE_BYTES: usize = 32 << 20;

/// The mirror volume is synced and its applied set saved at most this often.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Free receive buffers kept for reuse: a set's worth of each size class, roughly.
const RECEIVE_POOL_BYTES: usize = 64 << 20;

/// Sets written per redo batch, at most: larger groups would only delay the first acks.
const BATCH_BYTES: usize = 32 << 20;

/// How long the applier waits before trying a volume that failed again (it doubles up to
/// [`APPLY_RETRY_MAX`]): a transient error heals without a restart, a dead disk is not
/// hammered.
const APPLY_RETRY_FIRST: Duration = Duration::from_millis(500);
const APPLY_RETRY_MAX: Duration = Duration::from_secs(10);

/// How long a new session waits for the pipeline to drain before answering.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(120);

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

/// What goes back to a session: a message for its primary, or the refusal that ends it.
type Reply = Result<Message, Refusal>;
type ReplySender = tokio::sync::mpsc::UnboundedSender<Reply>;

/// A comparison request travelling the pipeline (it must see every set sent before it).
struct SumsJob {
    session: u64,
    offset: u64,
    chunk: u32,
    /// The last set its primary sent before it (`MirrorCore::sums_in_order`).
    after_set: Option<u64>,
    sums: Vec<[u8; SUM_LEN]>,
    reply: ReplySender,
}

/// Work for a volume's durability pipeline, from its sessions, in arrival order.
enum Job {
    /// A received set: write it to the redo log, sync, acknowledge, apply.
    Set {
        session: u64,
        set: DeltaSet,
        raw: BlockBytes,
        received_ms: u64,
        /// Holds the session's receive budget until the set is durable.
        received: OwnedSemaphorePermit,
        reply: ReplySender,
    },
    Sums(SumsJob),
    /// Everything before it is written, synced, applied and checkpointed before `reply` is
    /// answered; sets of sessions older than `session` arriving after it are dropped.
    Barrier {
        session: Option<u64>,
        reply: tokio::sync::oneshot::Sender<()>,
    },
}

/// A set the redo writer accepted, with what it holds until it is durable.
struct Pending {
    set: DeltaSet,
    /// The message as received, which the redo log writes.
    raw: BlockBytes,
    received_ms: u64,
    received: OwnedSemaphorePermit,
    reply: ReplySender,
    after: Durable,
}

/// From the redo writer to the sync thread.
enum ToSync {
    /// Sets written to `file`, durable once it is synced.
    Written {
        file: Handle,
        sets: Vec<Pending>,
    },
    /// A set refused (not written): answered in order, after the sets before it.
    Refused(ReplySender, Refusal),
    Sums(SumsJob),
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// From the sync thread to the applier.
enum ToApply {
    Set {
        set: DeltaSet,
        received_ms: u64,
        _permit: ApplyPermit,
    },
    Sums(SumsJob),
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// Checkpoint now (a clean stop), then answer.
    Checkpoint(tokio::sync::oneshot::Sender<()>),
}

#[derive(Default)]
pub struct MirrorStats {
    pub link_up: AtomicBool,
    pub received_bytes: AtomicU64,
    pub sessions: AtomicU64,
    pub refused: AtomicU64,
    pub last_error: Mutex<String>,
}

pub struct MirrorVolume {
    pub name: String,
    pub size: u64,
    fs: Fs,
    state_path: PathBuf,
    /// The rules; every thread asks it.
    core: Mutex<MirrorCore>,
    redo: Mutex<RedoLog>,
    /// One writer of the state file at a time (checkpoints and decisions).
    save_lock: Mutex<()>,
    /// A clean stop began: a set whose apply fails is left to the redo log (replayed at the
    /// next start) instead of retried, so that the stop does not wait on it.
    stopping: AtomicBool,
    jobs: Mutex<mpsc::Sender<Job>>,
    apply_tx: Mutex<mpsc::Sender<ToApply>>,
    /// Bounds the sets waiting for the applier (see [`APPLY_QUEUE_BYTES`]).
    apply_budget: Arc<ApplyBudget>,
    pub stats: MirrorStats,
    session: Mutex<Option<tokio::task::AbortHandle>>,
    /// The volume's history (`--history`): before-images and recoverable points.
    history: Option<Mutex<Keeper>>,
    /// A read-only handle on the volume (the applier owns the other): what exports read.
    reader: Option<Arc<FileStorage>>,
    /// The pipeline's threads, joined by [`MirrorVolume::stop`].
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// When the peer last said it is a secondary holding this volume's data.
    peer_heard: Mutex<Option<Instant>>,
}

/// How long what a secondary peer says it holds stays true here: a few of its Pulls (every
/// 2 s), so that a peer gone quiet (stopped, cut off, perhaps promoted) is not trusted.
pub const PEER_NOTICE_FRESH: Duration = Duration::from_secs(10);

impl MirrorVolume {
    /// Open the volume, check its disk against its state, replay its redo log, start its
    /// pipeline threads.
    pub fn open(
        fs: &Fs,
        spec: &VolumeSpec,
        state_dir: &Path,
        history: Option<Retention>,
    ) -> io::Result<Arc<MirrorVolume>> {
        // Direct I/O: through the page cache, each small write cost more CPU in ext4 than the
        // copy itself (large folios), and fsync then paid for the writeback.
        let storage = FileStorage::open(spec, IoMode::Direct).map_err(io::Error::other)?;
        let size = crate::disk::Storage::size(&storage);
        let reader = storage.reader()?;
        let mut applier = Applier::new(storage)?;
        Self::open_with(
            fs,
            &spec.name,
            size,
            &mut applier,
            state_dir,
            history,
            Some(reader),
        )
        .map(|(vol, threads)| {
            threads.start(vol.clone(), applier);
            vol
        })
    }

    /// Everything `open` does but starting the threads (shared with the simulator's tests).
    fn open_with(
        fs: &Fs,
        name: &str,
        size: u64,
        applier: &mut dyn ApplyTarget,
        state_dir: &Path,
        retention: Option<Retention>,
        reader: Option<FileStorage>,
    ) -> io::Result<(Arc<MirrorVolume>, Threads)> {
        let state_path = VolumeState::path(state_dir, name);
        let mut state = VolumeState::load(&**fs, &state_path)?;
        let mut redo = RedoLog::open(fs, &apply::redo_dir(state_dir, name))?;
        // Read before the replay writes: the change time sealed at the last checkpoint is
        // meaningful only if nothing was applied after it.
        let disk = applier.fingerprint().ok();
        let sealed_valid = redo.last_set().is_none_or(|l| l <= state.applied_set);
        let known = state.identity.fingerprint.clone();
        let mut keeper = match retention {
            Some(r) => Some(Keeper::open(fs.clone(), state_dir, name, size, r)?),
            None => {
                let dir = Keeper::dir(state_dir, name);
                if fs.read_dir(&dir).is_ok_and(|d| !d.is_empty()) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "volume {name} has a history ({}): start the mirror with --history \
                             to keep it, or remove that directory to drop it (without \
                             --history, later writes would leave it describing nothing)",
                            dir.display()
                        ),
                    ));
                }
                None
            }
        };
        let replayed = match keeper.as_mut() {
            Some(k) => apply::replay(
                &mut WithHistory {
                    target: applier,
                    history: &mut k.log,
                },
                &mut redo,
                &mut state,
                &**fs,
                &state_path,
            )?,
            None => apply::replay(applier, &mut redo, &mut state, &**fs, &state_path)?,
        };
        if replayed.sets > 0 {
            tracing::info!(volume = %name, sets = replayed.sets, "redo log replayed");
        }
        // After the replay (which must not clear what it finds: an old copy's end replayed on
        // a replaced disk proves nothing), with the disk as it was found.
        MirrorCore::check_disk(
            name,
            &mut state,
            known.as_ref(),
            disk.as_ref(),
            sealed_valid,
        );
        // A volume never copied to may be pre-seeded: compare it rather than copy over it. A
        // disk that cannot say is assumed to hold data (a comparison costs only reads).
        let holds_data =
            state.copy == apply::CopyState::None && applier.holds_data().unwrap_or(true);
        if let Some(k) = keeper.as_mut() {
            let points = k.log.points().len();
            if let Some(why) = k.opened(&state, unix_ms(SystemTime::now()))? {
                tracing::warn!(volume = %name, points, "{why}: its history is dropped");
            }
        }
        let core = MirrorCore::new(
            name,
            size,
            state,
            applier.fingerprint().ok(),
            holds_data,
            replayed.staged,
        );
        core.state().save(&**fs, &state_path)?;
        tracing::info!(volume = %name, applied_set = core.state().applied_set,
            copy = ?core.state().copy, consistent = core.state().consistent(),
            uuid = ?core.state().identity.uuid, "mirror volume open");
        let (jobs, jobs_rx) = mpsc::channel();
        let (sync_tx, sync_rx) = mpsc::channel();
        let (apply_tx, apply_rx) = mpsc::channel();
        let vol = Arc::new(MirrorVolume {
            name: name.to_string(),
            size,
            fs: fs.clone(),
            state_path,
            core: Mutex::new(core),
            redo: Mutex::new(redo),
            save_lock: Mutex::new(()),
            stopping: AtomicBool::new(false),
            jobs: Mutex::new(jobs),
            apply_tx: Mutex::new(apply_tx.clone()),
            apply_budget: ApplyBudget::new(APPLY_QUEUE_BYTES),
            stats: MirrorStats::default(),
            session: Mutex::new(None),
            history: keeper.map(Mutex::new),
            reader: reader.map(Arc::new),
            threads: Mutex::new(Vec::new()),
            peer_heard: Mutex::new(None),
        });
        Ok((
            vol,
            Threads {
                jobs_rx,
                sync_tx,
                sync_rx,
                apply_tx,
                apply_rx,
            },
        ))
    }

    fn send_job(&self, job: Job) -> Result<(), Refusal> {
        self.jobs.lock().unwrap().send(job).map_err(|_| stopped())
    }

    /// Wait until everything sent before is written, synced and applied.
    fn barrier_blocking(&self) -> Result<(), Refusal> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send_job(Job::Barrier {
            session: None,
            reply,
        })?;
        rx.blocking_recv().map_err(|_| stopped())
    }

    /// Session `session` starts once everything older sessions queued is written, synced and
    /// applied (or, if it arrives later, dropped).
    async fn barrier(&self, session: u64) -> Result<(), Refusal> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send_job(Job::Barrier {
            session: Some(session),
            reply,
        })?;
        match tokio::time::timeout(BARRIER_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err((
                RefuseCode::VolumeFailed,
                format!(
                    "the mirror's pipeline did not drain within {} s (is its disk stuck?)",
                    BARRIER_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// Persist what the core holds now (decisions, checkpoints).
    fn save_state(&self, state: &VolumeState) -> io::Result<()> {
        let _one_writer = self.save_lock.lock().unwrap();
        state.save(&*self.fs, &self.state_path)
    }

    /// A clean stop: everything received is written, synced, applied and checkpointed, so
    /// the next start finds the volume sealed and nothing to replay.
    pub fn close(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.barrier_blocking() {
            tracing::warn!(volume = %self.name, "cannot drain the pipeline at stop: {}", e.1);
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .apply_tx
            .lock()
            .unwrap()
            .send(ToApply::Checkpoint(tx))
            .is_ok()
        {
            let _ = rx.blocking_recv();
        }
    }

    /// End the pipeline after a clean stop ([`MirrorVolume::close`]): its threads exit and are
    /// joined, so the volume's files are closed (its flock released) once the last handle on
    /// this volume goes: another role can open it then.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Senders whose receivers are gone: the threads' channels disconnect, in order.
        *self.jobs.lock().unwrap() = mpsc::channel().0;
        *self.apply_tx.lock().unwrap() = mpsc::channel().0;
        let threads: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// A promotion without --force would wait for the peer's demotion notice: a consistent
    /// copy, no primary connected, the peer's data not known yet.
    pub fn awaits_peer_notice(&self) -> bool {
        !self.stats.link_up.load(Ordering::Relaxed)
            && self.core.lock().unwrap().state().consistent()
            && self.peer_notice().is_none()
    }

    /// This secondary's `Pull`: the volume, and the consistent state it holds (if it is one).
    fn pull_message(&self) -> Message {
        let holds = {
            let core = self.core.lock().unwrap();
            let st = core.state();
            (st.consistent() && core.staging().is_none())
                .then_some(st.position_gen.map(|g| (g, st.applied_seq)))
                .flatten()
        };
        Message::Pull {
            version: crate::repl::frame::PROTOCOL_VERSION,
            volume: self.name.clone(),
            size: self.size,
            holds,
        }
    }

    /// Whether `promote` (`force`: `--force`) may go on now, from what the volume holds (the
    /// same rules `role::promoted` applies to the state saved once everything is applied).
    pub fn promotable(&self, force: bool) -> Result<(), String> {
        let core = self.core.lock().unwrap();
        if core.staging().is_some() && !force {
            return Err(format!(
                "volume {}: a resync from the primary is staged and not finished: the volume \
                 holds the older consistent state (promote --force keeps it)",
                self.name
            ));
        }
        let mut st = core.state().clone();
        drop(core);
        st.peer_demoted = self.peer_notice();
        crate::repl::role::continued_generation(&st, force)
            .map(|_| ())
            .map_err(|why| format!("volume {}: {why}", self.name))
    }

    /// The peer says it is a secondary holding (`gen`, `seq`) (its `Message::Pull`, or its
    /// answer to this side's): remembered, in memory and for [`PEER_NOTICE_FRESH`], when this
    /// volume holds exactly that (`MirrorCore::peer_demoted`) once everything received is
    /// applied. A promotion without `--force` needs it fresh: a peer not heard from lately may
    /// have been promoted meanwhile.
    pub fn learn_peer_demoted(
        &self,
        gen: crate::repl::identity::GenId,
        seq: u64,
    ) -> Result<(), String> {
        self.barrier_blocking().map_err(|(_, why)| why)?;
        let known = {
            let mut core = self.core.lock().unwrap();
            let known = core.state().peer_demoted == Some((gen, seq));
            core.peer_demoted(gen, seq)?;
            known
        };
        *self.peer_heard.lock().unwrap() = Some(Instant::now());
        if !known {
            tracing::info!(volume = %self.name, %gen, seq,
                "the peer is a secondary holding the same data: this side may be promoted");
        }
        Ok(())
    }

    /// What the peer said it holds, while fresh ([`PEER_NOTICE_FRESH`]).
    pub fn peer_notice(&self) -> Option<(crate::repl::identity::GenId, u64)> {
        let fresh = self
            .peer_heard
            .lock()
            .unwrap()
            .is_some_and(|t| t.elapsed() < PEER_NOTICE_FRESH);
        let core = self.core.lock().unwrap();
        core.state().peer_demoted.filter(|_| fresh)
    }

    /// Apply sets in order. The volume is synced and the state saved (a checkpoint) at most
    /// every [`CHECKPOINT_EVERY`], not per batch: until then the redo log still holds every
    /// set since the last checkpoint, and a crash replays them (idempotent). A volume that
    /// fails to take a batch is retried with backoff; status says the mirror is not being
    /// updated meanwhile.
    fn apply_loop(&self, mut applier: Applier, rx: mpsc::Receiver<ToApply>) {
        let mut last_checkpoint = Instant::now();
        let mut unsaved = false;
        // The failure of the last checkpoint, cleared by the next one that succeeds.
        let mut checkpoint_failed: Option<Failure> = None;
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
            let mut batch = Vec::new();
            let mut after_batch = None;
            if let Some(first) = first {
                let mut next = Some(first);
                while let Some(item) = next.take() {
                    match item {
                        ToApply::Set {
                            set,
                            received_ms,
                            _permit,
                        } => batch.push((set, received_ms, _permit)),
                        other => {
                            after_batch = Some(other);
                            break;
                        }
                    }
                    if batch.len() < 64 {
                        next = rx.try_recv().ok();
                    }
                }
            }
            if !batch.is_empty() {
                self.apply_batch(&mut applier, &batch);
                unsaved = true;
            }
            drop(batch);
            // A barrier checkpoints too: the decision it precedes saves the state, which must
            // not claim sets the volume has not synced.
            let force = matches!(
                after_batch,
                Some(ToApply::Checkpoint(_) | ToApply::Barrier(_))
            );
            if unsaved && (force || last_checkpoint.elapsed() >= CHECKPOINT_EVERY) {
                match self.checkpoint(&mut applier) {
                    Ok(()) => {
                        last_checkpoint = Instant::now();
                        unsaved = false;
                        if let Some(f) = checkpoint_failed.take() {
                            self.core.lock().unwrap().works_again(&f);
                        }
                    }
                    Err(f) => {
                        // Tried again after CHECKPOINT_EVERY, not at once (a full file
                        // system would spin this thread).
                        last_checkpoint = Instant::now();
                        self.core.lock().unwrap().fail(f.clone());
                        checkpoint_failed = Some(f);
                    }
                }
            }
            match after_batch {
                Some(ToApply::Sums(job)) => self.answer_sums(&mut applier, job),
                Some(ToApply::Barrier(reply) | ToApply::Checkpoint(reply)) => {
                    let _ = reply.send(());
                }
                _ => {}
            }
        }
    }

    /// Write `batch` to the volume, in order; on a failure, wait and try again from the set
    /// that failed (the redo log holds them all; nothing may be skipped).
    fn apply_batch(&self, applier: &mut Applier, batch: &[(DeltaSet, u64, ApplyPermit)]) {
        let mut retry = APPLY_RETRY_FIRST;
        let mut i = 0;
        // A commit that failed part-way: retried from where it stopped (the stager has moved on).
        let mut committing: Option<u64> = None;
        while i < batch.len() {
            let (set, received_ms, _) = &batch[i];
            let step = match committing {
                Some(first) => Ok(Step::Commit {
                    first,
                    state: Box::default(),
                }),
                None => self.core.lock().unwrap().next_step(set, *received_ms),
            };
            if let Ok(Step::Commit { first, .. }) = &step {
                committing = Some(*first);
            }
            let applied = match step {
                Err(why) => {
                    // Sets arrive in order, each once; a gap would be silent divergence.
                    self.core.lock().unwrap().fail(Failure {
                        code: RefuseCode::VolumeFailed,
                        why: format!("mirror stopped applying: {why}"),
                    });
                    return;
                }
                Ok(Step::Stage) => {
                    i += 1;
                    continue;
                }
                Ok(Step::Apply) => self.apply_set(applier, set),
                Ok(Step::Commit { first, .. }) => {
                    self.commit_staged(applier, first, set, *received_ms)
                }
            };
            match applied {
                Ok(()) => {
                    committing = None;
                    let mut core = self.core.lock().unwrap();
                    core.applied(set, *received_ms);
                    core.volume_works();
                    core.apply_goes_on();
                    retry = APPLY_RETRY_FIRST;
                    i += 1;
                }
                Err(e) => {
                    // A history failure is the state directory's (full or failing): the
                    // oldest points make room first; nothing is written without its
                    // before-images.
                    let history = HistoryError::of(&e).is_some();
                    if history && self.room_from_history(&e) {
                        continue;
                    }
                    let lasting = self
                        .history
                        .as_ref()
                        .and_then(|h| h.lock().unwrap().log.failed().map(str::to_string));
                    let mut core = self.core.lock().unwrap();
                    if let Some(why) = lasting {
                        core.fail_until_restart(Failure {
                            code: RefuseCode::RedoFailed,
                            why: format!("mirror state directory failed: {why}"),
                        });
                    }
                    if history && e.kind() == io::ErrorKind::StorageFull {
                        // Not a failure: the volume is consistent at its older point.
                        core.apply_waits(format!(
                            "history full: applying set {} waits: {e}; every point kept is \
                             younger than --history (--history-full wait: nothing the primary \
                             sends pushes one out); free space, raise --history-size or \
                             shorten --history (retried until then)",
                            set.set,
                        ));
                    } else {
                        let (code, what) = if history {
                            (RefuseCode::RedoFailed, "mirror state directory failed")
                        } else {
                            (RefuseCode::VolumeFailed, "mirror volume failed")
                        };
                        core.fail(Failure {
                            code,
                            why: format!(
                                "{what}: applying set {}: {e}; retrying every {} s",
                                set.set,
                                retry.as_secs_f64()
                            ),
                        });
                    }
                    drop(core);
                    if self.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(retry);
                    retry = (retry * 2).min(APPLY_RETRY_MAX);
                }
            }
        }
    }

    /// A staged resync is complete with `last`: apply its sets from `first` on, read back
    /// from the redo log, and `last` itself (which the caller accounts as applied). A crash
    /// meanwhile replays them all (they are durable, and the state saved names the set
    /// before `first` until a checkpoint after `last`). Failing, the staging is not lost:
    /// the applier retries the commit from the redo log.
    fn commit_staged(
        &self,
        applier: &mut Applier,
        first: u64,
        last: &DeltaSet,
        received_ms: u64,
    ) -> io::Result<()> {
        let segments = self
            .redo
            .lock()
            .unwrap()
            .segments_between(first - 1, last.set - 1);
        // The retry after a failure starts again from the first set not yet applied.
        let from = self.core.lock().unwrap().state().applied_set.max(first - 1);
        let mut history = self.history.as_ref().map(|h| h.lock().unwrap());
        let mut with_history;
        let target: &mut dyn ApplyTarget = match history.as_mut() {
            Some(k) => {
                with_history = WithHistory {
                    target: applier,
                    history: &mut k.log,
                };
                &mut with_history
            }
            None => applier,
        };
        apply::apply_from_redo(&self.fs, &segments, from, last.set - 1, target, |set| {
            self.core.lock().unwrap().applied(set, received_ms)
        })?;
        target.apply(last)
    }

    /// `e` says the history is full (its cap, or the state directory's file system) and it
    /// freed some room by dropping old points (logged): try again. Otherwise the set waits
    /// (`--history-full wait`): `e`, with why, becomes the volume's failure in status.
    fn room_from_history(&self, e: &io::Error) -> bool {
        let Some(h) = self.history.as_ref() else {
            return false;
        };
        if e.kind() != io::ErrorKind::StorageFull {
            return false;
        }
        let mut k = h.lock().unwrap();
        let freed = k.make_room(unix_ms(SystemTime::now())).unwrap_or(false);
        if freed {
            tracing::warn!(volume = %self.name, when_full = ?k.when_full,
                "history: full ({e}): old points were dropped to make room");
        }
        freed
    }

    /// Write `set` to the volume, its before-images first when a history is kept.
    fn apply_set(&self, applier: &mut Applier, set: &DeltaSet) -> io::Result<()> {
        match &self.history {
            Some(h) => WithHistory {
                target: applier,
                history: &mut h.lock().unwrap().log,
            }
            .apply(set),
            None => applier.apply(set),
        }
    }

    /// The volume was checkpointed at `state`: a recoverable point. A history that cannot
    /// record it is logged, not fatal: the before-images, which are, were saved with the set.
    fn history_point(&self, state: &VolumeState) {
        let Some(h) = &self.history else { return };
        let mut k = h.lock().unwrap();
        if let Err(e) = k.checkpointed(state, unix_ms(SystemTime::now())) {
            tracing::warn!(volume = %self.name, "history: cannot record a point: {e}");
        }
        // Retention's sync may have failed: status says so now, not at the next set.
        if let Some(why) = k.log.failed() {
            self.core.lock().unwrap().fail_until_restart(Failure {
                code: RefuseCode::RedoFailed,
                why: format!("mirror state directory failed: {why}"),
            });
        }
    }

    /// Keep the history's point at `set` (or the newest at or before `at_ms`) while it is
    /// served; returns it.
    pub fn pin_point(&self, set: Option<u64>, at_ms: Option<u64>) -> io::Result<Point> {
        let h = self.history.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "this mirror keeps no history (start it with --history DURATION)",
            )
        })?;
        let mut k = h.lock().unwrap();
        let set = match (set, at_ms) {
            (Some(n), _) => n,
            (None, Some(t)) => k.log.point_at(t).map(|p| p.set).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no point at or before {} (see `blkmirror history`)",
                        fmt_time(t).unwrap_or_default()
                    ),
                )
            })?,
            (None, None) => return Err(io::Error::other("a set or a time is needed")),
        };
        k.pin(set)
    }

    pub fn unpin_point(&self, set: u64) {
        if let Some(h) = &self.history {
            h.lock().unwrap().unpin(set);
        }
    }

    /// Read `out` at `offset` as the volume was at point `set` (pinned): the volume now, then
    /// the before-images saved since, under the history's lock, which the applier holds while
    /// it writes (so no write lands between the two).
    pub fn read_point(&self, set: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let (Some(h), Some(reader)) = (&self.history, &self.reader) else {
            return Err(io::Error::other("no history or no volume to read"));
        };
        let k = h.lock().unwrap();
        k.log.read_at(set, offset, out, &mut |o, b| {
            crate::disk::Storage::read_sync(&**reader, o, b)
        })
    }

    /// The recoverable points (`blkmirror history`): JSON keys are a contract.
    pub fn history_listing(&self) -> Option<serde_json::Value> {
        let h = self.history.as_ref()?.lock().unwrap();
        let points: Vec<serde_json::Value> = h
            .listing()
            .into_iter()
            .map(|(p, bytes)| {
                serde_json::json!({
                    "set": p.set,
                    "time": fmt_time(p.time_ms),
                    "bytes": bytes,
                    "seq": p.seq,
                    "generation": format!("{:016x}", p.gen),
                })
            })
            .collect();
        Some(serde_json::json!({
            "name": self.name,
            "points": points,
            "history_bytes": h.log.bytes(),
            "keep_seconds": h.keep.as_secs(),
            "max_bytes": h.max_bytes,
            "when_full": match h.when_full {
                WhenFull::Wait => "wait",
                WhenFull::DropOldest => "drop-oldest",
            },
        }))
    }

    /// Sync the volume, save the state with its disk's change time sealed, and let the
    /// checkpointed sets leave the redo log.
    /// A failure names the part that failed: the volume (its sync) or the state directory
    /// (the state file, on the redo log's file system, e.g. full).
    fn checkpoint(&self, applier: &mut Applier) -> Result<(), Failure> {
        applier.sync().map_err(|e| Failure {
            code: RefuseCode::VolumeFailed,
            why: format!("mirror volume failed: checkpoint: sync: {e}"),
        })?;
        let disk = ApplyTarget::fingerprint(applier).ok();
        let state = self.core.lock().unwrap().checkpoint_state(disk);
        let saved = match self.save_state(&state) {
            // The history takes its room from the state's file system: it gives way first.
            Err(e) if self.room_from_history(&e) => self.save_state(&state),
            other => other,
        };
        saved.map_err(|e| Failure {
            code: RefuseCode::RedoFailed,
            why: format!(
                "mirror state directory failed: cannot save {}: {e}",
                self.state_path.display()
            ),
        })?;
        self.core.lock().unwrap().checkpoint_done(state.applied_set);
        self.history_point(&state);
        // Not behind a redo fsync: if the log is busy, the next append trims.
        if let Ok(mut redo) = self.redo.try_lock() {
            if let Err(e) = redo.trim(state.applied_set) {
                tracing::warn!(volume = %self.name, "cannot trim the redo log: {e}");
            }
        }
        Ok(())
    }

    /// Compare the primary's chunk checksums with the volume as applied now (every set sent
    /// before the Sums is applied: it travelled the pipeline behind them).
    fn answer_sums(&self, applier: &mut Applier, job: SumsJob) {
        let chunk = u64::from(job.chunk);
        let mut buf = vec![0u8; job.chunk as usize];
        let mut differ = Vec::with_capacity(job.sums.len());
        for (i, sum) in job.sums.iter().enumerate() {
            let at = job.offset + i as u64 * chunk;
            if at >= self.size {
                differ.push(true);
                continue;
            }
            let len = chunk.min(self.size - at) as usize;
            let b = &mut buf[..len];
            let d = match applier.read(at, b) {
                Ok(()) => chunk_sum(b) != *sum,
                Err(e) => {
                    tracing::warn!(volume = %self.name, offset = at, "cannot read for a comparison: {e}");
                    true
                }
            };
            differ.push(d);
        }
        let _ = job.reply.send(Ok(Message::SumsReply {
            offset: job.offset,
            chunk: job.chunk,
            differ,
        }));
    }

    /// This volume's entry in the mirror's status document (keys are a contract: extend,
    /// never rename).
    pub fn status(&self) -> serde_json::Value {
        let link_up = self.stats.link_up.load(Ordering::Relaxed);
        let core = self.core.lock().unwrap();
        let d = core.durable();
        // What the volume holds (after a replay, were the mirror to stop now): consistency,
        // generation, data age; `applied_*` say what is written in place.
        let st = core.visible_state().clone();
        let in_place = core.state().clone();
        let committing = core.committing();
        let waiting = core.waiting().map(str::to_string);
        let state = core.repl_state(link_up);
        let failure = core.failure().cloned();
        let refused = core.refused().cloned();
        let staging = core.staging();
        drop(core);
        let peer_demoted = self.peer_notice();
        let promotion = match self.promotable(false) {
            Ok(()) if !link_up => serde_json::json!({ "allowed": true, "force_needed": false }),
            Ok(()) => serde_json::json!({ "allowed": false, "force_needed": false,
                "why": "its primary is connected: demote it first" }),
            Err(why) => serde_json::json!({
                "allowed": false,
                // --force would do (the primary is gone): a consistent copy it holds.
                "force_needed": !link_up && self.promotable(true).is_ok(),
                "why": why,
            }),
        };
        let history = self.history.as_ref().map(|h| {
            let h = h.lock().unwrap();
            let points = h.log.points();
            serde_json::json!({
                "points": points.len(),
                "oldest_at": points.first().and_then(|p| fmt_time(p.time_ms)),
                "newest_at": points.last().and_then(|p| fmt_time(p.time_ms)),
                "bytes": h.log.bytes(),
                "appended_bytes": h.log.appended_bytes(),
            })
        });
        let sessions = self.stats.sessions.load(Ordering::Relaxed);
        let consistent = st.consistent() && failure.is_none();
        let now_ms = unix_ms(SystemTime::now());
        // How old the newest write held here is: by the primary's clock, but never newer than
        // when it arrived by this host's own clock (a primary whose clock runs ahead must not
        // make old data look fresh).
        let newest = match (st.newest_write_ms, st.newest_received_ms) {
            (0, 0) => None,
            (0, r) => Some(r),
            (w, 0) => Some(w),
            (w, r) => Some(w.min(r)),
        };
        let age = newest.map(|t| now_ms.saturating_sub(t) as f64 / 1000.0);
        let detail = if let Some(f) = &failure {
            format!("{}: mirror is NOT being updated", f.why)
        } else if let Some((_, why)) = &refused {
            why.clone()
        } else if let Some(why) = &st.volume_changed {
            format!("{why}: NOT consistent")
        } else if let (true, Some(why)) = (st.consistent(), &waiting) {
            format!("consistent at an older point: {why}")
        } else if st.consistent() && committing {
            "consistent (a staged resync is being applied: its end point, which the redo log \
             holds)"
                .into()
        } else if st.consistent() {
            "consistent".into()
        } else if st.copy == apply::CopyState::Done {
            "catching up after the full copy: not yet consistent".into()
        } else {
            "resync (copy or comparison) not complete: NOT consistent".into()
        };
        // DRBD's words: UpToDate while its primary ships to it (or a demoted peer holds the
        // same), Consistent when it holds a consistent copy on its own, Outdated while it
        // holds writes it gave up, Inconsistent during a copy or comparison.
        let disk_state = if !consistent {
            "Inconsistent"
        } else if st.holds_given_up_writes() {
            // Its own old data, given up for its peer's (a failback, `resolve`): a valid
            // state, but not its peer's until the resync's end.
            "Outdated"
        } else if link_up || peer_demoted.is_some() {
            "UpToDate"
        } else {
            "Consistent"
        };
        serde_json::json!({
            "name": self.name,
            "role": "secondary",
            "peer_role": if link_up { "primary" } else if peer_demoted.is_some() { "secondary" } else { "unknown" },
            "disk_state": disk_state,
            "promotion": promotion,
            "link": if link_up { "up" } else { "down" },
            "state": state,
            "state_detail": detail,
            "uuid": st.identity.uuid,
            "generation": st.position_gen,
            "lag_bytes": serde_json::Value::Null,
            "lag_seconds": if consistent { serde_json::json!(age) } else { serde_json::Value::Null },
            "newest_write_at": fmt_time(st.newest_write_ms),
            "received_at": fmt_time(st.newest_received_ms),
            "data_age_seconds": age,
            "journal_bytes": self.redo.lock().unwrap().bytes(),
            "sent_bytes": 0,
            "wire_bytes": self.stats.received_bytes.load(Ordering::Relaxed),
            "received_bytes": self.stats.received_bytes.load(Ordering::Relaxed),
            "acked_set": d.set,
            "durable_seq": d.seq,
            "applied_set": in_place.applied_set,
            "applied_seq": in_place.applied_seq,
            "history": history,
            "reconnects": sessions.saturating_sub(1),
            "refused": self.stats.refused.load(Ordering::Relaxed),
            "copy": st.copy,
            "consistent": consistent,
            // A resync held back until its end point is durable: the volume stays at
            // `applied_seq`, consistent, meanwhile.
            "staged_resync": staging.map(|(first, last)| serde_json::json!({
                "first_set": first,
                "last_set": last,
            })),
            // A staged resync complete and being applied: consistent at its end point, which
            // the redo log holds, while `applied_set` climbs to it.
            "committing_to_set": committing.then_some(st.applied_set),
            // The primary's state the volume is a crash-consistent copy of (after a replay of
            // the redo log, were the mirror to stop now; its time is `newest_write_at`): it
            // stays put through a staged resync and moves to its end point once that is
            // durable. Null when the volume is no consistent copy.
            "consistent_at": consistent.then(|| serde_json::json!({
                "generation": st.position_gen,
                "seq": st.applied_seq,
                "set": st.applied_set,
            })),
            // Writes of this side's own it gave up (failback, resolve): saved as `saved`,
            // still on the volume until the peer's resync of `bytes` replaces them.
            "gave_up": st.takeover.as_ref().filter(|_| st.holds_given_up_writes()).map(|t| serde_json::json!({
                "saved": t.saved,
                "parted_generation": t.gen,
                "parted_seq": t.seq,
                "bytes": t.regions.iter().map(|r| r.1).sum::<u64>(),
            })),
            "last_error": self.stats.last_error.lock().unwrap().clone(),
            // Why the volume is not being applied to for now (its history is full; no set is
            // taken meanwhile); null when it is.
            "applying_waits": waiting,
        })
    }

    /// The redo writer: asks the core whether each set comes next, writes the sets waiting in
    /// one go, and hands them to the sync thread. It writes the next batch while the sync
    /// thread syncs the previous one: waiting for each sync here had kept the redo log idle
    /// for 40 % of its time.
    fn redo_loop(&self, jobs: mpsc::Receiver<Job>, to_sync: mpsc::Sender<ToSync>) {
        let mut batch: Vec<Pending> = Vec::new();
        let mut from = self.core.lock().unwrap().durable();
        while let Ok(first) = jobs.recv() {
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Set {
                        session,
                        set,
                        raw,
                        received_ms,
                        received,
                        reply,
                    } => {
                        let accepted = {
                            let mut core = self.core.lock().unwrap();
                            if batch.is_empty() {
                                from = core.written_position();
                            }
                            core.accept(session, &set)
                        };
                        match accepted {
                            Ok(Some(Accepted { after, ack_now })) => {
                                if let Some(ack) = ack_now {
                                    let _ = reply.send(Ok(ack));
                                }
                                batch.push(Pending {
                                    set,
                                    raw,
                                    received_ms,
                                    received,
                                    reply,
                                    after,
                                });
                            }
                            // A replaced session's: its primary re-sends after the decision.
                            Ok(None) => {}
                            Err(e) => {
                                self.write_batch(&mut batch, from, &to_sync);
                                let _ = to_sync.send(ToSync::Refused(reply, e));
                            }
                        }
                    }
                    Job::Sums(job) => {
                        // Checked here, where sets are taken in stream order, once the sets
                        // before it are written (a failed write rewinds the position): the
                        // redo writer's position is the last set before the checksums.
                        self.write_batch(&mut batch, from, &to_sync);
                        let in_order = self
                            .core
                            .lock()
                            .unwrap()
                            .sums_in_order(job.session, job.after_set);
                        match in_order {
                            Ok(true) => {
                                let _ = to_sync.send(ToSync::Sums(job));
                            }
                            // A replaced session's: dropped, as its sets are.
                            Ok(false) => {}
                            Err(e) => {
                                let _ = to_sync.send(ToSync::Refused(job.reply, e));
                            }
                        }
                    }
                    Job::Barrier { session, reply } => {
                        self.write_batch(&mut batch, from, &to_sync);
                        if let Some(s) = session {
                            self.core.lock().unwrap().enter_session(s);
                        }
                        let _ = to_sync.send(ToSync::Barrier(reply));
                    }
                }
                let batch_bytes: usize = batch.iter().map(|a| a.raw.len()).sum();
                if batch_bytes < BATCH_BYTES {
                    next = jobs.try_recv().ok();
                }
            }
            self.write_batch(&mut batch, from, &to_sync);
        }
    }

    /// Write `batch` to the redo log (not yet synced) and pass it on; on failure, refuse its
    /// sets and forget them (the core goes back to `from`, the position before them).
    fn write_batch(&self, batch: &mut Vec<Pending>, from: Durable, to_sync: &mpsc::Sender<ToSync>) {
        if batch.is_empty() {
            return;
        }
        let sets = std::mem::take(batch);
        let result = {
            let mut redo = self.redo.lock().unwrap();
            // Only what a checkpoint made durable on the volume may leave the redo log.
            let checkpointed = self.core.lock().unwrap().checkpointed();
            if let Err(e) = redo.trim(checkpointed) {
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
                // rewritten from where this batch began. A full file system under the redo log
                // is not a failed volume: it clears when the log can be written again.
                let why = format!("mirror redo log failed: {e}");
                // The re-sent sets find the room the history gives up, if it keeps one.
                self.room_from_history(&e);
                self.core.lock().unwrap().write_failed(
                    from,
                    Failure {
                        code: RefuseCode::RedoFailed,
                        why: why.clone(),
                    },
                );
                for a in sets {
                    let _ = to_sync.send(ToSync::Refused(
                        a.reply,
                        (RefuseCode::RedoFailed, why.clone()),
                    ));
                }
            }
        }
    }

    /// The sync thread: one fdatasync per file for every batch written meanwhile (group
    /// commit), then the acknowledgements, then the sets go to the applier in order.
    fn sync_loop(&self, from_redo: mpsc::Receiver<ToSync>, apply: mpsc::Sender<ToApply>) {
        while let Ok(first) = from_redo.recv() {
            let mut items = vec![first];
            while let Ok(more) = from_redo.try_recv() {
                items.push(more);
            }
            // Written after a sync that failed (the writer runs a batch ahead): behind what
            // that sync may have lost, so refused like its sets.
            let earlier = self
                .core
                .lock()
                .unwrap()
                .lasting_failure()
                .map(|f| f.why.clone());
            let mut synced: Vec<&Handle> = Vec::new();
            let mut result = Ok(());
            for item in items.iter().filter(|_| earlier.is_none()) {
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
            // as durable, and the log is not trusted again until the mirror restarts.
            let failed = earlier.or_else(|| {
                result.err().map(|e| {
                    let why = format!(
                        "mirror redo log failed: sync: {e} (restart the mirror once its disk \
                         is fixed)"
                    );
                    self.core.lock().unwrap().fail_until_restart(Failure {
                        code: RefuseCode::VolumeFailed,
                        why: why.clone(),
                    });
                    why
                })
            });
            for item in items {
                match item {
                    ToSync::Written { sets, .. } => {
                        for a in sets {
                            if let Some(why) = &failed {
                                let _ = a.reply.send(Err((RefuseCode::VolumeFailed, why.clone())));
                                continue;
                            }
                            let ack = self.core.lock().unwrap().synced(a.after);
                            drop(a.received);
                            if let Some(ack) = ack {
                                let _ = a.reply.send(Ok(ack));
                            }
                            let permit = self.apply_budget.acquire(apply_cost(&a.set));
                            // The applier only ends with the process.
                            let _ = apply.send(ToApply::Set {
                                set: a.set,
                                received_ms: a.received_ms,
                                _permit: permit,
                            });
                        }
                    }
                    ToSync::Refused(reply, why) => {
                        let _ = reply.send(Err(why));
                    }
                    ToSync::Sums(job) => {
                        let _ = apply.send(ToApply::Sums(job));
                    }
                    ToSync::Barrier(reply) => {
                        let _ = apply.send(ToApply::Barrier(reply));
                    }
                }
            }
        }
    }
}

/// The pipeline's channels until its threads start.
struct Threads {
    jobs_rx: mpsc::Receiver<Job>,
    sync_tx: mpsc::Sender<ToSync>,
    sync_rx: mpsc::Receiver<ToSync>,
    apply_tx: mpsc::Sender<ToApply>,
    apply_rx: mpsc::Receiver<ToApply>,
}

impl Threads {
    fn start(self, vol: Arc<MirrorVolume>, applier: Applier) {
        drop(self.apply_tx);
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .expect("a pipeline thread starts");
            vol.threads.lock().unwrap().push(t);
        };
        let v = vol.clone();
        let (jobs_rx, sync_tx) = (self.jobs_rx, self.sync_tx);
        spawn(
            format!("redo-{}", vol.name),
            Box::new(move || v.redo_loop(jobs_rx, sync_tx)),
        );
        let v = vol.clone();
        let (sync_rx, apply_tx) = (self.sync_rx, vol.apply_tx.lock().unwrap().clone());
        spawn(
            format!("sync-{}", vol.name),
            Box::new(move || v.sync_loop(sync_rx, apply_tx)),
        );
        let v = vol.clone();
        let apply_rx = self.apply_rx;
        spawn(
            format!("apply-{}", vol.name),
            Box::new(move || v.apply_loop(applier, apply_rx)),
        );
    }
}

fn stopped() -> Refusal {
    (
        RefuseCode::Stopping,
        "the mirror's pipeline has stopped".to_string(),
    )
}

/// Unix milliseconds as RFC 3339 UTC text (None for 0: not known).
pub fn fmt_time(ms: u64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    ))
}

/// RFC 3339 UTC text (`2026-12-05T07:39:14Z`, fractions of a second allowed; a `+00:00`
/// offset too) as Unix milliseconds: what [`fmt_time`] writes, read back.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?}: expected a UTC time like 2026-12-05T07:39:14Z");
    let t = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix("+00:00"))
        .ok_or_else(bad)?;
    let (date, time) = t.split_once(['T', ' ']).ok_or_else(bad)?;
    let num = |x: &str| x.parse::<i64>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let (whole, frac) = time.split_once('.').unwrap_or((time, ""));
    let c: Vec<&str> = whole.split(':').collect();
    if d.len() != 3 || c.len() != 3 || !frac.chars().all(|ch| ch.is_ascii_digit()) {
        return Err(bad());
    }
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (hh, mm, ss) = (num(c[0])?, num(c[1])?, num(c[2])?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    // Days since 1970-01-01 from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms: i64 = format!("{frac:0<3}")[..3].parse().map_err(|_| bad())?;
    let total = ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms;
    u64::try_from(total).map_err(|_| format!("{s:?}: before 1970"))
}

pub struct Mirror {
    pub volumes: Vec<Arc<MirrorVolume>>,
    /// Memory for received messages, shared by all sessions.
    pool: Arc<SharedPool>,
}

impl Mirror {
    pub fn open(
        fs: &Fs,
        specs: &[VolumeSpec],
        state_dir: &Path,
        history: Option<Retention>,
    ) -> io::Result<Arc<Mirror>> {
        let volumes = specs
            .iter()
            .map(|s| MirrorVolume::open(fs, s, state_dir, history.clone()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Arc::new(Mirror {
            volumes,
            pool: SharedPool::new(RECEIVE_POOL_BYTES),
        }))
    }

    /// A clean stop of every volume (after the endpoint is closed).
    pub fn close(&self) {
        for v in &self.volumes {
            if let Some(s) = v.session.lock().unwrap().take() {
                s.abort();
            }
            v.close();
        }
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
        let first =
            tokio::time::timeout(Duration::from_secs(10), read_message(&mut recv, &self.pool))
                .await;
        match first {
            Ok(Ok(Some((
                Message::Hello {
                    version,
                    volume,
                    size,
                },
                _,
            )))) => {
                self.hello(conn, send, recv, version, volume, size).await;
            }
            Ok(Ok(Some((Message::Pull { volume, holds, .. }, _)))) => {
                // A secondary dialed, asking this side to ship: it is a secondary too.
                let why = match self.volumes.iter().find(|v| v.name == volume).cloned() {
                    None => format!("no volume named {volume:?} here"),
                    Some(vol) => {
                        let learned = match holds {
                            Some((gen, seq)) => tokio::task::spawn_blocking(move || {
                                vol.learn_peer_demoted(gen, seq)
                            })
                            .await
                            .unwrap_or_else(|e| Err(e.to_string())),
                            None => Err("it holds no consistent copy".into()),
                        };
                        match learned {
                            Ok(()) => format!(
                                "volume {volume}: this side is a secondary too; it holds what \
                                 the peer holds, and may be promoted (blkmirror promote)"
                            ),
                            Err(why) => format!(
                                "volume {volume}: this side is a secondary too (promote one \
                                 of the two; the peer's data is not this side's: {why})"
                            ),
                        }
                    }
                };
                tracing::info!(%peer, "a secondary asked for a volume: {why}");
                // What this side holds, so that the peer may learn it too (either of two
                // secondaries holding the same data may be promoted without --force).
                if let Some(vol) = self.volumes.iter().find(|v| v.name == volume) {
                    let _ = write_message(&mut send, &vol.pull_message()).await;
                }
                refuse_and_close(&conn, &mut send, RefuseCode::NoPrimary, why).await;
            }
            Ok(Ok(other)) => {
                let what = describe(other.map(|(m, _)| m));
                refuse_and_close(
                    &conn,
                    &mut send,
                    RefuseCode::BadMessage,
                    format!("expected Hello, got {what}"),
                )
                .await;
            }
            Ok(Err(e)) => {
                refuse_and_close(&conn, &mut send, RefuseCode::BadMessage, e.to_string()).await
            }
            Err(_) => {
                refuse_and_close(
                    &conn,
                    &mut send,
                    RefuseCode::BadMessage,
                    "no Hello within 10 s".into(),
                )
                .await
            }
        }
    }

    /// This side dials (a demoted primary, `--mirror`): ask the peer to ship `vol` on a new
    /// stream (`Message::Pull`), then serve the session it starts until it ends. Err: the
    /// peer's refusal (not a primary yet, ...) or the link's failure.
    pub async fn pull(
        self: Arc<Self>,
        conn: quinn::Connection,
        vol: Arc<MirrorVolume>,
    ) -> Result<(), String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_message(&mut send, &vol.pull_message())
            .await
            .map_err(|e| e.to_string())?;
        let first = read_message(&mut recv, &self.pool)
            .await
            .map_err(|e| e.to_string())?;
        match first {
            Some((
                Message::Hello {
                    version,
                    volume,
                    size,
                },
                _,
            )) => {
                let task = self.hello(conn, send, recv, version, volume, size).await;
                if let Some(t) = task {
                    let _ = t.await;
                }
                Err("the session ended".into())
            }
            Some((Message::Pull { holds, .. }, _)) => {
                // A secondary too: learn what it holds (see `connection`).
                let learned = match holds {
                    Some((gen, seq)) => {
                        let v = vol.clone();
                        tokio::task::spawn_blocking(move || v.learn_peer_demoted(gen, seq))
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()))
                    }
                    None => Err("it holds no consistent copy".into()),
                };
                Err(match learned {
                    Ok(()) => "the peer is a secondary too, holding the same data: either may \
                               be promoted"
                        .into(),
                    Err(why) => format!("the peer is a secondary too ({why})"),
                })
            }
            Some((Message::Refuse { code, reason }, _)) => {
                Err(format!("{reason} ({:?})", RefuseCode::from_u16(code)))
            }
            other => Err(format!(
                "expected Hello, got {}",
                describe(other.map(|(m, _)| m))
            )),
        }
    }

    /// A primary's Hello on `send`/`recv`: checks, its Identify, then its session (the task,
    /// when one starts).
    async fn hello(
        self: Arc<Self>,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        version: u16,
        volume: String,
        size: u64,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let peer = conn.remote_address();
        let Some(vol) = self.volumes.iter().find(|v| v.name == volume).cloned() else {
            refuse_and_close(
                &conn,
                &mut send,
                RefuseCode::UnknownVolume,
                format!("no volume named {volume:?} here"),
            )
            .await;
            return None;
        };
        if let Err((code, why)) = check_hello(version, &volume, size, vol.size) {
            refuse_and_close(&conn, &mut send, code, why).await;
            return None;
        }
        let claim = {
            match read_message(&mut recv, &self.pool).await {
                Ok(Some((Message::Identify(c), _))) => c,
                Ok(other) => {
                    let what = describe(other.map(|(m, _)| m));
                    refuse_and_close(
                        &conn,
                        &mut send,
                        RefuseCode::BadMessage,
                        format!("expected Identify, got {what}"),
                    )
                    .await;
                    return None;
                }
                Err(e) => {
                    refuse_and_close(&conn, &mut send, RefuseCode::BadMessage, e.to_string()).await;
                    return None;
                }
            }
        };
        // Another pair's primary is refused before it can disturb the session of this pair's
        // own primary (which a new session replaces, below).
        let live = vol.stats.link_up.load(Ordering::Relaxed);
        let screened = vol.core.lock().unwrap().screen(&claim, live);
        if let Err((code, why)) = screened {
            tracing::warn!(volume = %vol.name, %peer, primary_uuid = ?claim.uuid,
                "refused a primary holding another volume's data: {why}");
            *vol.stats.last_error.lock().unwrap() = why.clone();
            vol.stats.refused.fetch_add(1, Ordering::Relaxed);
            send_refusal(&conn, &mut send, code, why).await;
            return None;
        }
        // A reconnecting primary replaces its stale session.
        let task = {
            let v = vol.clone();
            let conn = conn.clone();
            let pool = self.pool.clone();
            tokio::spawn(async move {
                let result = v
                    .clone()
                    .session(&mut send, &mut recv, &pool, version, size, claim)
                    .await;
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
        Some(task)
    }
}

/// A message that came instead of the one expected, for the refusal's text.
fn describe(got: Option<Message>) -> String {
    got.map_or("nothing".to_string(), |m| {
        format!("{m:?}").chars().take(80).collect()
    })
}

impl MirrorVolume {
    async fn session(
        self: Arc<Self>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        pool: &Arc<SharedPool>,
        version: u16,
        size: u64,
        claim: Box<crate::repl::identity::PrimaryClaim>,
    ) -> Result<(), Refusal> {
        let bad = |e: StreamError| (RefuseCode::BadMessage, e.to_string());
        // Whatever earlier sessions left in the pipeline is written, synced and applied
        // first, or dropped if not yet written: the decision sees exactly what is durable.
        // Refused at once, not after the barrier times out behind an applier that retries.
        if let Some(f) = self.core.lock().unwrap().lasting_failure() {
            return Err((f.code, f.why.clone()));
        }
        let session = self.core.lock().unwrap().new_session();
        self.barrier(session).await?;
        let accept = self.core.lock().unwrap().hello(
            version,
            &self.name,
            size,
            &claim,
            crate::repl::identity::VolumeUuid::random,
        )?;
        let state = self.core.lock().unwrap().state().clone();
        let v = self.clone();
        let saved = tokio::task::spawn_blocking(move || v.save_state(&state))
            .await
            .map_err(|e| (RefuseCode::Stopping, e.to_string()))?;
        if let Err(e) = saved {
            // Status names the state directory until a later write there works (the next
            // session retries it), as a failed checkpoint does.
            let failure = Failure {
                code: RefuseCode::RedoFailed,
                why: format!(
                    "mirror state directory failed: cannot save {}: {e}",
                    self.state_path.display()
                ),
            };
            self.core.lock().unwrap().fail(failure.clone());
            return Err((failure.code, failure.why));
        }
        for m in &accept.before {
            write_message(send, m).await.map_err(bad)?;
        }
        write_message(send, &accept.decision).await.map_err(bad)?;
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.stats.link_up.store(true, Ordering::Relaxed);
        self.stats.last_error.lock().unwrap().clear();
        tracing::info!(volume = %self.name, mode = ?accept.mode, reason = %accept.reason,
            "primary attached");
        // Receiving, writing the redo log and syncing it overlap; received-but-not-durable
        // bytes are bounded.
        let (reply_tx, mut reply_rx) = tokio::sync::mpsc::unbounded_channel::<Reply>();
        let budget = Arc::new(tokio::sync::Semaphore::new(PENDING_BYTES));
        let reading = async {
            let reply_tx = reply_tx;
            let r = async {
                loop {
                    let (msg, raw) = match read_message(recv, pool).await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            tracing::info!(volume = %self.name, "primary closed the stream");
                            return Ok(());
                        }
                        Err(StreamError::Read(quinn::ReadExactError::ReadError(e))) => {
                            return Err((RefuseCode::BadMessage, format!("link lost: {e}")));
                        }
                        Err(e) => return Err(bad(e)),
                    };
                    match msg {
                        Message::Set(set) => {
                            self.stats
                                .received_bytes
                                .fetch_add(raw.len() as u64, Ordering::Relaxed);
                            let want = (raw.len() as u32).min(PENDING_BYTES as u32);
                            let received = budget
                                .clone()
                                .acquire_many_owned(want)
                                .await
                                .expect("budget never closes");
                            self.send_job(Job::Set {
                                session,
                                set,
                                raw,
                                received_ms: unix_ms(SystemTime::now()),
                                received,
                                reply: reply_tx.clone(),
                            })?;
                        }
                        Message::Sums {
                            offset,
                            chunk,
                            after_set,
                            sums,
                        } => self.send_job(Job::Sums(SumsJob {
                            session,
                            offset,
                            chunk,
                            after_set,
                            sums,
                            reply: reply_tx.clone(),
                        }))?,
                        other => {
                            return Err((
                                RefuseCode::BadMessage,
                                format!(
                                    "expected a delta set or checksums, got {}",
                                    format!("{other:?}").chars().take(60).collect::<String>()
                                ),
                            ))
                        }
                    }
                }
            }
            .await;
            // The replies end once the pipeline has answered everything sent.
            drop(reply_tx);
            r
        };
        // Test builds: the first N sessions of each volume acknowledge nothing (their link
        // stays up), as a stream that stalls (`BLKMIRROR_TEST_WITHHOLD_ACKS_SESSIONS=N`).
        #[cfg(feature = "test-hooks")]
        let withhold_acks = std::env::var("BLKMIRROR_TEST_WITHHOLD_ACKS_SESSIONS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| session <= n);
        let replying = async {
            while let Some(reply) = reply_rx.recv().await {
                let msg = reply?;
                #[cfg(feature = "test-hooks")]
                if withhold_acks && matches!(msg, Message::Ack { .. }) {
                    tracing::warn!(volume = %self.name, session, "test hook: acknowledgement withheld");
                    continue;
                }
                write_message(send, &msg)
                    .await
                    .map_err(|e| (RefuseCode::BadMessage, e.to_string()))?;
            }
            Ok(())
        };
        tokio::pin!(replying);
        tokio::select! {
            r = reading => {
                // Let what was received become durable and be acknowledged before leaving.
                let a = replying.await;
                r.and(a)
            }
            a = &mut replying => a,
        }
    }
}

async fn refuse_and_close(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: RefuseCode,
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
    code: RefuseCode,
    reason: String,
) {
    let close_reason: Vec<u8> = reason.bytes().take(200).collect();
    let code = code as u16;
    let _ = write_message(send, &Message::Refuse { code, reason }).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(code.into(), &close_reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;
    use crate::repl::frame::SetKind;
    use bytes::Bytes;
    use std::os::unix::fs::FileExt;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    const BLOCK: usize = 4096;

    /// Set `n` writes block n-1 full of the byte n.
    fn set_job(n: u64, session: u64, reply: &ReplySender) -> Job {
        let set = DeltaSet {
            set: n,
            first_seq: n,
            last_seq: n,
            newest_write_ms: 1000 + n,
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
            session,
            set,
            raw: BlockBytes::copy_from(&raw),
            received_ms: 5000,
            received: budget.try_acquire_owned().unwrap(),
            reply: reply.clone(),
        }
    }

    /// The set numbers acknowledged, or the refusal codes, in order.
    fn answers(mut rx: UnboundedReceiver<Reply>) -> Vec<Result<u64, RefuseCode>> {
        let mut out = Vec::new();
        while let Some(r) = rx.blocking_recv() {
            out.push(match r {
                Ok(Message::Ack { set, .. }) => Ok(set),
                Ok(other) => panic!("unexpected {other:?}"),
                Err((code, _)) => Err(code),
            });
        }
        out
    }

    fn start_session(vol: &MirrorVolume) -> u64 {
        let s = vol.core.lock().unwrap().new_session();
        let (reply, rx) = tokio::sync::oneshot::channel();
        vol.send_job(Job::Barrier {
            session: Some(s),
            reply,
        })
        .unwrap();
        rx.blocking_recv().unwrap();
        s
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
        let vol = MirrorVolume::open(&crate::env::os(), &spec, dir.path(), None).unwrap();
        let s1 = start_session(&vol);

        // Session 1 queues sets 1-3; session 2 starts; then session 1's set 4 arrives late.
        let (reply1, answers1) = unbounded_channel();
        for n in 1..=3 {
            vol.send_job(set_job(n, s1, &reply1)).unwrap();
        }
        let s2 = start_session(&vol);
        vol.send_job(set_job(4, s1, &reply1)).unwrap();
        drop(reply1);
        // Session 2 sees everything session 1 got written: it resumes at set 4.
        assert_eq!(vol.core.lock().unwrap().durable().set, 3);
        assert_eq!(
            answers(answers1),
            vec![Ok(1), Ok(2), Ok(3)],
            "set 4 of the old session is dropped, not acknowledged"
        );

        let (reply2, answers2) = unbounded_channel();
        vol.send_job(set_job(4, s2, &reply2)).unwrap();
        // A set that skips one, and one already durable, are refused.
        vol.send_job(set_job(6, s2, &reply2)).unwrap();
        vol.send_job(set_job(2, s2, &reply2)).unwrap();
        drop(reply2);
        assert_eq!(
            answers(answers2),
            vec![Ok(4), Err(RefuseCode::BadSet), Err(RefuseCode::BadSet)]
        );

        // Every durable set reaches the volume, in order, and a clean close checkpoints it.
        vol.close();
        let st = VolumeState::load(&OsFsRef, &VolumeState::path(dir.path(), "v")).unwrap();
        assert_eq!(st.applied_set, 4);
        assert_eq!(st.newest_write_ms, 1004);
        assert!(vol.core.lock().unwrap().failure().is_none());
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

    use crate::env::OsFs as OsFsRef;

    #[test]
    fn times_read_back_as_written() {
        for ms in [
            1_000u64,
            1_764_921_554_123,
            951_782_400_000,
            4_102_444_799_999,
        ] {
            let text = fmt_time(ms).unwrap();
            assert_eq!(parse_time(&text), Ok(ms), "{text}");
        }
        assert_eq!(
            parse_time("2026-12-05T07:39:14+00:00"),
            Ok(1_796_456_354_000)
        );
        assert_eq!(parse_time("2026-12-05T07:39:14.5Z"), Ok(1_796_456_354_500));
        for bad in [
            "yesterday",
            "2026-12-05",
            "2026-13-05T00:00:00Z",
            "2026-12-05T07:39:14+01:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(fmt_time(0), None);
        assert_eq!(
            fmt_time(1_764_892_800_123).as_deref(),
            Some("2025-12-05T00:00:00.123Z")
        );
        assert_eq!(
            fmt_time(951_782_400_000).as_deref(),
            Some("2000-02-29T00:00:00.000Z")
        );
    }
}
