//! The mirror's side of a volume at rest: its persisted state, applying delta sets in place
//! through io_uring, and `recover` (replay the redo log after a crash).

use super::fold::{Extent, Payload};
use super::frame::{self, DeltaSet, Message, SetKind};
use super::redo::{sync_dir, RedoLog};
use crate::disk::buf::{AlignedBuf, BufPool};
use crate::disk::file::{FileStorage, IoMode};
use crate::disk::ranges::aligned_span;
use crate::disk::spec::VolumeSpec;
use crate::disk::{DiskOp, Prepared, Storage};
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

/// What the mirror remembers of a volume between runs (`STATE/volumes/NAME.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    pub applied_set: u64,
    pub applied_seq: u64,
    pub copy: CopyState,
    /// The volume is consistent once journal sets up to this sequence number are applied
    /// after the full copy (the copy read blocks that were newer than the sets before it).
    pub consistent_after_seq: u64,
}

impl VolumeState {
    pub fn path(state_dir: &Path, volume: &str) -> PathBuf {
        state_dir.join("volumes").join(format!("{volume}.json"))
    }

    pub fn load(path: &Path) -> io::Result<VolumeState> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(VolumeState::default()),
            Err(e) => Err(e),
        }
    }

    /// Write atomically: temp file, fsync, rename, fsync the directory.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().expect("state file has a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let f = std::fs::File::create(&tmp)?;
        serde_json::to_writer_pretty(&f, self).map_err(io::Error::other)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    }

    pub fn consistent(&self) -> bool {
        self.copy == CopyState::Done && self.applied_seq >= self.consistent_after_seq
    }

    /// The state after `set` is applied.
    pub fn advance(&mut self, set: &DeltaSet) {
        self.applied_set = set.set;
        match set.kind {
            SetKind::Journal => self.applied_seq = self.applied_seq.max(set.last_seq),
            SetKind::Copy { done } => {
                if done {
                    self.copy = CopyState::Done;
                    self.consistent_after_seq = set.last_seq;
                } else {
                    self.copy = CopyState::Running;
                }
            }
        }
    }
}

const RING: u32 = 256;

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
        // Direct I/O: block-aligned copies of the data (see `aligned_runs`), written through
        // the ring without the page cache.
        let runs = if self.storage.direct_io() {
            aligned_runs(&self.storage, &mut self.pool, &set.extents)?
        } else {
            Vec::new()
        };
        let mut extents: Vec<&Extent> = set.extents.iter().collect();
        if self.storage.direct_io() {
            let align = self.storage.alignment();
            extents.retain(|e| is_aligned_zero(e, align));
        } else {
            // Buffered writes submitted to io_uring are handed to kernel worker threads, which
            // then queue on the file's inode lock: for 4 KiB extents that took more CPU than
            // the copies themselves (half of both cores in a random-write benchmark). A page-
            // cache copy from this thread is cheaper. The extents of a set never overlap, so
            // the order between these and the zeroing below does not matter.
            for e in &set.extents {
                if let Payload::Data(d) = &e.payload {
                    self.storage.write_buffered(e.offset, d)?;
                }
            }
            extents.retain(|e| matches!(e.payload, Payload::Zero(_)));
        }
        let mut pending: Vec<Pending> = extents.into_iter().map(pending_of).collect();
        pending.extend(runs.iter().map(|r| Pending {
            offset: r.start,
            data: Some(&r.buf[..]),
            len: r.buf.len() as u64,
            done: 0,
            fill: false,
        }));
        let mut queue: Vec<usize> = (0..pending.len()).rev().collect();
        let mut inflight = 0usize;
        while !queue.is_empty() || inflight > 0 {
            while inflight < RING as usize {
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
                                self.ring.submit()?;
                            }
                        }
                        inflight += 1;
                    }
                    Prepared::Done(res) => {
                        if let Some(again) = progress(&mut pending[i], res)? {
                            if again {
                                queue.push(i);
                            }
                        }
                    }
                }
            }
            if inflight == 0 {
                continue;
            }
            self.ring.submit_and_wait(1)?;
            let done: Vec<(usize, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (i, res) in done {
                inflight -= 1;
                if progress(&mut pending[i], res)? == Some(true) {
                    queue.push(i);
                }
            }
        }
        drop(pending);
        for r in runs {
            self.pool.put(r.buf);
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
                self.ring.submit_and_wait(1)?;
                let res = self.ring.completion().next().map_or(0, |c| c.result());
                if res < 0 {
                    return Err(io::Error::from_raw_os_error(-res));
                }
                Ok(())
            }
        }
    }
}

