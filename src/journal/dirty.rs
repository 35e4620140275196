//! The dirty map: which fixed-size regions of a volume changed since the mirror last held
//! them, for when the journal cannot keep the writes themselves (issue 14's overflow ladder,
//! DRBD's bitmap). A region's bit is set before a write to it is submitted to the disk, and
//! cleared only once the mirror holds the region again.
//!
//! On disk (`STATE/journal/VOLUME/dirty.map`, 0600): a 4 KiB header (magic, version, region
//! and volume sizes, CRC32), then the bitmap, bit `r % 8` of byte `r / 8` for region `r`,
//! padded to whole 4 KiB pages. A page whose bits change is written at once (through the page
//! cache: it survives kill -9 of the daemon before the data write it covers is submitted) and
//! made durable by [`DirtyMap::sync`], which FLUSH and a clean stop call.
//!
//! What a crash keeps, and why that is enough:
//! - A crash of the process loses nothing written: every bit set is in the page cache.
//! - A crash of the host may lose bits set since the last sync, as it may lose the volume's
//!   own unflushed writes. The journal's stop marker tells the next start that the host went
//!   down, and continuity is then never claimed: the mirror is compared in full. (A write the
//!   disk kept without a FLUSH is why the map alone cannot be trusted after a power cut.)
//! - A torn page write mixes old and new sectors. While regions are only marked, every sector
//!   of the new content holds a superset of the old one's bits, so any mix keeps every bit
//!   that was durable. A torn clear can only leave bits set: an extra region resynced.

use crate::env::{read_all, write_all_at, write_atomic, Fs, Handle, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// Bytes of the header, and of each bitmap page written as a unit.
const PAGE: usize = 4096;
const MAGIC: &[u8; 8] = b"BMDIRTY\0";
const VERSION: u32 = 2;
/// Header bytes covered by its CRC: magic, version, region and volume sizes, the resync's
/// two sequence numbers ([`Fold`]).
const HEADER_FIELDS: usize = 8 + 4 + 8 + 8 + 8 + 8;
/// `covers_after` when no resync is open.
const NO_RESYNC: u64 = u64::MAX;

/// The smallest region: one block of the volume's direct I/O.
pub const MIN_REGION_BYTES: u64 = 4096;

/// Whether a map can have regions of `region_bytes` (`--dirty-region` checks it when typed).
pub fn check_region_bytes(region_bytes: u64) -> Result<(), String> {
    if !region_bytes.is_power_of_two() || region_bytes < MIN_REGION_BYTES {
        return Err(format!(
            "dirty map region of {region_bytes} bytes: must be a power of two of at least \
             {MIN_REGION_BYTES}"
        ));
    }
    Ok(())
}
/// The default region: a 1 TiB volume is 16 M regions, a 2 MiB map; a 4 KiB random write
/// dirties 64 KiB to resync, the sequential reads of a resync stay large.
pub const DEFAULT_REGION_BYTES: u64 = 64 << 10;

/// What the map's header says of the journal it stands in for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fold {
    /// A resync is open: every write after this journal sequence number is in the journal or
    /// in the map (the records acknowledged when the journal first folded). None once the
    /// mirror holds the resync's end.
    pub covers_after: Option<u64>,
    /// Records up to this sequence number were folded into the map: they are never shipped
    /// (the regions they wrote are read again instead), and numbering goes on after it.
    pub folded_through: u64,
}

/// A volume's dirty map, in memory and in its file.
pub struct DirtyMap {
    path: PathBuf,
    file: Handle,
    region_bytes: u64,
    volume_bytes: u64,
    regions: u64,
    /// The bitmap, as on disk (one bit per region, whole pages).
    bits: Vec<u8>,
    /// Regions whose bit is set.
    dirty: u64,
    /// Pages written since the last sync.
    unsynced: bool,
    fold: Fold,
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("dirty map {}: {why}", path.display()),
    )
}

