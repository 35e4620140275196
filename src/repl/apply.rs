//! The mirror's side of a volume at rest: its persisted state, applying delta sets in place
//! through io_uring, and `recover` (replay the redo log after a crash).

use super::frame::{self, DeltaSet, Message, SetKind};
use super::redo::RedoLog;
use crate::disk::buf::{AlignedBuf, BufPool};
use crate::disk::file::{FileStorage, IoMode};
use crate::disk::fingerprint::Fingerprint;
use crate::disk::ranges::aligned_span;
use crate::disk::spec::VolumeSpec;
use crate::disk::{DiskOp, Prepared, Storage};
use crate::env::{write_atomic, FileSystem, Fs};
use crate::extent::{Extent, Payload};
use crate::repl::identity::{GenId, VolumeIdentity};
use io_uring::IoUring;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Never received a full copy: the volume is not a replica yet.
    #[default]
    None,
    /// A full copy is being received: the volume is not consistent.
    Running,
    Done,
}

/// What the mirror remembers of a volume between runs (`STATE/volumes/NAME.json`), saved
/// atomically at every checkpoint and decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// Always "mirror": a daemon of the other role refuses this state directory.
    #[serde(default = "mirror_role")]
    pub role: String,
    pub applied_set: u64,
    pub applied_seq: u64,
    pub copy: CopyState,
    /// The volume is consistent once journal sets up to this sequence number are applied
    /// after the full copy (the copy read blocks that were newer than the sets before it).
    pub consistent_after_seq: u64,
    /// Which pair and generation the data belongs to, and the disks of both sides.
    #[serde(default)]
    pub identity: VolumeIdentity,
    /// When the newest write applied here completed on the primary (Unix ms, the primary's
    /// clock; 0: not known).
    #[serde(default)]
    pub newest_write_ms: u64,
    /// When the newest applied set was received (Unix ms, this host's clock).
    #[serde(default)]
    pub newest_received_ms: u64,
    /// The volume is not what this state describes (its disk was replaced, or it changed
    /// while the daemon was stopped): not consistent until a resync completes.
    #[serde(default)]
    pub volume_changed: Option<String>,
    /// The generation the data belongs to: with `applied_seq`, the state it is. A sequence
    /// number alone can be ambiguous across a break (the content after a host crash, copied
    /// before any new write, sits at the number where the lost history also had a state).
    #[serde(default)]
    pub position_gen: Option<GenId>,
    /// The peer says it is a secondary holding this (generation, seq), which this volume
    /// holds too: a promotion without `--force` continues exactly that state. Known only while
    /// the peer keeps saying so (never saved: a peer heard from before a restart, or before it
    /// went away, may have been promoted since); cleared by any new session.
    #[serde(skip)]
    pub peer_demoted: Option<(GenId, u64)>,
    /// How this side last changed role (`promote`, `promote --force`, `demote`): a daemon
    /// started as the other role follows it instead of refusing the state directory.
    #[serde(default)]
    pub changed_role: Option<String>,
    /// Writes of this side's own it gave up (a failback or `resolve --discard-local`), while
    /// the volume still holds them: the peer resyncs their regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<Takeover>,
}

/// A divergent tail this side gave up and saved (`repl::divergent`), not yet replaced by the
/// peer's data: the volume is the state both sides held at (`gen`, `seq`) plus writes of its
/// own in `regions`, which the peer must resync (with its own changes since) before the
/// volume is its copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    pub gen: GenId,
    pub seq: u64,
    /// Kept in the saved tail's `saved.json` (a long list), read back by
    /// [`VolumeState::load`]; empty when that is gone: the whole volume is resynced.
    #[serde(skip)]
    pub regions: Vec<(u64, u64)>,
    /// The saved tail (`blkmirror divergent`).
    pub saved: String,
}

impl VolumeState {
    /// The volume holds writes of its own it gave up (`takeover`) on top of the state it
    /// names: it is that side's old data, not the named state, until the peer's resync ends.
    pub fn holds_given_up_writes(&self) -> bool {
        self.takeover
            .as_ref()
            .is_some_and(|t| self.position_gen == Some(t.gen) && self.applied_seq == t.seq)
    }

    /// While it [holds given-up writes](VolumeState::holds_given_up_writes): the regions its
    /// peer must resync, the whole volume (of `volume_bytes`) when the saved tail naming them
    /// is gone.
    pub fn given_up_regions(&self, volume_bytes: u64) -> Option<Vec<(u64, u64)>> {
        let t = self
            .takeover
            .as_ref()
            .filter(|_| self.holds_given_up_writes())?;
        Some(if t.regions.is_empty() {
            vec![(0, volume_bytes)]
        } else {
            t.regions.clone()
        })
    }
}

fn mirror_role() -> String {
    "mirror".into()
}

impl Default for VolumeState {
    fn default() -> Self {
        VolumeState {
            role: mirror_role(),
            applied_set: 0,
            applied_seq: 0,
            copy: CopyState::None,
            consistent_after_seq: 0,
            identity: VolumeIdentity::default(),
            newest_write_ms: 0,
            newest_received_ms: 0,
            volume_changed: None,
            position_gen: None,
            peer_demoted: None,
            changed_role: None,
            takeover: None,
        }
    }
}

