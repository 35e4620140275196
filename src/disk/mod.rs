//! Volumes and the disks behind them.
//!
//! The connection loop talks to a volume only through [`Storage`]: it describes a disk
//! operation, the storage turns it into an io_uring submission (or does it on the spot), and the
//! loop reaps the completion. [`faults::Faulty`] wraps any storage to inject EIO, ENOSPC and
//! short writes, the way tikv's raft-engine wraps its file system in tests.

pub mod buf;
pub mod faults;
pub mod file;
pub mod fingerprint;
pub mod ranges;
pub mod segments;
pub mod spec;

use io_uring::squeue;

/// One disk operation. Buffers are raw pointers because the operation outlives the borrow:
/// the caller keeps the buffer alive and unmoved until the completion is reaped.
#[derive(Clone, Copy, Debug)]
pub enum DiskOp {
    Read {
        offset: u64,
        buf: *mut u8,
        len: u32,
    },
    Write {
        offset: u64,
        buf: *const u8,
        len: u32,
        fua: bool,
    },
    /// fdatasync: makes every completed write durable.
    Sync,
    /// Deallocate (TRIM); advisory, contents read back as zero on files.
    Discard {
        offset: u64,
        len: u32,
    },
    /// Make the range read as zeroes; `punch` allows deallocating it.
    Zero {
        offset: u64,
        len: u32,
        punch: bool,
    },
}

impl DiskOp {
    pub fn kind(&self) -> OpKind {
        match self {
            DiskOp::Read { .. } => OpKind::Read,
            DiskOp::Write { .. } => OpKind::Write,
            DiskOp::Sync => OpKind::Sync,
            DiskOp::Discard { .. } => OpKind::Discard,
            DiskOp::Zero { .. } => OpKind::Zero,
        }
    }

    /// (offset, len) of the byte range touched, if any.
    pub fn range(&self) -> Option<(u64, u32)> {
        match *self {
            DiskOp::Read { offset, len, .. }
            | DiskOp::Write { offset, len, .. }
            | DiskOp::Discard { offset, len }
            | DiskOp::Zero { offset, len, .. } => Some((offset, len)),
            DiskOp::Sync => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Sync,
    Discard,
    Zero,
}

/// How a storage answers a [`DiskOp`].
pub enum Prepared {
    /// Submit this entry; its completion result is the operation's result.
    Submit(squeue::Entry),
    /// Already done (or refused): the result as io_uring would report it (bytes or -errno).
    Done(i32),
}

/// A volume's disk as the NBD connection loop sees it.
pub trait Storage: Send + Sync {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Turn `op` into a submission. The caller owns the buffers named in `op`.
    fn prepare(&self, op: DiskOp) -> Prepared;
    /// Whether a completed Discard leaves the range reading as zeroes.
    fn discard_reads_zero(&self) -> bool;
    /// Offset and length alignment every Read and Write must have (1: any).
    fn alignment(&self) -> u64;
    /// Read any range synchronously, bouncing through aligned buffers if needed (for the
    /// shipper's full copy and resyncs, which must not disturb the I/O mode).
    fn read_sync(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()>;
    /// Make every completed write durable, synchronously (a clean stop, before the journal
    /// says nothing was lost).
    fn sync_durable(&self) -> std::io::Result<()>;
    /// base:allocation extents covering `[offset, offset+len)`: (length, is_hole) pairs.
    fn allocation(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>>;
    /// The identity of the disk behind the volume (`disk::fingerprint`).
    fn fingerprint(&self) -> std::io::Result<fingerprint::Fingerprint>;
}