fn header(region_bytes: u64, volume_bytes: u64, fold: Fold) -> Vec<u8> {
    let mut h = Vec::with_capacity(PAGE);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&region_bytes.to_le_bytes());
    h.extend_from_slice(&volume_bytes.to_le_bytes());
    h.extend_from_slice(&fold.covers_after.unwrap_or(NO_RESYNC).to_le_bytes());
    h.extend_from_slice(&fold.folded_through.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.resize(PAGE, 0);
    h
}

/// Bytes of bitmap for `regions`, padded to whole pages.
fn bitmap_bytes(regions: u64) -> usize {
    (regions.div_ceil(8) as usize).div_ceil(PAGE) * PAGE
}

impl DirtyMap {
    /// A new, empty map for a volume of `volume_bytes`, replacing any file at `path`
    /// atomically and durably.
    pub fn create(
        fs: &Fs,
        path: &Path,
        volume_bytes: u64,
        region_bytes: u64,
    ) -> io::Result<DirtyMap> {
        check_region_bytes(region_bytes)
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
        let regions = volume_bytes.div_ceil(region_bytes);
        let mut content = header(region_bytes, volume_bytes, Fold::default());
        content.resize(PAGE + bitmap_bytes(regions), 0);
        write_atomic(&**fs, path, &content)?;
        let file = fs.open(path, OpenOptions::write())?;
        Ok(DirtyMap {
            path: path.to_path_buf(),
            file,
            region_bytes,
            volume_bytes,
            regions,
            bits: content.split_off(PAGE),
            dirty: 0,
            unsynced: false,
            fold: Fold::default(),
        })
    }