impl VolumeState {
    pub fn path(state_dir: &Path, volume: &str) -> PathBuf {
        state_dir.join("volumes").join(format!("{volume}.json"))
    }

    pub fn load(fs: &dyn FileSystem, path: &Path) -> io::Result<VolumeState> {
        let st: VolumeState = match fs.read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VolumeState::default()),
            Err(e) => return Err(e),
        };
        if st.role != "mirror" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} belongs to a {} (this daemon is a mirror)",
                    path.display(),
                    st.role
                ),
            ));
        }
        let mut st = st;
        if let Some(t) = st.takeover.as_mut() {
            // STATE/volumes/NAME.json: the saved tails are in STATE/divergent.
            let state_dir = path
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."));
            match crate::repl::divergent::find(fs, state_dir, &t.saved)? {
                Some(saved) => t.regions = saved.ranges,
                None => tracing::error!(saved = %t.saved,
                    "the writes this side gave up are no longer saved where its state says: \
                     the whole volume is resynced from the peer"),
            }
        }
        Ok(st)
    }

    /// Write atomically: temp file, fsync, rename, fsync the directory.
    pub fn save(&self, fs: &dyn FileSystem, path: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_atomic(fs, path, &bytes)
    }

    /// The volume holds a state of the primary's: a copy completed, every journal set up to
    /// its point applied, and the volume is the disk this state describes.
    pub fn consistent(&self) -> bool {
        self.copy == CopyState::Done
            && self.applied_seq >= self.consistent_after_seq
            && self.volume_changed.is_none()
    }

    /// The state after `set` is applied.
    pub fn advance(&mut self, set: &DeltaSet) {
        self.applied_set = set.set;
        self.newest_write_ms = self.newest_write_ms.max(set.newest_write_ms);
        let lineage = &self.identity.lineage;
        match set.kind {
            SetKind::Journal => {
                self.applied_seq = self.applied_seq.max(set.last_seq);
                if let Some((_, s)) = lineage.span_at(self.applied_seq) {
                    self.position_gen = Some(s.gen);
                }
            }
            SetKind::Copy { done } => {
                if done {
                    // The copy holds every write up to where it started (`first_seq`); the
                    // journal sets after it bring the volume to `last_seq`, where it read
                    // its last chunk. It is the primary's current generation's data (the
                    // session's lineage ends with it).
                    self.copy = CopyState::Done;
                    self.applied_seq = self.applied_seq.max(set.first_seq);
                    self.consistent_after_seq = set.last_seq;
                    self.position_gen = lineage.current().map(|s| s.gen);
                    // The copy now holds what the volume held when it was read.
                    self.volume_changed = None;
                } else {
                    self.copy = CopyState::Running;
                }
            }
            // Blocks as they already should be at this position: nothing moves.
            SetKind::Repair => {}
        }
    }
}

/// What the applier does with the next durable set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write it to the volume now.
    Apply,
    /// Hold it: a resync of a consistent volume is being staged, and the volume keeps the
    /// state it had before until the resync's end point is durable. The set stays in the
    /// redo log (nothing past the stage's start is checkpointed).
    Stage,
    /// This set completes the staged resync: apply the sets from `first` on (read back from
    /// the redo log), then this one. `state` is the volume's state after it.
    Commit { first: u64, state: Box<VolumeState> },
}

/// A resync being staged: its first set, and the state the volume will have once every set
/// staged so far is applied.
#[derive(Clone, Debug)]
pub struct Staging {
    pub first: u64,
    pub shadow: VolumeState,
}

/// The staging rule, shared by the applier, the replay and the simulator: a Copy set (a
/// resync's data, read from the primary's volume) arriving while the volume is consistent
/// starts a stage; every set from then on is held until the state after it is consistent
/// again, and then all are applied at once. So the mirror holds a prefix state of the
/// primary's writes at every instant, crashes included (I1): the old one until the resync's
/// end point is durable, the new one after. (A full copy or a comparison starts from a volume
/// already marked not consistent: its sets are applied as they come.)
#[derive(Clone, Debug, Default)]
pub struct Stager {
    pub staging: Option<Staging>,
}

impl Stager {
    /// The next set the applier expects, given the volume's applied state.
    pub fn next_set(&self, applied: &VolumeState) -> u64 {
        self.staging
            .as_ref()
            .map_or(applied.applied_set, |s| s.shadow.applied_set)
            + 1
    }

