//! Write folding inside a delta set.
//!
//! A delta set carries the net effect of a run of journal writes. Inside one set a later write
//! to a byte replaces an earlier one, so a hot block crosses the WAN once per set, not once per
//! write. Applying the folded extents (in any order: they never overlap) to a volume gives the
//! same bytes as applying the original writes one after another in journal order.
//!
//! [`Folder`] keeps a map `start offset -> Extent` whose extents never overlap. Adding an extent
//! removes what it covers: older extents are trimmed or split around it. Data payloads are
//! sliced ([`Bytes::slice`]), never copied — note that a slice keeps its whole original buffer
//! alive, so the memory retained by a folder is bounded by the sum of the inputs, not by
//! [`Folder::data_bytes`].
//!
//! Adjacent zero extents are merged (while the merged length fits the `u32` of
//! [`Payload::Zero`]); adjacent data extents are not (that would need a copy).

use crate::extent::{Extent, Payload};
use std::collections::BTreeMap;

/// Folds the writes of one delta set into non-overlapping extents.
#[derive(Clone, Debug, Default)]
pub struct Folder {
    /// start offset -> extent starting there; extents never overlap and are never empty.
    map: BTreeMap<u64, Extent>,
    /// Sum of the lengths of the Data extents in `map`.
    data_bytes: u64,
}

