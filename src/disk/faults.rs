//! Fault injection: a [`Storage`] wrapper that fails or shortens chosen operations.
//!
//! Used by unit tests and, through the hidden `--inject-fault` flag, by end-to-end tests that
//! check what a real NBD client sees when the disk says EIO or ENOSPC. A rule reads
//! `OP:WHAT[:START-END][:COUNT]`, e.g. `write:EIO:1048576-2097152` or `write:short`:
//! OP is read, write, sync, zero, discard or any; WHAT is EIO, ENOSPC or short (the write
//! transfers only half of what was asked, as a real disk may, and the caller must go on).

use super::{DiskOp, OpKind, Prepared, Storage};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Errno(i32),
    Short,
}

#[derive(Debug)]
pub struct FaultRule {
    pub op: Option<OpKind>,
    pub kind: FaultKind,
    pub start: u64,
    pub end: u64,
    /// How many more times the rule fires (u64::MAX: always).
    remaining: AtomicU64,
}

impl FaultRule {
    fn matches(&self, op: &DiskOp) -> bool {
        if self.op.is_some_and(|k| k != op.kind()) {
            return false;
        }
        let hit = match op.range() {
            Some((off, len)) => off < self.end && off + len as u64 > self.start,
            None => true,
        };
        hit && self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl std::str::FromStr for FaultRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("fault rule {s:?}: expected OP:WHAT[:START-END][:COUNT]");
        let mut it = s.split(':');
        let op = match it.next().ok_or_else(bad)? {
            "read" => Some(OpKind::Read),
            "write" => Some(OpKind::Write),
            "sync" => Some(OpKind::Sync),
            "zero" => Some(OpKind::Zero),
            "discard" => Some(OpKind::Discard),
            "any" => None,
            _ => return Err(bad()),
        };
        let kind = match it.next().ok_or_else(bad)? {
            "EIO" => FaultKind::Errno(libc::EIO),
            "ENOSPC" => FaultKind::Errno(libc::ENOSPC),
            "short" => FaultKind::Short,
            _ => return Err(bad()),
        };
        let (mut start, mut end, mut count) = (0, u64::MAX, u64::MAX);
        if let Some(r) = it.next() {
            let (a, b) = r.split_once('-').ok_or_else(bad)?;
            start = a.parse().map_err(|_| bad())?;
            end = b.parse().map_err(|_| bad())?;
        }
        if let Some(c) = it.next() {
            count = c.parse().map_err(|_| bad())?;
        }
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(FaultRule {
            op,
            kind,
            start,
            end,
            remaining: AtomicU64::new(count),
        })
    }
}

pub struct Faulty<S> {
    inner: S,
    rules: Vec<FaultRule>,
}

impl<S: Storage> Faulty<S> {
    pub fn new(inner: S, rules: Vec<FaultRule>) -> Self {
        Faulty { inner, rules }
    }

    /// Half of `len`, rounded down to the storage's alignment (0: cannot shorten).
    fn half(&self, len: u32) -> u32 {
        let a = self.inner.alignment().max(1) as u32;
        len / 2 / a * a
    }
}

impl<S: Storage> Storage for Faulty<S> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn prepare(&self, op: DiskOp) -> Prepared {
        let Some(rule) = self.rules.iter().find(|r| r.matches(&op)) else {
            return self.inner.prepare(op);
        };
        match (rule.kind, op) {
            (FaultKind::Errno(e), _) => {
                tracing::debug!(?op, errno = e, "injected fault");
                Prepared::Done(-e)
            }
            // A short transfer still ends on the storage's alignment, as a real disk's would.
            (
                FaultKind::Short,
                DiskOp::Write {
                    offset,
                    buf,
                    len,
                    fua,
                },
            ) if self.half(len) > 0 => self.inner.prepare(DiskOp::Write {
                offset,
                buf,
                len: self.half(len),
                fua,
            }),
            (FaultKind::Short, DiskOp::Read { offset, buf, len }) if self.half(len) > 0 => {
                self.inner.prepare(DiskOp::Read {
                    offset,
                    buf,
                    len: self.half(len),
                })
            }
            _ => self.inner.prepare(op),
        }
    }

    fn discard_reads_zero(&self) -> bool {
        self.inner.discard_reads_zero()
    }

    fn alignment(&self) -> u64 {
        self.inner.alignment()
    }

    fn sync_durable(&self) -> std::io::Result<()> {
        self.inner.sync_durable()
    }

    fn read_sync(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_sync(offset, out)
    }

    fn fingerprint(&self) -> std::io::Result<super::fingerprint::Fingerprint> {
        self.inner.fingerprint()
    }

    fn allocation(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
        self.inner.allocation(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Null;
    impl Storage for Null {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn prepare(&self, op: DiskOp) -> Prepared {
            match op {
                DiskOp::Write { len, .. } | DiskOp::Read { len, .. } => Prepared::Done(len as i32),
                _ => Prepared::Done(0),
            }
        }
        fn discard_reads_zero(&self) -> bool {
            true
        }
        fn alignment(&self) -> u64 {
            1
        }
        fn sync_durable(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn read_sync(&self, _: u64, out: &mut [u8]) -> std::io::Result<()> {
            out.fill(0);
            Ok(())
        }
        fn allocation(&self, _: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
            Ok(vec![(len, false)])
        }
        fn fingerprint(&self) -> std::io::Result<crate::disk::fingerprint::Fingerprint> {
            Err(std::io::Error::other("no disk"))
        }
    }

    fn result(p: Prepared) -> i32 {
        match p {
            Prepared::Done(r) => r,
            Prepared::Submit(_) => panic!("Null storage never submits"),
        }
    }

    fn write(offset: u64, len: u32) -> DiskOp {
        DiskOp::Write {
            offset,
            buf: std::ptr::null(),
            len,
            fua: false,
        }
    }

    #[test]
    fn rules_match_range_op_and_count() {
        let f = Faulty::new(Null, vec!["write:EIO:4096-8192:2".parse().unwrap()]);
        assert_eq!(result(f.prepare(write(0, 4096))), 4096, "outside the range");
        assert_eq!(result(f.prepare(write(4000, 200))), -libc::EIO, "overlaps");
        assert_eq!(
            result(f.prepare(DiskOp::Read {
                offset: 4096,
                buf: std::ptr::null_mut(),
                len: 10
            })),
            10
        );
        assert_eq!(result(f.prepare(write(4096, 1))), -libc::EIO);
        assert_eq!(result(f.prepare(write(4096, 1))), 1, "count used up");
    }

    #[test]
    fn short_and_enospc() {
        let f = Faulty::new(Null, vec!["write:short".parse().unwrap()]);
        assert_eq!(result(f.prepare(write(0, 4096))), 2048);
        let f = Faulty::new(Null, vec!["any:ENOSPC".parse().unwrap()]);
        assert_eq!(result(f.prepare(DiskOp::Sync)), -libc::ENOSPC);
        assert!("write:EBADF".parse::<FaultRule>().is_err());
        assert!("write:EIO:5".parse::<FaultRule>().is_err());
    }
}