    /// What to do with `set`, the next durable set, on a volume whose applied state is
    /// `applied`.
    pub fn step(&mut self, applied: &VolumeState, set: &DeltaSet) -> Step {
        match &mut self.staging {
            None => {
                if !(applied.consistent() && matches!(set.kind, SetKind::Copy { .. })) {
                    return Step::Apply;
                }
                let mut shadow = applied.clone();
                shadow.advance(set);
                if shadow.consistent() {
                    return Step::Apply;
                }
                self.staging = Some(Staging {
                    first: set.set,
                    shadow,
                });
                Step::Stage
            }
            Some(s) => {
                s.shadow.advance(set);
                if !s.shadow.consistent() {
                    return Step::Stage;
                }
                let s = self.staging.take().expect("staging");
                Step::Commit {
                    first: s.first,
                    state: Box::new(s.shadow),
                }
            }
        }
    }
}

const RING: u32 = 256;

/// Where the mirror applies delta sets: the volume's disk (an [`Applier`]), or a simulated one.
pub trait ApplyTarget {
    /// Write every extent of `set` (not yet durable: call `sync`).
    fn apply(&mut self, set: &DeltaSet) -> io::Result<()>;
    /// Make everything applied so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Read what the volume holds (comparison checksums).
    fn read(&mut self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    /// The disk behind the volume.
    fn fingerprint(&self) -> io::Result<Fingerprint>;
    /// Whether the volume may hold data: anything allocated in a file (a block device always
    /// may). A mirror with no record of any copy compares such a volume (pre-seeded from a
    /// backup, shipped by courier) instead of copying all of it.
    fn holds_data(&self) -> io::Result<bool>;
}

impl ApplyTarget for Applier {
    fn apply(&mut self, set: &DeltaSet) -> io::Result<()> {
        Applier::apply(self, set)
    }

    fn sync(&mut self) -> io::Result<()> {
        Applier::sync(self)
    }

    fn read(&mut self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.storage.read_sync(offset, out)
    }

    fn fingerprint(&self) -> io::Result<Fingerprint> {
        self.storage.fingerprint()
    }

    fn holds_data(&self) -> io::Result<bool> {
        use crate::disk::Storage;
        let size = self.storage.size();
        Ok(self
            .storage
            .allocation(0, size)?
            .iter()
            .any(|&(_, hole)| !hole))
    }
}

/// Writes delta sets into a volume.
pub struct Applier {
    storage: FileStorage,
    ring: IoUring,
    zeroes: AlignedBuf,
    /// Aligned buffers for direct I/O, reused from set to set.
    pool: BufPool,
}

/// Aligned buffers the applier keeps between sets (beyond this they are freed).
const POOL_BYTES: usize = 16 << 20;

struct Pending<'a> {
    offset: u64,
    data: Option<&'a [u8]>,
    len: u64,
    done: u64,
    /// Zeroing in place was refused: write zero buffers instead.
    fill: bool,
}

impl<'a> Pending<'a> {
    fn new(offset: u64, data: Option<&'a [u8]>, len: u64) -> Self {
        Pending {
            offset,
            data,
            len,
            done: 0,
            fill: false,
        }
    }
}

impl Applier {
    pub fn new(storage: FileStorage) -> io::Result<Applier> {
        Ok(Applier {
            storage,
            ring: IoUring::new(RING)?,
            zeroes: AlignedBuf::zeroed(1 << 20),
            pool: BufPool::new(POOL_BYTES),
        })
    }

    pub fn size(&self) -> u64 {
        self.storage.size()
    }

