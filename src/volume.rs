//! A volume as every front end and the shipper share it: its disk, its journal (when
//! replicated), and the locks on block ranges held by changes in flight.
//!
//! The write path every front end follows (NBD's connection loop today, ublk later), around the
//! disk operations it performs itself:
//! 1. [`Volume::admit`] before the first disk operation of a write, WRITE_ZEROES or TRIM: the
//!    change's blocks are locked (changes sharing a block go one at a time: a read-modify-write
//!    cannot undo a neighbour's write, and the journal's order is the disk's) and the journal
//!    records an intent. "Not now" (a busy range, a full journal) registers the front end's
//!    waker, which is woken when that changes: no polling.
//! 2. The front end does the disk work.
//! 3. [`Volume::finish`] before the reply: the journal records what the range now holds (or,
//!    when the disk failed or left it undefined, marks it to be re-read), syncs for FUA, and
//!    the blocks are unlocked. Journal order is completion order.
//! 4. A FLUSH: the disk sync, then [`Volume::flush`] (the journal's).
//!
//! Reads for replication (the full copy, the comparison, re-reading ranges the journal could
//! not vouch for) go through [`VolumeRead::read_settled`]: they take the range's lock, so
//! they never see a change that is on the disk but not yet in the journal. A chunk read that
//! way is the volume's state after a prefix of the journal (for that chunk), which is what
//! lets the mirror be exactly a journal prefix once the copy's journal catches up (I1).

use crate::disk::ranges::{aligned_span, RangeGuard, RangeLocks};
use crate::disk::Storage;
use crate::extent::Payload;
use crate::journal::{Intent, Journal};
use crate::wake::Wake;
use std::io;
use std::sync::Arc;

/// A volume: what front ends write through and replication reads.
pub struct Volume {
    pub name: String,
    pub storage: Arc<dyn Storage>,
    /// Present when the volume is replicated: every change is journaled before its reply.
    pub journal: Option<Arc<Journal>>,
    /// Block ranges of changes in flight, across all front ends.
    pub locks: Arc<RangeLocks>,
}

/// A change admitted to the volume: its blocks are locked and the journal knows of it. Give
/// it back with [`Volume::finish`].
#[derive(Debug)]
pub struct Change {
    guard: RangeGuard,
    intent: Option<Intent>,
    offset: u64,
}

/// How a change ended on the disk.
#[derive(Debug)]
pub enum Ended {
    /// Done: the range now holds this (the written data, or zeroes).
    Done(Payload),
    /// The disk failed, or left the range in a state the change does not describe (a TRIM on a
    /// device whose discarded blocks read back as anything): it is re-read and shipped.
    Unknown,
}

impl Volume {
    /// The same volume's parts (to build one with a journal added).
    pub fn clone_parts(v: &Volume) -> Volume {
        Volume {
            name: v.name.clone(),
            storage: v.storage.clone(),
            journal: v.journal.clone(),
            locks: v.locks.clone(),
        }
    }

    /// Admit a change of `len` bytes at `offset` whose disk operations cover `span` (the range
    /// widened to whole blocks); `holder` names the holder uniquely among the volume's front
    /// ends. `Ok(None)`: not now; `waker` is woken when it may be.
    pub fn admit(
        &self,
        offset: u64,
        len: u32,
        carries_data: bool,
        span: (u64, u64),
        holder: u64,
        waker: &Arc<dyn Wake>,
    ) -> io::Result<Option<Change>> {
        let Some(guard) = self.locks.try_lock_or_wait(span.0, span.1, holder, waker) else {
            return Ok(None);
        };
        let intent = match &self.journal {
            None => None,
            // The journal hears of every change before the disk does: a crash in between
            // leaves an intent that makes the range be re-read and shipped again.
            Some(j) => match j.begin_or_wait(offset, len, carries_data, Some(waker)) {
                Ok(Some(i)) => Some(i),
                other => {
                    // Full (or failed): let others have the range meanwhile.
                    self.locks.unlock(guard);
                    return other.map(|_| None);
                }
            },
        };
        Ok(Some(Change {
            guard,
            intent,
            offset,
        }))
    }

