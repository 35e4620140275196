//! The mirror's side of a volume at rest: its persisted state, applying delta sets in place
//! through io_uring, and `recover` (replay the redo log after a crash).

use super::fold::{Extent, Payload};
use super::frame::{self, DeltaSet, Message, SetKind};
use super::redo::{sync_dir, RedoLog};
use crate::disk::buf::AlignedBuf;
use crate::disk::file::{FileStorage, IoMode};
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
}

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
        let mut pending: Vec<Pending> = set.extents.iter().map(pending_of).collect();
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
        let storage = FileStorage::open(spec, IoMode::Buffered).map_err(io::Error::other)?;
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