    /// Write every extent of `set` (not yet durable: call `sync`).
    pub fn apply(&mut self, set: &DeltaSet) -> io::Result<()> {
        let size = self.storage.size();
        if let Some(e) = set.extents.iter().find(|e| e.end() > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "set {} writes past the volume's end ({} > {size})",
                    set.set,
                    e.end()
                ),
            ));
        }
        let mut pending: Vec<Pending> = Vec::new();
        let mut runs = Vec::new();
        if self.storage.direct_io() {
            // Direct I/O: whole blocks from aligned memory (see `plan_direct`), written through
            // the ring without the page cache.
            let (plans, zeroes) = plan_direct(&set.extents, self.storage.alignment());
            runs = fill_runs(&self.storage, &mut self.pool, plans)?;
            pending.extend(
                zeroes
                    .into_iter()
                    .map(|(o, len)| Pending::new(o, None, len)),
            );
            pending.extend(runs.iter().map(|r| {
                let data = r.buf.as_slice();
                Pending::new(r.start, Some(data), data.len() as u64)
            }));
        } else {
            // Buffered writes submitted to io_uring are handed to kernel worker threads, which
            // then queue on the file's inode lock: for 4 KiB extents that took more CPU than
            // the copies themselves (half of both cores in a random-write benchmark). A page-
            // cache copy from this thread is cheaper. The extents of a set never overlap, so
            // the order between these and the zeroing below does not matter.
            for e in &set.extents {
                match &e.payload {
                    Payload::Data(d) => self.storage.write_buffered(e.offset, d)?,
                    Payload::Zero(n) => pending.push(Pending::new(e.offset, None, *n as u64)),
                }
            }
        }
        let mut queue: Vec<usize> = (0..pending.len()).rev().collect();
        let mut inflight = 0usize;
        // The first error: nothing more is submitted, but every operation in flight is reaped
        // before this returns (the kernel writes from the set's buffers and the pool's until
        // then).
        let mut failed: Option<io::Error> = None;
        while (failed.is_none() && !queue.is_empty()) || inflight > 0 {
            while failed.is_none() && inflight < RING as usize {
                let Some(i) = queue.pop() else { break };
                match self.storage.prepare(self.op_for(&pending[i])) {
                    Prepared::Submit(e) => {
                        // SAFETY: the set's buffers and the zero buffer outlive this call,
                        // which reaps every completion before returning.
                        unsafe {
                            while self
                                .ring
                                .submission()
                                .push(&e.clone().user_data(i as u64))
                                .is_err()
                            {
                                if let Err(e) = submit_retrying(&self.ring) {
                                    failed = Some(e);
                                    break;
                                }
                            }
                        }
                        if failed.is_some() {
                            break;
                        }
                        inflight += 1;
                    }
                    Prepared::Done(res) => match progress(&mut pending[i], res) {
                        Ok(Some(true)) => queue.push(i),
                        Ok(_) => {}
                        Err(e) => failed = Some(e),
                    },
                }
            }
            if inflight == 0 {
                continue;
            }
            if let Err(e) = wait_retrying(&self.ring) {
                // The ring itself failing: nothing more can be reaped, and the buffers may
                // still be the kernel's. Never seen; not survivable in this process: the redo
                // log replays what was not applied at the next start.
                tracing::error!(
                    "the applier's io_uring failed with operations in flight: {e}; stopping"
                );
                std::process::abort();
            }
            let done: Vec<(usize, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (i, res) in done {
                inflight -= 1;
                match progress(&mut pending[i], res) {
                    Ok(Some(true)) if failed.is_none() => queue.push(i),
                    Ok(_) => {}
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = failed {
            for r in runs {
                if let RunBuf::Copied(buf) = r.buf {
                    self.pool.put(buf);
                }
            }
            return Err(e);
        }
        drop(pending);
        for r in runs {
            if let RunBuf::Copied(buf) = r.buf {
                self.pool.put(buf);
            }
        }
        Ok(())
    }

    fn op_for(&self, p: &Pending) -> DiskOp {
        let offset = p.offset + p.done;
        let left = p.len - p.done;
        match p.data {
            Some(d) => DiskOp::Write {
                offset,
                buf: d[p.done as usize..].as_ptr(),
                len: left as u32,
                fua: false,
            },
            None if p.fill => DiskOp::Write {
                offset,
                buf: self.zeroes.as_ptr(),
                len: left.min(self.zeroes.len() as u64) as u32,
                fua: false,
            },
            None => DiskOp::Zero {
                offset,
                len: left as u32,
                punch: true,
            },
        }
    }

    /// Make everything applied so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        match self.storage.prepare(DiskOp::Sync) {
            Prepared::Done(r) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            Prepared::Done(_) => Ok(()),
            Prepared::Submit(e) => {
                // SAFETY: a sync names no buffer; it is reaped before this returns.
                unsafe {
                    while self
                        .ring
                        .submission()
                        .push(&e.clone().user_data(u64::MAX))
                        .is_err()
                    {
                        self.ring.submit()?;
                    }
                }
                wait_retrying(&self.ring)?;
                let res = self.ring.completion().next().map_or(0, |c| c.result());
                if res < 0 {
                    return Err(io::Error::from_raw_os_error(-res));
                }
                Ok(())
            }
        }
    }
}

/// Submit, again when a signal interrupts (a stopped and continued process, a profiler).
fn submit_retrying(ring: &IoUring) -> io::Result<()> {
    loop {
        match ring.submit() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(drop),
        }
    }
}

/// Wait for a completion, again when a signal interrupts the wait: an early return with
/// operations in flight would free buffers the kernel still writes from.
fn wait_retrying(ring: &IoUring) -> io::Result<()> {
    loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The completion queue is full: what is there is reaped by the caller.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
            other => return other.map(drop),
        }
    }
}

/// Extents sharing blocks, rewritten as whole blocks for direct I/O.
struct AlignedRun<'a> {
    start: u64,
    buf: RunBuf<'a>,
}

enum RunBuf<'a> {
    /// The set's own data, already aligned where it arrived (see `frame`'s raw aligned
    /// extents): written from there.
    AsIs(&'a [u8]),
    /// Copied into aligned memory from the pool.
    Copied(AlignedBuf),
}

impl RunBuf<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            RunBuf::AsIs(d) => d,
            RunBuf::Copied(b) => b,
        }
    }
}

/// Part of an extent headed for an aligned run: its bytes, or zeroes.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Piece<'a> {
    offset: u64,
    len: u64,
    data: Option<&'a [u8]>,
}

/// Whole blocks `start..end` to be written from memory, and the pieces that fill them.
#[derive(Debug, PartialEq)]
struct RunPlan<'a> {
    start: u64,
    end: u64,
    pieces: Vec<Piece<'a>>,
}

