//! Per-volume locks on block ranges held by changes in flight, shared by every connection.
//!
//! Two changes that touch a common block never run at once: an unaligned write's
//! read-modify-write cannot undo a neighbour's write in the same block, and the order the
//! journal records is the order the disk saw (I2). A change that conflicts is not blocked
//! (the connection thread must keep reaping completions): `try_lock` says no and the caller
//! retries later.

use crate::wake::{Waiters, Wake};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>, // (start, end, id)
    /// Holders-to-be waiting for a range: woken at every unlock, they try again.
    waiters: Waiters,
}

/// Proof of a held range; give it back with `unlock`.
#[derive(Debug, PartialEq, Eq)]
pub struct RangeGuard {
    id: u64,
}

impl RangeLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lock `[start, end)` unless part of it is held. `id` must be unique among holders.
    pub fn try_lock(&self, start: u64, end: u64, id: u64) -> Option<RangeGuard> {
        let mut held = self.held.lock().unwrap();
        if held.iter().any(|&(s, e, _)| s < end && start < e) {
            return None;
        }
        held.push((start, end, id));
        Some(RangeGuard { id })
    }

    /// [`RangeLocks::try_lock`]; when the range is held, `waker` is woken at the next unlock
    /// (registered under the same lock as the check, so no wake-up is lost).
    pub fn try_lock_or_wait(
        &self,
        start: u64,
        end: u64,
        id: u64,
        waker: &Arc<dyn Wake>,
    ) -> Option<RangeGuard> {
        let mut held = self.held.lock().unwrap();
        if held.iter().any(|&(s, e, _)| s < end && start < e) {
            self.waiters.register(waker);
            return None;
        }
        held.push((start, end, id));
        Some(RangeGuard { id })
    }

    pub fn unlock(&self, guard: RangeGuard) {
        {
            let mut held = self.held.lock().unwrap();
            if let Some(i) = held.iter().position(|&(_, _, id)| id == guard.id) {
                held.swap_remove(i);
            }
        }
        self.waiters.wake_all();
    }

    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

/// `[offset, offset+len)` widened to whole `align`-byte blocks.
pub fn aligned_span(offset: u64, len: u64, align: u64) -> (u64, u64) {
    let start = offset / align * align;
    let end = (offset + len).div_ceil(align) * align;
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let l = RangeLocks::new();
        let a = l.try_lock(0, 4096, 1).unwrap();
        assert!(l.try_lock(4095, 4097, 2).is_none());
        let b = l.try_lock(4096, 8192, 3).unwrap();
        l.unlock(a);
        assert!(
            l.try_lock(0, 8192, 4).is_none(),
            "b still holds the second block"
        );
        l.unlock(b);
        assert!(l.try_lock(0, 8192, 5).is_some());
        assert_eq!(l.held(), 1);
    }

    #[test]
    fn spans_widen_to_blocks() {
        assert_eq!(aligned_span(1, 10, 512), (0, 512));
        assert_eq!(aligned_span(511, 2, 512), (0, 1024));
        assert_eq!(aligned_span(4096, 4096, 4096), (4096, 8192));
        assert_eq!(aligned_span(5, 3, 1), (5, 8));
    }
}