    /// The map at `path`, which must describe a volume of `volume_bytes`. A file that is not a
    /// whole, valid map is an error, never an empty map: forgetting dirty regions would leave
    /// the mirror silently different (I2).
    pub fn open(fs: &Fs, path: &Path, volume_bytes: u64) -> io::Result<DirtyMap> {
        let file = fs.open(path, OpenOptions::write())?;
        let mut content = read_all(&*file)?;
        if content.len() < PAGE || &content[..8] != MAGIC {
            return Err(invalid(path, "not a dirty map (bad magic or too short)"));
        }
        let word = |at: usize| u64::from_le_bytes(content[at..at + 8].try_into().unwrap());
        let crc = u32::from_le_bytes(
            content[HEADER_FIELDS..HEADER_FIELDS + 4]
                .try_into()
                .unwrap(),
        );
        if crc32fast::hash(&content[..HEADER_FIELDS]) != crc {
            return Err(invalid(path, "header checksum mismatch"));
        }
        let version = u32::from_le_bytes(content[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(invalid(
                path,
                format!("version {version}, expected {VERSION}"),
            ));
        }
        let (region_bytes, mapped_bytes) = (word(12), word(20));
        if mapped_bytes != volume_bytes {
            return Err(invalid(
                path,
                format!("made for a volume of {mapped_bytes} bytes, this one has {volume_bytes}"),
            ));
        }
        if !region_bytes.is_power_of_two() || region_bytes < MIN_REGION_BYTES {
            return Err(invalid(path, format!("region of {region_bytes} bytes")));
        }
        let regions = volume_bytes.div_ceil(region_bytes);
        if content.len() != PAGE + bitmap_bytes(regions) {
            return Err(invalid(
                path,
                format!(
                    "{} bytes, expected {}",
                    content.len(),
                    PAGE + bitmap_bytes(regions)
                ),
            ));
        }
        let covers_after = word(28);
        let fold = Fold {
            covers_after: (covers_after != NO_RESYNC).then_some(covers_after),
            folded_through: word(36),
        };
        let bits = content.split_off(PAGE);
        let mut map = DirtyMap {
            path: path.to_path_buf(),
            file,
            region_bytes,
            volume_bytes,
            regions,
            bits,
            dirty: 0,
            unsynced: false,
            fold,
        };
        // Bits past the last region (padding) are never set by `mark`: set ones mean damage.
        if (map.regions..(map.bits.len() as u64 * 8)).any(|r| map.is_set(r)) {
            return Err(invalid(path, "bits set past the volume's end"));
        }
        map.dirty = map.bits.iter().map(|b| b.count_ones() as u64).sum();
        Ok(map)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    pub fn fold(&self) -> Fold {
        self.fold
    }

    /// Record `fold` in the header (written in place: its page is allocated, so this works on
    /// a full file system too; durable with the next [`DirtyMap::sync`]).
    pub fn set_fold(&mut self, fold: Fold) -> io::Result<()> {
        if fold == self.fold {
            return Ok(());
        }
        self.fold = fold;
        self.unsynced = true;
        let h = header(self.region_bytes, self.volume_bytes, fold);
        write_all_at(&*self.file, &h, 0)
    }

    /// Regions marked dirty.
    pub fn dirty_regions(&self) -> u64 {
        self.dirty
    }

    /// Bytes of the volume in dirty regions (the last region may be short).
    pub fn dirty_bytes(&self) -> u64 {
        self.runs().map(|(_, len)| len).sum()
    }

    fn is_set(&self, region: u64) -> bool {
        self.bits[(region / 8) as usize] & (1 << (region % 8)) != 0
    }

    /// The regions `offset..offset + len` touches.
    fn span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        debug_assert!(offset.saturating_add(len) <= self.volume_bytes);
        if len == 0 {
            return 0..0;
        }
        offset / self.region_bytes..(offset + len).div_ceil(self.region_bytes)
    }

    /// Write the pages holding bytes `first..=last` of the bitmap.
    fn write_pages(&mut self, first: usize, last: usize) -> io::Result<()> {
        self.unsynced = true;
        let (from, to) = (first / PAGE * PAGE, (last / PAGE + 1) * PAGE);
        write_all_at(&*self.file, &self.bits[from..to], (PAGE + from) as u64)
    }

    /// Mark every region that `offset..offset + len` touches, and write the changed pages
    /// (before the write they cover is submitted). Returns how many regions became dirty. On an
    /// error the bits stay set in memory (the regions are still resynced while the process
    /// lives), but the file may lack them: the caller must then not trust the map after a
    /// restart.
    pub fn mark(&mut self, offset: u64, len: u64) -> io::Result<u64> {
        let mut newly = 0;
        let mut changed: Option<(usize, usize)> = None;
        for r in self.span(offset, len) {
            if !self.is_set(r) {
                let byte = (r / 8) as usize;
                self.bits[byte] |= 1 << (r % 8);
                newly += 1;
                changed = Some(changed.map_or((byte, byte), |(f, _)| (f, byte)));
            }
        }
        self.dirty += newly;
        if let Some((first, last)) = changed {
            self.write_pages(first, last)?;
        }
        Ok(newly)
    }

    /// [`DirtyMap::mark`] each of `ranges` (`(offset, len)`), clipped to the volume: ranges
    /// a peer names (a Takeover) or a promotion carries over, not this side's own writes.
    pub fn mark_ranges(&mut self, ranges: &[(u64, u64)]) -> io::Result<()> {
        for &(offset, len) in ranges {
            let end = offset.saturating_add(len).min(self.volume_bytes);
            if offset < end {
                self.mark(offset, end - offset)?;
            }
        }
        Ok(())
    }

    /// Clear the regions lying wholly inside `offset..offset + len` (the mirror holds them
    /// again). A region only partly inside stays dirty.
    pub fn clear(&mut self, offset: u64, len: u64) -> io::Result<u64> {
        let end = (offset + len).min(self.volume_bytes);
        let first = offset.div_ceil(self.region_bytes);
        // The last region may be short: it is whole when the range reaches the volume's end.
        let last = if end == self.volume_bytes {
            self.regions
        } else {
            end / self.region_bytes
        };
        let mut cleared = 0;
        let mut changed: Option<(usize, usize)> = None;
        for r in first..last.max(first) {
            if self.is_set(r) {
                let byte = (r / 8) as usize;
                self.bits[byte] &= !(1 << (r % 8));
                cleared += 1;
                changed = Some(changed.map_or((byte, byte), |(f, _)| (f, byte)));
            }
        }
        self.dirty -= cleared;
        if let Some((first, last)) = changed {
            self.write_pages(first, last)?;
        }
        Ok(cleared)
    }

    /// Write the whole map afresh (header and bitmap) in a new file that replaces the one at
    /// its path atomically and durably: after a write failed (the file may lack marks) or the
    /// file was removed so that a restart could not trust it.
    pub fn rewrite(&mut self, fs: &Fs) -> io::Result<()> {
        let mut content = header(self.region_bytes, self.volume_bytes, self.fold);
        content.resize(PAGE, 0);
        content.extend_from_slice(&self.bits);
        write_atomic(&**fs, &self.path, &content)?;
        self.file = fs.open(&self.path, OpenOptions::write())?;
        self.unsynced = false;
        Ok(())
    }

    /// Make every page written so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// The dirty parts of the volume as (offset, len), adjacent regions merged, in order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs_from(0)
    }