/// How a set goes to a direct-I/O volume: runs of whole blocks written from aligned memory,
/// and block-aligned ranges to zero in place.
///
/// Data extents become pieces of runs. A zero extent keeps its whole blocks as a zero-range
/// operation, and only its partial edge blocks become pieces, so a huge unaligned
/// WRITE_ZEROES costs two blocks of memory, not its length. Pieces sharing a block
/// (unaligned client writes, which never overlap within a set) share a run, so one block is
/// never written twice at once.
fn plan_direct(extents: &[Extent], align: u64) -> (Vec<RunPlan<'_>>, Vec<(u64, u64)>) {
    let mut pieces = Vec::new();
    let mut zeroes = Vec::new();
    for e in extents {
        match &e.payload {
            Payload::Data(d) => pieces.push(Piece {
                offset: e.offset,
                len: e.len(),
                data: Some(d),
            }),
            Payload::Zero(_) => {
                let (mid_start, mid_end) =
                    (e.offset.next_multiple_of(align), e.end() / align * align);
                if mid_start >= mid_end {
                    pieces.push(Piece {
                        offset: e.offset,
                        len: e.len(),
                        data: None,
                    });
                    continue;
                }
                if e.offset < mid_start {
                    pieces.push(Piece {
                        offset: e.offset,
                        len: mid_start - e.offset,
                        data: None,
                    });
                }
                zeroes.push((mid_start, mid_end - mid_start));
                if mid_end < e.end() {
                    pieces.push(Piece {
                        offset: mid_end,
                        len: e.end() - mid_end,
                        data: None,
                    });
                }
            }
        }
    }
    let mut runs: Vec<RunPlan> = Vec::new();
    for p in pieces {
        let (start, end) = aligned_span(p.offset, p.len, align);
        match runs.last_mut() {
            Some(r) if start < r.end => {
                r.end = r.end.max(end);
                r.pieces.push(p);
            }
            _ => runs.push(RunPlan {
                start,
                end,
                pieces: vec![p],
            }),
        }
    }
    (runs, zeroes)
}

/// Fills the planned runs from the set's data, reading first the runs the pieces do not fill.
fn fill_runs<'a>(
    storage: &FileStorage,
    pool: &mut BufPool,
    plans: Vec<RunPlan<'a>>,
) -> io::Result<Vec<AlignedRun<'a>>> {
    let mut runs = Vec::with_capacity(plans.len());
    for plan in plans {
        // One piece of data that is the whole run, in memory the disk takes as it is: no copy.
        if let [Piece {
            offset,
            data: Some(d),
            ..
        }] = plan.pieces[..]
        {
            if offset == plan.start && storage.takes_as_is(offset, d) {
                runs.push(AlignedRun {
                    start: plan.start,
                    buf: RunBuf::AsIs(d),
                });
                continue;
            }
        }
        let len = usize::try_from(plan.end - plan.start).expect("a run fits in memory");
        let mut buf = pool.get(len);
        let filled: u64 = plan.pieces.iter().map(|p| p.len).sum();
        if filled < plan.end - plan.start {
            storage.read_sync(plan.start, &mut buf[..])?;
        }
        for p in plan.pieces {
            let at = (p.offset - plan.start) as usize;
            let dst = &mut buf[at..at + p.len as usize];
            match p.data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        }
        runs.push(AlignedRun {
            start: plan.start,
            buf: RunBuf::Copied(buf),
        });
    }
    Ok(runs)
}

/// Account one completion; Some(true) = submit the rest again.
fn progress(p: &mut Pending, res: i32) -> io::Result<Option<bool>> {
    if res < 0 {
        let errno = -res;
        if p.data.is_none() && !p.fill && (errno == libc::EOPNOTSUPP || errno == libc::EINVAL) {
            p.fill = true;
            return Ok(Some(true));
        }
        return Err(io::Error::from_raw_os_error(errno));
    }
    if p.data.is_none() && !p.fill {
        p.done = p.len; // fallocate reports 0 on success
    } else if res == 0 {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "disk accepted no bytes",
        ));
    } else {
        p.done += res as u64;
    }
    Ok(Some(p.done < p.len))
}

/// Decode a redo entry back into its set.
pub fn decode_set(raw: &[u8]) -> io::Result<DeltaSet> {
    match frame::decode_one(raw) {
        Ok(Some((Message::Set(s), _))) => Ok(s),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "redo entry is not a delta set",
        )),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("redo entry: {e}"),
        )),
    }
}

#[derive(Debug, Serialize)]
pub struct RecoverReport {
    pub volume: String,
    pub replayed_sets: usize,
    pub applied_set: u64,
    pub applied_seq: u64,
    pub consistent: bool,
    /// Sets of a resync staged but not complete: kept in the redo log, not applied (the
    /// volume stays at its consistent state; a running mirror completes the resync).
    pub staged_sets: u64,
    /// `--set`/`--at`: the history's point the volume was brought back to.
    pub restored_to_set: Option<u64>,
    pub restored_to_time: Option<String>,
}