/// Extents sharing blocks, rewritten as whole blocks for direct I/O.
struct AlignedRun {
    start: u64,
    buf: AlignedBuf,
}

/// A zero extent on block boundaries: a zero-range operation even on direct I/O.
fn is_aligned_zero(e: &Extent, align: u64) -> bool {
    matches!(e.payload, Payload::Zero(_))
        && aligned_span(e.offset, e.len(), align) == (e.offset, e.end())
}

/// Direct I/O takes whole blocks from aligned memory. Every extent except block-aligned zero
/// ranges (which stay zero-range operations) is copied into runs of whole blocks; extents
/// sharing a block (unaligned client writes, which never overlap within a set) share a run,
/// so one block is never written twice at once. A run its extents do not fill is read first.
fn aligned_runs(
    storage: &FileStorage,
    pool: &mut BufPool,
    extents: &[Extent],
) -> io::Result<Vec<AlignedRun>> {
    let align = storage.alignment();
    let mut groups: Vec<(u64, u64, Vec<&Extent>)> = Vec::new();
    for e in extents {
        if is_aligned_zero(e, align) {
            continue;
        }
        let (start, end) = aligned_span(e.offset, e.len(), align);
        match groups.last_mut() {
            Some((_, g_end, members)) if start < *g_end => {
                *g_end = (*g_end).max(end);
                members.push(e);
            }
            _ => groups.push((start, end, vec![e])),
        }
    }
    let mut runs = Vec::with_capacity(groups.len());
    for (start, end, members) in groups {
        let len = usize::try_from(end - start).expect("a run fits in memory");
        let mut buf = pool.get(len);
        let filled: u64 = members.iter().map(|e| e.len()).sum();
        if filled < end - start {
            storage.read_sync(start, &mut buf[..])?;
        }
        for e in members {
            let at = (e.offset - start) as usize;
            let dst = &mut buf[at..at + e.len() as usize];
            match &e.payload {
                Payload::Data(d) => dst.copy_from_slice(d),
                Payload::Zero(_) => dst.fill(0),
            }
        }
        runs.push(AlignedRun { start, buf });
    }
    Ok(runs)
}

fn pending_of(e: &Extent) -> Pending<'_> {
    match &e.payload {
        Payload::Data(d) => Pending {
            offset: e.offset,
            data: Some(d),
            len: d.len() as u64,
            done: 0,
            fill: false,
        },
        Payload::Zero(n) => Pending {
            offset: e.offset,
            data: None,
            len: *n as u64,
            done: 0,
            fill: false,
        },
    }
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
}

/// Replay `redo` into the volume past `state.applied_set`, sync, persist the state, trim.
pub fn replay(
    applier: &mut Applier,
    redo: &mut RedoLog,
    state: &mut VolumeState,
    state_path: &Path,
) -> io::Result<usize> {
    let entries = redo.read_after(state.applied_set)?;
    let n = entries.len();
    for (set_no, raw) in entries {
        let set = decode_set(&raw)?;
        if set.set != set_no {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("redo entry {set_no} holds set {}", set.set),
            ));
        }
        applier.apply(&set)?;
        state.advance(&set);
    }
    if n > 0 {
        applier.sync()?;
        state.save(state_path)?;
    }
    redo.trim(state.applied_set)?;
    Ok(n)
}

/// `blkmirror recover`: offline, bring each volume to the last durable set.
pub fn recover(volumes: &[VolumeSpec], state_dir: &Path) -> io::Result<Vec<RecoverReport>> {
    let mut reports = Vec::new();
    for spec in volumes {
        // Direct I/O: through the page cache, each small write cost more CPU in ext4 than the
        // copy itself (large folios), and fsync then paid for the writeback.
        let storage = FileStorage::open(spec, IoMode::Direct).map_err(io::Error::other)?;
        let mut applier = Applier::new(storage)?;
        let state_path = VolumeState::path(state_dir, &spec.name);
        let mut state = VolumeState::load(&state_path)?;
        let mut redo = RedoLog::open(&redo_dir(state_dir, &spec.name))?;
        let replayed = replay(&mut applier, &mut redo, &mut state, &state_path)?;
        reports.push(RecoverReport {
            volume: spec.name.clone(),
            replayed_sets: replayed,
            applied_set: state.applied_set,
            applied_seq: state.applied_seq,
            consistent: state.consistent(),
        });
    }
    Ok(reports)
}

pub fn redo_dir(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join("redo").join(volume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::fold::Extent;
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