    /// [`DirtyMap::runs`] of the regions from the one holding `offset` on.
    pub fn runs_from(&self, offset: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut r = offset / self.region_bytes;
        std::iter::from_fn(move || {
            while r < self.regions && !self.is_set(r) {
                // Skip clean bytes whole.
                if r.is_multiple_of(8) && self.bits[(r / 8) as usize] == 0 {
                    r += 8;
                } else {
                    r += 1;
                }
            }
            if r >= self.regions {
                return None;
            }
            let start = r;
            while r < self.regions && self.is_set(r) {
                r += 1;
            }
            let offset = start * self.region_bytes;
            let end = (r * self.region_bytes).min(self.volume_bytes);
            Some((offset, end - offset))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::mem::{Faults, MemFs};
    use crate::sim::rng::Prng;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn mem() -> (MemFs, Fs, PathBuf) {
        let m = MemFs::new();
        let fs: Fs = Arc::new(m.clone());
        (m, fs, PathBuf::from("/state/journal/vol/dirty.map"))
    }

    #[test]
    fn marks_cover_every_touched_region_and_merge_into_runs() {
        let (_, fs, path) = mem();
        let mut map = DirtyMap::create(&fs, &path, 10 * MIB + 4 * KIB, 64 * KIB).unwrap();
        assert_eq!(map.runs().count(), 0);
        // One byte, a write across a region boundary, and the short last region.
        assert_eq!(map.mark(100, 1).unwrap(), 1);
        assert_eq!(
            map.mark(64 * KIB - 1, 2).unwrap(),
            1,
            "region 0 was already dirty"
        );
        assert_eq!(map.mark(3 * 64 * KIB, 64 * KIB).unwrap(), 1);
        assert_eq!(map.mark(10 * MIB, 4 * KIB).unwrap(), 1);
        assert_eq!(
            map.mark(5 * 64 * KIB, 0).unwrap(),
            0,
            "an empty range marks nothing"
        );
        assert_eq!(
            map.runs().collect::<Vec<_>>(),
            vec![
                (0, 128 * KIB),
                (3 * 64 * KIB, 64 * KIB),
                (10 * MIB, 4 * KIB)
            ]
        );
        assert_eq!(map.dirty_regions(), 4);
        assert_eq!(map.dirty_bytes(), 128 * KIB + 64 * KIB + 4 * KIB);
    }

    #[test]
    fn clear_takes_only_whole_regions() {
        let (_, fs, path) = mem();
        let size = MIB + 4 * KIB;
        let mut map = DirtyMap::create(&fs, &path, size, 64 * KIB).unwrap();
        map.mark(0, size).unwrap();
        assert_eq!(map.dirty_regions(), 17);
        // Half of region 0 and all of region 1: only region 1 is clean now.
        assert_eq!(map.clear(32 * KIB, 96 * KIB).unwrap(), 1);
        // The short last region is whole when the range reaches the end.
        assert_eq!(map.clear(MIB, 4 * KIB).unwrap(), 1);
        assert_eq!(
            map.runs().collect::<Vec<_>>(),
            vec![(0, 64 * KIB), (128 * KIB, MIB - 128 * KIB)]
        );
    }

    #[test]
    fn a_kill_loses_nothing_marked_even_unsynced() {
        let (m, fs, path) = mem();
        let mut map = DirtyMap::create(&fs, &path, 256 * MIB, 64 * KIB).unwrap();
        map.mark(7 * MIB, 1).unwrap();
        map.mark(200 * MIB, 3 * MIB).unwrap();
        let before: Vec<_> = map.runs().collect();
        drop(map);
        m.restart();
        let map = DirtyMap::open(&fs, &path, 256 * MIB).unwrap();
        assert_eq!(map.runs().collect::<Vec<_>>(), before);
        assert_eq!(map.dirty_regions(), 1 + 48);
    }

    /// A power cut at random points: every region marked before the last sync is still
    /// dirty, and nothing that was never marked is; the map always opens.
    #[test]
    fn a_power_cut_keeps_every_synced_mark() {
        for seed in 0..200 {
            let mut rng = Prng::new(seed);
            let (m, fs, path) = mem();
            let size = 64 * MIB + 4 * KIB * rng.below(16);
            let mut map = DirtyMap::create(&fs, &path, size, (4 * KIB) << rng.below(6)).unwrap();
            let (mut synced, mut marked) = (BTreeSet::new(), BTreeSet::new());
            for _ in 0..rng.range(1, 60) {
                let offset = rng.below(size);
                let len = rng.below((size - offset).min(2 * MIB) + 1);
                map.mark(offset, len).unwrap();
                marked.extend(map.span(offset, len));
                if rng.chance(1, 5) {
                    map.sync().unwrap();
                    synced = marked.clone();
                }
            }
            drop(map);
            m.crash(&mut rng);
            let map = DirtyMap::open(&fs, &path, size).unwrap();
            let kept: BTreeSet<u64> = (0..map.regions).filter(|&r| map.is_set(r)).collect();
            assert!(
                kept.is_superset(&synced),
                "seed {seed}: a synced mark was lost"
            );
            assert!(
                kept.is_subset(&marked),
                "seed {seed}: a region never marked is dirty"
            );
        }
    }

    #[test]
    fn a_map_that_is_not_this_volumes_is_refused() {
        let (_, fs, path) = mem();
        let mut map = DirtyMap::create(&fs, &path, 64 * MIB, 64 * KIB).unwrap();
        map.mark(0, 1).unwrap();
        drop(map);
        let err = |r: io::Result<DirtyMap>| r.err().expect("refused").to_string();
        assert!(err(DirtyMap::open(&fs, &path, 128 * MIB)).contains("made for a volume of"));
        // A flipped header byte, a truncated bitmap, a bit past the end: each refused.
        let good = fs.read(&path).unwrap();
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: [(&str, Damage); 4] = [
            ("header checksum", Box::new(|c: &mut Vec<u8>| c[13] ^= 1)),
            (
                "expected",
                Box::new(|c: &mut Vec<u8>| c.truncate(c.len() - PAGE)),
            ),
            (
                "past the volume's end",
                Box::new(|c: &mut Vec<u8>| {
                    let last = c.len() - 1;
                    c[last] = 0x80;
                }),
            ),
            ("bad magic", Box::new(|c: &mut Vec<u8>| c[0] = b'X')),
        ];
        for (needle, damage) in cases {
            let mut c = good.clone();
            damage(&mut c);
            write_atomic(&*fs, &path, &c).unwrap();
            let e = err(DirtyMap::open(&fs, &path, 64 * MIB));
            assert!(
                e.contains(needle) && e.contains("dirty.map"),
                "{needle}: {e}"
            );
        }
        assert!(err(DirtyMap::create(&fs, &path, MIB, 3000)).contains("power of two"));
    }

    #[test]
    fn a_failing_sync_is_reported_and_the_marks_stay() {
        let (m, fs, path) = mem();
        let mut map = DirtyMap::create(&fs, &path, 64 * MIB, 64 * KIB).unwrap();
        map.sync().unwrap();
        m.set_faults(Faults {
            failing_syncs: 1,
            ..Faults::default()
        });
        map.mark(MIB, 1).unwrap();
        assert!(map.sync().is_err(), "the failed sync is reported");
        assert_eq!(map.runs().collect::<Vec<_>>(), vec![(MIB, 64 * KIB)]);
        map.sync().unwrap();
    }
}