/// The set a redo entry holds, checked against the number the log filed it under.
pub fn decode_entry(set_no: u64, raw: &[u8]) -> io::Result<DeltaSet> {
    let set = decode_set(raw)?;
    if set.set != set_no {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("redo entry {set_no} holds set {}", set.set),
        ));
    }
    Ok(set)
}

/// Apply the entries of the redo `segments` with set numbers in `(after, through]` (the sets
/// of a staged resync, read back), in order, calling `applied` after each. Every one of them
/// must be there: a gap would apply a later set over a missing one.
pub fn apply_from_redo(
    fs: &crate::env::Fs,
    segments: &[(std::path::PathBuf, u64)],
    after: u64,
    through: u64,
    target: &mut dyn ApplyTarget,
    mut applied: impl FnMut(&DeltaSet),
) -> io::Result<()> {
    let mut next = after + 1;
    super::redo::read_entries(fs, segments, after, through, |n, raw| {
        let set = decode_entry(n, raw)?;
        if set.set != next {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the redo log holds set {} where set {next} was due",
                    set.set
                ),
            ));
        }
        target.apply(&set)?;
        applied(&set);
        next += 1;
        Ok(())
    })?;
    if next <= through {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the redo log ends before staged set {next} (of {through})"),
        ));
    }
    Ok(())
}

/// What a replay did: sets applied, and the resync it found staged but not complete (its
/// sets stay in the redo log; the mirror continues it).
#[derive(Debug, Default)]
pub struct Replayed {
    pub sets: usize,
    pub staged: Option<Staging>,
}

/// Replay `redo` into the volume past `state.applied_set`, sync, persist the state, trim.
/// Sets of a staged resync are applied only up to its last complete stage (two passes: find
/// where the last consistent state is, then apply up to it), so the volume ends at a prefix
/// state whatever the crash interrupted.
pub fn replay(
    applier: &mut dyn ApplyTarget,
    redo: &mut RedoLog,
    state: &mut VolumeState,
    fs: &dyn FileSystem,
    state_path: &Path,
) -> io::Result<Replayed> {
    redo.continue_from(state.applied_set)?;
    // Pass 1: the last set after which the volume is consistent (or not staged).
    let mut stager = Stager::default();
    let mut scratch = state.clone();
    let mut apply_through = state.applied_set;
    redo.for_each_after(state.applied_set, u64::MAX, |set_no, raw| {
        let set = decode_entry(set_no, raw)?;
        match stager.step(&scratch, &set) {
            Step::Apply => {
                scratch.advance(&set);
                apply_through = set.set;
            }
            Step::Stage => {}
            Step::Commit { state, .. } => {
                scratch = *state;
                apply_through = set.set;
            }
        }
        Ok(())
    })?;
    // Pass 2: apply up to there.
    let mut n = 0;
    redo.for_each_after(state.applied_set, apply_through, |set_no, raw| {
        let set = decode_entry(set_no, raw)?;
        applier.apply(&set)?;
        state.advance(&set);
        n += 1;
        Ok(())
    })?;
    if n > 0 {
        applier.sync()?;
        // Sealed again: the replay's own writes moved the disk's change time.
        if state.identity.fingerprint.is_some() {
            state.identity.fingerprint = Some(applier.fingerprint()?);
        }
        state.save(fs, state_path)?;
    }
    redo.trim(state.applied_set)?;
    if let Some(s) = &stager.staging {
        tracing::info!(
            first_set = s.first,
            staged_through = s.shadow.applied_set,
            "a staged resync is incomplete: the volume stays at its last consistent state"
        );
    }
    Ok(Replayed {
        sets: n,
        staged: stager.staging,
    })
}

/// `blkmirror recover`: offline, bring each volume to the last durable set.
/// What `recover` brings each volume to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoverTo {
    /// The last consistent state the redo log holds.
    Latest,
    /// The history's point at this set.
    Set(u64),
    /// The history's newest point at or before this time (Unix milliseconds, the mirror's
    /// clock).
    At(u64),
}