    /// How a discard (TRIM) of `len` bytes that the disk completed ended, for
    /// [`Volume::finish`]: zeroes when it deallocated (`deallocated`) on a device whose
    /// discarded blocks read back as zeroes; otherwise the range holds whatever the device
    /// says and is re-read and shipped as it is, not as we hope it is. Every front end asks
    /// here, so the rule is the volume's.
    pub fn discard_ended(&self, len: u32, deallocated: bool) -> Ended {
        if deallocated && self.storage.discard_reads_zero() {
            Ended::Done(Payload::Zero(len))
        } else {
            Ended::Unknown
        }
    }

    /// The disk finished `change` (before its reply): record the outcome, sync the journal
    /// for FUA, unlock the blocks. An error means the journal could not record it: the range
    /// is then re-read and shipped, and the client should hear of the error.
    pub fn finish(&self, change: Change, ended: Ended, fua: bool) -> io::Result<()> {
        let result = match (&self.journal, change.intent) {
            (Some(j), Some(intent)) => {
                let recorded = match ended {
                    Ended::Done(p) => j.complete(intent, change.offset, p).map(|_| ()),
                    Ended::Unknown => {
                        j.fail(intent);
                        Ok(())
                    }
                };
                recorded.and_then(|()| if fua { j.sync() } else { Ok(()) })
            }
            _ => Ok(()),
        };
        self.locks.unlock(change.guard);
        result
    }

    /// How long to hold a write back before admitting it (`--pace-above`; zero without a
    /// journal).
    pub fn pace_delay(&self) -> std::time::Duration {
        self.journal
            .as_ref()
            .map_or(std::time::Duration::ZERO, |j| j.pace_delay())
    }

    /// A client FLUSH, after the disk's sync: everything journaled so far becomes durable.
    pub fn flush(&self) -> io::Result<()> {
        self.journal.as_ref().map_or(Ok(()), |j| j.sync())
    }

    /// The volume as replication reads it.
    pub fn reader(&self) -> LockedReader {
        LockedReader {
            storage: self.storage.clone(),
            locks: self.locks.clone(),
        }
    }
}

/// What replication reads of a volume.
pub trait VolumeRead: Send + Sync {
    fn size(&self) -> u64;
    /// Read `out` at `offset`, unless a change to that range is in flight: then `Ok(false)`
    /// and nothing is read (try again later; changes hold their range only while their disk
    /// write and journal record are under way).
    fn read_settled(&self, offset: u64, out: &mut [u8]) -> io::Result<bool> {
        self.read_settled_then(offset, out, &mut |_| Ok(()))
    }
    /// [`VolumeRead::read_settled`], then `then` with what was read while the range is still
    /// locked: whatever `then` journals comes before any later change to the range.
    fn read_settled_then(
        &self,
        offset: u64,
        out: &mut [u8],
        then: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<bool>;
    /// Whether `[offset, offset+len)` is a hole (reads as zeroes without being read).
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool>;
}

/// A volume's disk with the range locks of its changes in flight.
pub struct LockedReader {
    pub storage: Arc<dyn Storage>,
    pub locks: Arc<RangeLocks>,
}

/// The lock holder id of replication reads: unique among holders (connections use
/// `conn << 16 | slot`, and one shipper reads one volume at a time).
const READER_ID: u64 = u64::MAX;

impl VolumeRead for LockedReader {
    fn size(&self) -> u64 {
        self.storage.size()
    }