impl Folder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a write that happened after every write already added: it replaces the parts of
    /// earlier extents it overlaps (they are trimmed or split; data is sliced, not copied).
    ///
    /// Empty extents are ignored. An extent whose end would overflow `u64` is cut at
    /// `u64::MAX` (callers validate offsets against the volume size long before this).
    pub fn add(&mut self, mut ext: Extent) {
        let room = u64::MAX - ext.offset;
        debug_assert!(ext.len() <= room, "extent end overflows u64");
        if ext.len() > room {
            ext.payload = ext.payload.slice(0, room);
        }
        if ext.is_empty() {
            return;
        }
        let (start, end) = (ext.offset, ext.end());

        // An extent starting before `start` may reach into [start, end): keep its head, and
        // its tail if it also reaches past `end`.
        if let Some((&prev_start, prev)) = self.map.range(..start).next_back() {
            if prev.end() > start {
                if let Some(prev) = self.remove(prev_start) {
                    let prev_len = prev.len();
                    if prev.end() > end {
                        self.insert(Extent {
                            offset: end,
                            payload: prev.payload.slice(end - prev_start, prev_len),
                        });
                    }
                    self.insert(Extent {
                        offset: prev_start,
                        payload: prev.payload.slice(0, start - prev_start),
                    });
                }
            }
        }

        // Extents starting inside [start, end): drop them, keeping a tail past `end`.
        while let Some(&old_start) = self.map.range(start..end).next().map(|(k, _)| k) {
            let Some(old) = self.remove(old_start) else {
                break;
            };
            if old.end() > end {
                let old_len = old.len();
                self.insert(Extent {
                    offset: end,
                    payload: old.payload.slice(end - old_start, old_len),
                });
            }
        }

        // Merge with zero neighbours that touch the new zero extent.
        if let Payload::Zero(mut len) = ext.payload {
            let mut offset = start;
            if let Some((&p_start, p)) = self.map.range(..start).next_back() {
                if let (true, Payload::Zero(p_len)) = (p.end() == start, &p.payload) {
                    if let Some(sum) = len.checked_add(*p_len) {
                        self.remove(p_start);
                        offset = p_start;
                        len = sum;
                    }
                }
            }
            if let Some(Payload::Zero(n_len)) = self.map.get(&end).map(|n| &n.payload) {
                if let Some(sum) = len.checked_add(*n_len) {
                    self.remove(end);
                    len = sum;
                }
            }
            ext = Extent {
                offset,
                payload: Payload::Zero(len),
            };
        }
        self.insert(ext);
    }

    /// Bytes of Data payload currently held (after folding).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Number of extents currently held.
    pub fn extent_count(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The folded extents, sorted by offset.
    pub fn extents(&self) -> impl Iterator<Item = &Extent> + '_ {
        self.map.values()
    }

    /// The folded extents, sorted by offset, non-overlapping, none empty.
    pub fn into_extents(self) -> Vec<Extent> {
        self.map.into_values().collect()
    }

    fn insert(&mut self, ext: Extent) {
        debug_assert!(!ext.is_empty());
        self.data_bytes += ext.data_len();
        let _old = self.map.insert(ext.offset, ext);
        debug_assert!(_old.is_none());
    }

    fn remove(&mut self, start: u64) -> Option<Extent> {
        let ext = self.map.remove(&start)?;
        self.data_bytes -= ext.data_len();
        Some(ext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn data(offset: u64, bytes: &[u8]) -> Extent {
        Extent {
            offset,
            payload: Payload::Data(Bytes::copy_from_slice(bytes)),
        }
    }

    fn zero(offset: u64, len: u32) -> Extent {
        Extent {
            offset,
            payload: Payload::Zero(len),
        }
    }

    #[test]
    fn overwrite_in_the_middle_splits_without_copying() {
        let base = Bytes::from(vec![1u8; 100]);
        let mut f = Folder::new();
        f.add(Extent {
            offset: 1000,
            payload: Payload::Data(base.clone()),
        });
        f.add(data(1040, &[2; 10]));
        let exts = f.into_extents();
        assert_eq!(exts.len(), 3);
        assert_eq!((exts[0].offset, exts[0].len()), (1000, 40));
        assert_eq!((exts[1].offset, exts[1].len()), (1040, 10));
        assert_eq!((exts[2].offset, exts[2].len()), (1050, 50));
        let Payload::Data(head) = &exts[0].payload else {
            panic!()
        };
        // Same allocation as the original write: sliced, not copied.
        assert_eq!(head.as_ptr(), base.as_ptr());
        let Payload::Data(tail) = &exts[2].payload else {
            panic!()
        };
        assert_eq!(tail.as_ptr(), base[50..].as_ptr());
    }

    #[test]
    fn full_cover_replaces_and_counts() {
        let mut f = Folder::new();
        f.add(data(0, &[1; 10]));
        f.add(data(20, &[1; 10]));
        assert_eq!(f.data_bytes(), 20);
        f.add(zero(0, 40));
        assert_eq!(f.data_bytes(), 0);
        assert_eq!(f.extent_count(), 1);
        f.add(data(5, &[3; 5]));
        assert_eq!(f.data_bytes(), 5);
        assert_eq!(
            f.into_extents(),
            vec![zero(0, 5), data(5, &[3; 5]), zero(10, 30)]
        );
    }

    #[test]
    fn adjacent_zeroes_merge_and_empty_is_ignored() {
        let mut f = Folder::new();
        f.add(zero(10, 10));
        f.add(zero(30, 10));
        f.add(zero(20, 10));
        f.add(data(100, &[]));
        f.add(zero(200, 0));
        assert_eq!(f.into_extents(), vec![zero(10, 30)]);

        let mut f = Folder::new();
        f.add(zero(0, u32::MAX));
        f.add(zero(u64::from(u32::MAX), 5));
        assert_eq!(f.extent_count(), 2);
        assert!(!f.is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write { offset: u16, len: u16, seed: u8 },
        Zero { offset: u16, len: u16 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (any::<u16>(), 1u16..=8192, any::<u8>())
                .prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
            1 => (any::<u16>(), 1u16..=8192).prop_map(|(offset, len)| Op::Zero { offset, len }),
        ]
    }

    fn apply(image: &mut [u8], ext: &Extent) {
        let (s, e) = (ext.offset as usize, ext.end() as usize);
        match &ext.payload {
            Payload::Data(b) => image[s..e].copy_from_slice(b),
            Payload::Zero(_) => image[s..e].fill(0),
        }
    }

    proptest! {
        #[test]
        fn folding_matches_sequential_application(ops in prop::collection::vec(op(), 0..60)) {
            const SPACE: usize = (64 << 10) + 8192;
            let mut direct = vec![0xEEu8; SPACE];
            let mut folder = Folder::new();
            let mut input_data = 0u64;
            for (i, op) in ops.iter().enumerate() {
                let ext = match *op {
                    Op::Write { offset, len, seed } => {
                        let bytes: Vec<u8> = (0..len)
                            .map(|j| seed.wrapping_add(i as u8).wrapping_mul(31).wrapping_add(j as u8))
                            .collect();
                        input_data += u64::from(len);
                        Extent { offset: u64::from(offset), payload: Payload::Data(Bytes::from(bytes)) }
                    }
                    Op::Zero { offset, len } => zero(u64::from(offset), u32::from(len)),
                };
                apply(&mut direct, &ext);
                folder.add(ext);
                prop_assert!(folder.data_bytes() <= input_data);
            }
            let count = folder.extent_count();
            let held = folder.data_bytes();
            let exts = folder.into_extents();
            prop_assert_eq!(exts.len(), count);
            let data_sum: u64 = exts.iter().map(Extent::data_len).sum();
            prop_assert_eq!(data_sum, held);
            let mut folded = vec![0xEEu8; SPACE];
            for w in exts.windows(2) {
                prop_assert!(w[0].end() <= w[1].offset, "overlap or disorder: {:?}", w);
            }
            for ext in &exts {
                prop_assert!(!ext.is_empty());
                apply(&mut folded, ext);
            }
            prop_assert!(direct == folded);
        }
    }
}