pub fn recover(
    volumes: &[VolumeSpec],
    state_dir: &Path,
    to: RecoverTo,
) -> io::Result<Vec<RecoverReport>> {
    let fs: Fs = crate::env::os();
    let mut reports = Vec::new();
    for spec in volumes {
        // Direct I/O: through the page cache, each small write cost more CPU in ext4 than the
        // copy itself (large folios), and fsync then paid for the writeback.
        let storage = FileStorage::open(spec, IoMode::Direct).map_err(io::Error::other)?;
        let mut applier = Applier::new(storage)?;
        let state_path = VolumeState::path(state_dir, &spec.name);
        let mut state = VolumeState::load(&*fs, &state_path)?;
        let mut redo = RedoLog::open(&fs, &redo_dir(state_dir, &spec.name))?;
        // A history kept by the mirror gets the before-images of what the replay writes.
        let history_dir = crate::repl::history::Keeper::dir(state_dir, &spec.name);
        let mut history = if fs.read_dir(&history_dir).is_ok_and(|d| !d.is_empty()) {
            Some(crate::repl::history::History::open(
                fs.clone(),
                &history_dir,
            )?)
        } else {
            None
        };
        let replayed = match history.as_mut() {
            Some(h) => {
                let mut target = crate::repl::history::WithHistory {
                    target: &mut applier,
                    history: h,
                };
                replay(&mut target, &mut redo, &mut state, &*fs, &state_path)?
            }
            None => replay(&mut applier, &mut redo, &mut state, &*fs, &state_path)?,
        };
        let mut restored_to = None;
        if to != RecoverTo::Latest {
            let Some(h) = history.as_mut() else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "volume {}: no history in {} (the mirror keeps one with --history)",
                        spec.name,
                        history_dir.display()
                    ),
                ));
            };
            let point = match to {
                RecoverTo::Set(n) => h.points().iter().find(|p| p.set == n).copied(),
                RecoverTo::At(t) => h.point_at(t),
                RecoverTo::Latest => unreachable!(),
            };
            let Some(point) = point else {
                let (first, last) = (h.points().first(), h.points().last());
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "volume {}: no such point in its history (it holds sets {} to {}, \
                         from {} to {}; see `blkmirror history`)",
                        spec.name,
                        first.map_or(0, |p| p.set),
                        last.map_or(0, |p| p.set),
                        first
                            .and_then(|p| super::mirror::fmt_time(p.time_ms))
                            .unwrap_or_default(),
                        last.and_then(|p| super::mirror::fmt_time(p.time_ms))
                            .unwrap_or_default(),
                    ),
                ));
            };
            restore_point(
                &mut applier,
                h,
                &mut redo,
                &mut state,
                point,
                &*fs,
                &state_path,
            )?;
            restored_to = Some(point);
        }
        reports.push(RecoverReport {
            volume: spec.name.clone(),
            replayed_sets: replayed.sets,
            applied_set: state.applied_set,
            applied_seq: state.applied_seq,
            consistent: state.consistent(),
            staged_sets: replayed
                .staged
                .map_or(0, |s| s.shadow.applied_set + 1 - s.first),
            restored_to_set: restored_to.map(|p| p.set),
            restored_to_time: restored_to.and_then(|p| super::mirror::fmt_time(p.time_ms)),
        });
    }
    Ok(reports)
}

/// Bring the volume back to `point` of its history (offline). In an order a crash cannot make
/// wrong: the old blocks written and synced; the state saved at the point (with the disk's
/// new change time sealed); the redo log's later sets dropped (until then a restart would
/// replay them: the volume would be at the later, also consistent, state); the history's
/// later records dropped.
fn restore_point(
    applier: &mut Applier,
    history: &mut crate::repl::history::History,
    redo: &mut RedoLog,
    state: &mut VolumeState,
    point: crate::repl::history::Point,
    fs: &dyn FileSystem,
    state_path: &Path,
) -> io::Result<()> {
    let mut extents = Vec::new();
    history.restore_writes(point.set, &mut |offset, data| {
        extents.push(crate::extent::Extent {
            offset,
            payload: crate::extent::Payload::Data(bytes::Bytes::copy_from_slice(data)),
        });
        Ok(())
    })?;
    // Newest record first: written one by one in that order, the oldest content wins.
    for e in extents {
        applier.apply(&DeltaSet {
            set: point.set,
            first_seq: point.seq,
            last_seq: point.seq,
            newest_write_ms: 0,
            kind: SetKind::Repair,
            extents: vec![e],
        })?;
    }
    applier.sync()?;
    state.applied_set = point.set;
    state.applied_seq = point.seq;
    state.consistent_after_seq = point.seq;
    state.copy = CopyState::Done;
    state.position_gen = Some(crate::repl::identity::GenId(point.gen));
    state.volume_changed = None;
    // The newest write it holds is not known any more; it arrived no later than the point.
    state.newest_write_ms = 0;
    state.newest_received_ms = point.time_ms;
    state.identity.fingerprint = Some(applier.fingerprint()?);
    state.save(fs, state_path)?;
    redo.discard_after(point.set)?;
    history.forget_after(point.set)
}