    fn read_settled_then(
        &self,
        offset: u64,
        out: &mut [u8],
        then: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        let (start, end) = aligned_span(offset, out.len() as u64, self.storage.alignment());
        let Some(guard) = self.locks.try_lock(start, end, READER_ID) else {
            return Ok(false);
        };
        let r = self.storage.read_sync(offset, out).and_then(|()| then(out));
        self.locks.unlock(guard);
        r.map(|()| true)
    }

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let runs = self.storage.allocation(offset, len)?;
        Ok(runs.len() == 1 && runs[0].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::file::{FileStorage, IoMode};
    use crate::disk::spec::VolumeSpec;

    struct Count(std::sync::atomic::AtomicU32);
    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Two changes to one block: the second waits, and is woken when the first finishes; the
    /// journal records both, in the order they finished.
    #[test]
    fn a_change_waits_for_a_busy_block_and_is_woken() {
        use crate::journal::{Journal, JournalOptions};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let spec = VolumeSpec {
            name: "v".into(),
            path,
            size: None,
            read_only: false,
        };
        let journal = Journal::open(JournalOptions::new(
            crate::env::os(),
            dir.path().join("journal"),
            16 << 20,
        ))
        .unwrap();
        journal.mark_running().unwrap();
        let v = Volume {
            name: "v".into(),
            storage: Arc::new(FileStorage::open(&spec, IoMode::Direct).unwrap()),
            journal: Some(Arc::new(journal)),
            locks: Arc::new(RangeLocks::new()),
        };
        let count = Arc::new(Count(0.into()));
        let waker: Arc<dyn Wake> = count.clone();
        let first = v
            .admit(0, 4096, true, (0, 4096), 1, &waker)
            .unwrap()
            .unwrap();
        assert!(v
            .admit(512, 512, true, (0, 4096), 2, &waker)
            .unwrap()
            .is_none());
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        let data = bytes::Bytes::from(vec![1u8; 4096]);
        v.finish(first, Ended::Done(Payload::Data(data)), false)
            .unwrap();
        assert_eq!(
            count.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "woken"
        );
        let second = v
            .admit(512, 512, true, (0, 4096), 2, &waker)
            .unwrap()
            .unwrap();
        v.finish(second, Ended::Unknown, false).unwrap();
        let j = v.journal.as_ref().unwrap();
        let (recs, _) = j.collect(0, u64::MAX).unwrap();
        assert_eq!(
            recs.len(),
            1,
            "the second change's range is re-read, not recorded"
        );
        assert_eq!(j.take_dirty().len(), 1);
        assert_eq!(v.locks.held(), 0);
    }

    #[test]
    fn a_range_with_a_change_in_flight_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let spec = VolumeSpec {
            name: "v".into(),
            path,
            size: None,
            read_only: false,
        };
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&spec, IoMode::Direct).unwrap());
        let locks = Arc::new(RangeLocks::new());
        let r = LockedReader {
            storage,
            locks: locks.clone(),
        };
        let held = locks.try_lock(8192, 12288, 1).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(!r.read_settled(10_000, &mut buf).unwrap(), "busy");
        assert!(buf.iter().all(|&b| b == 0), "nothing read");
        assert!(r.read_settled(0, &mut buf).unwrap(), "elsewhere is fine");
        assert!(buf.iter().all(|&b| b == 7));
        locks.unlock(held);
        assert!(r.read_settled(10_000, &mut buf).unwrap());
        assert_eq!(locks.held(), 0, "the reader let go");
        // What the reader does with the data (journal a re-read) happens while the range is
        // still locked: no change to it can complete in between.
        let mut writer_got_in = None;
        assert!(r
            .read_settled_then(10_000, &mut buf, &mut |data| {
                assert!(data.iter().all(|&b| b == 7));
                writer_got_in = Some(locks.try_lock(8192, 12288, 1).is_some());
                Ok(())
            })
            .unwrap());
        assert_eq!(
            writer_got_in,
            Some(false),
            "the range is locked during `then`"
        );
        assert_eq!(locks.held(), 0);
    }
}
