//! A simulated disk for the simulator's volumes, with the same crash model as `env::mem`:
//! writes are visible at once and durable after `sync`; at a power cut each block written
//! since the last sync comes back old or new. A process crash loses nothing.

use super::rng::Prng;
use crate::disk::fingerprint::{DiskKind, Fingerprint, Stamp};
use crate::disk::{DiskOp, Prepared, Storage};
use crate::extent::Payload;
use crate::repl::apply::ApplyTarget;
use crate::repl::frame::DeltaSet;
use std::collections::BTreeSet;
use std::io;
use std::sync::Mutex;

/// Granularity of what a power cut keeps of unsynced writes.
const BLOCK: u64 = 4096;

struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    dirty: BTreeSet<u64>,
    /// Writes so far: the disk's "change time".
    changes: u64,
}

/// A disk of `size` bytes; `id` names it (another id is another disk).
pub struct MemDisk {
    id: u64,
    size: u64,
    state: Mutex<State>,
}

impl MemDisk {
    pub fn new(id: u64, size: u64) -> MemDisk {
        MemDisk {
            id,
            size,
            state: Mutex::new(State {
                current: vec![0; size as usize],
                durable: vec![0; size as usize],
                dirty: BTreeSet::new(),
                changes: 0,
            }),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) {
        assert!(
            offset + data.len() as u64 <= self.size,
            "write past the disk's end"
        );
        let mut s = self.state.lock().unwrap();
        s.current[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        if !data.is_empty() {
            let end = offset + data.len() as u64;
            s.dirty.extend(offset / BLOCK..=(end - 1) / BLOCK);
        }
        s.changes += 1;
    }

    /// Change bytes in place, durably, the way rot or a stray write through another path
    /// does: nothing the disk's change time (its fingerprint) shows.
    pub fn rot(&self, offset: u64, data: &[u8]) {
        let mut s = self.state.lock().unwrap();
        let r = offset as usize..offset as usize + data.len();
        s.current[r.clone()].copy_from_slice(data);
        s.durable[r].copy_from_slice(data);
    }

    pub fn zero(&self, offset: u64, len: u64) {
        self.write_at(offset, &vec![0; len as usize]);
    }

    pub fn read_at(&self, offset: u64, out: &mut [u8]) {
        let s = self.state.lock().unwrap();
        out.copy_from_slice(&s.current[offset as usize..offset as usize + out.len()]);
    }

    pub fn sync(&self) {
        let mut s = self.state.lock().unwrap();
        s.durable = s.current.clone();
        s.dirty.clear();
    }

    /// A power cut (see the module doc).
    pub fn crash(&self, rng: &mut Prng) {
        let mut s = self.state.lock().unwrap();
        let mut kept = s.durable.clone();
        for &b in &s.dirty {
            if rng.chance(1, 2) {
                let (a, z) = (
                    (b * BLOCK) as usize,
                    ((b + 1) * BLOCK).min(self.size) as usize,
                );
                kept[a..z].copy_from_slice(&s.current[a..z]);
            }
        }
        s.current = kept.clone();
        s.durable = kept;
        s.dirty.clear();
    }

    pub fn content(&self) -> Vec<u8> {
        self.state.lock().unwrap().current.clone()
    }

    /// Fill with `data` (a disk that arrives pre-seeded), durably.
    pub fn fill(&self, data: &[u8]) {
        let mut s = self.state.lock().unwrap();
        s.current.copy_from_slice(data);
        s.durable.copy_from_slice(data);
        s.changes += 1;
    }

    fn fingerprint_now(&self) -> Fingerprint {
        let s = self.state.lock().unwrap();
        Fingerprint {
            kind: DiskKind::Memory,
            dev: 0,
            ino: self.id,
            born: Some(Stamp { sec: 1, nsec: 0 }),
            serial: None,
            size: self.size,
            ctime: Some(Stamp {
                sec: s.changes as i64,
                nsec: 0,
            }),
        }
    }

    /// Apply one delta set (the mirror's applier, simulated).
    pub fn apply(&self, set: &DeltaSet) {
        for e in &set.extents {
            match &e.payload {
                Payload::Data(d) => self.write_at(e.offset, d),
                Payload::Zero(n) => self.zero(e.offset, u64::from(*n)),
            }
        }
    }
}

impl Storage for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    /// Done on the spot, as a storage that needs no ring would.
    fn prepare(&self, op: DiskOp) -> Prepared {
        let in_range = |o: u64, l: u32| o.checked_add(u64::from(l)).is_some_and(|e| e <= self.size);
        let res = match op {
            DiskOp::Read { offset, buf, len } if in_range(offset, len) => {
                // SAFETY: DiskOp's contract: the caller keeps `buf` valid for `len` bytes until
                // the operation completes, which is before this returns.
                let out = unsafe { std::slice::from_raw_parts_mut(buf, len as usize) };
                self.read_at(offset, out);
                len as i32
            }
            DiskOp::Write {
                offset, buf, len, ..
            } if in_range(offset, len) => {
                // SAFETY: as for reads.
                let data = unsafe { std::slice::from_raw_parts(buf, len as usize) };
                self.write_at(offset, data);
                len as i32
            }
            DiskOp::Discard { offset, len } | DiskOp::Zero { offset, len, .. }
                if in_range(offset, len) =>
            {
                self.zero(offset, u64::from(len));
                0
            }
            DiskOp::Sync => {
                self.sync();
                0
            }
            _ => -libc::EINVAL,
        };
        Prepared::Done(res)
    }

    fn discard_reads_zero(&self) -> bool {
        true
    }

    fn alignment(&self) -> u64 {
        1
    }

    fn sync_durable(&self) -> io::Result<()> {
        self.sync();
        Ok(())
    }

    fn read_sync(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_at(offset, out);
        Ok(())
    }

    fn allocation(&self, _offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        Ok(vec![(len, false)])
    }

    fn fingerprint(&self) -> io::Result<Fingerprint> {
        Ok(self.fingerprint_now())
    }
}

/// The mirror's applier over a simulated disk.
pub struct MemApplier<'a>(pub &'a MemDisk);

impl ApplyTarget for MemApplier<'_> {
    fn apply(&mut self, set: &DeltaSet) -> io::Result<()> {
        if let Some(e) = set.extents.iter().find(|e| e.end() > self.0.size) {
            return Err(io::Error::other(format!(
                "write past the end at {}",
                e.offset
            )));
        }
        self.0.apply(set);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync();
        Ok(())
    }

    fn read(&mut self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, out);
        Ok(())
    }

    fn fingerprint(&self) -> io::Result<Fingerprint> {
        Ok(self.0.fingerprint_now())
    }

    fn holds_data(&self) -> io::Result<bool> {
        Ok(self.0.content().iter().any(|&b| b != 0))
    }
}