pub fn redo_dir(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join("redo").join(volume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;
    use bytes::Bytes;
    use std::os::unix::fs::FileExt;

    const SIZE: u64 = 1 << 20;

    fn volume(dir: &Path, name: &str, mode: IoMode) -> (PathBuf, Applier) {
        let path = dir.join(name);
        let base: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &base).unwrap();
        let spec = VolumeSpec {
            name: name.into(),
            path: path.clone(),
            size: None,
            read_only: false,
        };
        let storage = FileStorage::open(&spec, mode).unwrap();
        (path, Applier::new(storage).unwrap())
    }

    fn data(offset: u64, len: usize, seed: u8) -> Extent {
        Extent {
            offset,
            payload: Payload::Data(Bytes::from(
                (0..len).map(|i| seed ^ (i as u8)).collect::<Vec<_>>(),
            )),
        }
    }

    fn zero(offset: u64, len: u32) -> Extent {
        Extent {
            offset,
            payload: Payload::Zero(len),
        }
    }

    /// A huge unaligned WRITE_ZEROES costs its two edge blocks of memory; its whole blocks are
    /// zeroed in place. Pieces sharing a block share one run.
    #[test]
    fn direct_plan_keeps_memory_to_edge_blocks() {
        let extents = vec![
            data(100, 200, 1),
            zero(300, (1 << 30) + 7),
            data((1 << 30) + 307, 10, 2),
        ];
        let (runs, zeroes) = plan_direct(&extents, 4096);
        assert_eq!(zeroes, vec![(4096, (1 << 30) - 4096)]);
        let spans: Vec<(u64, u64, usize)> = runs
            .iter()
            .map(|r| (r.start, r.end, r.pieces.len()))
            .collect();
        assert_eq!(spans, vec![(0, 4096, 2), (1 << 30, (1 << 30) + 4096, 2)]);
        let memory: u64 = runs.iter().map(|r| r.end - r.start).sum();
        assert_eq!(memory, 8192);
    }

    /// Whole blocks of data in memory aligned for direct I/O (a raw aligned extent as received)
    /// are written from where they are; the same bytes misaligned in memory are copied first.
    /// Either way the volume ends up with them.
    #[test]
    fn aligned_data_is_written_as_it_is() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&root).unwrap();
        let dir = tempfile::tempdir_in(&root).unwrap();
        let (path, mut applier) = volume(dir.path(), "v", IoMode::Direct);
        // One aligned buffer holding two copies of 64 KiB: at +0 (aligned), at +8193 (not).
        let n = 64 << 10;
        let mut buf = AlignedBuf::zeroed(2 * n + 16384);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        let frame = Bytes::from_owner(crate::disk::buf::PooledBuf::from(buf));
        let aligned = frame.slice(0..n);
        let misaligned = frame.slice(8193..8193 + n);
        let extents = vec![
            Extent {
                offset: 0,
                payload: Payload::Data(aligned.clone()),
            },
            Extent {
                offset: 4 * n as u64,
                payload: Payload::Data(misaligned.clone()),
            },
        ];
        let (plans, _) = plan_direct(&extents, applier.storage.alignment());
        let runs = fill_runs(&applier.storage, &mut applier.pool, plans).unwrap();
        assert!(matches!(runs[0].buf, RunBuf::AsIs(d) if d.as_ptr() == aligned.as_ptr()));
        assert!(matches!(runs[1].buf, RunBuf::Copied(_)));
        drop(runs);
        let set = DeltaSet {
            set: 1,
            first_seq: 1,
            last_seq: 2,
            newest_write_ms: 0,
            kind: SetKind::Journal,
            extents,
        };
        applier.apply(&set).unwrap();
        applier.sync().unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut got = vec![0u8; n];
        file.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, aligned.to_vec());
        file.read_exact_at(&mut got, 4 * n as u64).unwrap();
        assert_eq!(got, misaligned.to_vec());
    }

    /// Unaligned extents sharing blocks, a partial block with a gap, unaligned and aligned
    /// zeroes: direct I/O (whole-block runs) and buffered I/O leave the same bytes, and both
    /// equal the extents laid over the old content.
    #[test]
    fn direct_and_buffered_apply_agree_on_unaligned_extents() {
        // On the crate's own target directory: /tmp may be a tmpfs, which refuses O_DIRECT.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&root).unwrap();
        let dir = tempfile::tempdir_in(&root).unwrap();
        let extents = vec![
            data(100, 200, 1),
            data(300, 4700, 2),
            data(8192, 4096, 3),
            zero(13_000, 100),
            zero(16_384, 4096),
            data(20_490, 10, 4),
            data(20_500, 5000, 5),
            zero(40_000, 9000),
            data(SIZE - 4096 - 7, 4096 + 7, 6),
        ];
        let set = DeltaSet {
            set: 1,
            first_seq: 1,
            last_seq: 9,
            newest_write_ms: 0,
            kind: SetKind::Journal,
            extents,
        };
        let mut expected: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        for e in &set.extents {
            let range = e.offset as usize..e.end() as usize;
            match &e.payload {
                Payload::Data(d) => expected[range].copy_from_slice(d),
                Payload::Zero(_) => expected[range].fill(0),
            }
        }
        let (direct_path, mut direct) = volume(dir.path(), "direct", IoMode::Direct);
        assert!(
            direct.storage.direct_io(),
            "the test directory must take O_DIRECT"
        );
        let (buffered_path, mut buffered) = volume(dir.path(), "buffered", IoMode::Buffered);
        for applier in [&mut direct, &mut buffered] {
            applier.apply(&set).unwrap();
            applier.sync().unwrap();
        }
        for path in [direct_path, buffered_path] {
            let mut got = vec![0u8; SIZE as usize];
            std::fs::File::open(&path)
                .unwrap()
                .read_exact_at(&mut got, 0)
                .unwrap();
            if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
                panic!(
                    "{}: byte {i} is {} not {}",
                    path.display(),
                    got[i],
                    expected[i]
                );
            }
        }
    }
}
