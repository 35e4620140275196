//! A volume as every front end and the shipper share it: its disk, its journal (when
//! replicated), and the locks on block ranges held by changes in flight.
//!
//! Reads for replication (the full copy, the comparison, re-reading ranges the journal could
//! not vouch for) go through [`VolumeRead::read_settled`]: they take the range's lock, so
//! they never see a change that is on the disk but not yet in the journal. A chunk read that
//! way is the volume's state after a prefix of the journal (for that chunk), which is what
//! lets the mirror be exactly a journal prefix once the copy's journal catches up (I1).

use crate::disk::ranges::{aligned_span, RangeLocks};
use crate::disk::Storage;
use std::io;
use std::sync::Arc;

/// What replication reads of a volume.
pub trait VolumeRead: Send + Sync {
    fn size(&self) -> u64;
    /// Read `out` at `offset`, unless a change to that range is in flight: then `Ok(false)`
    /// and nothing is read (try again later; changes hold their range only while their disk
    /// write and journal record are under way).
    fn read_settled(&self, offset: u64, out: &mut [u8]) -> io::Result<bool>;
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

    fn read_settled(&self, offset: u64, out: &mut [u8]) -> io::Result<bool> {
        let (start, end) = aligned_span(offset, out.len() as u64, self.storage.alignment());
        let Some(guard) = self.locks.try_lock(start, end, READER_ID) else {
            return Ok(false);
        };
        let r = self.storage.read_sync(offset, out);
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
    }
}
