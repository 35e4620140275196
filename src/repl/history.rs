//! The mirror's history (issue 14, part 3; first step: the undo log and its reads, proven in
//! the simulator, not yet wired into the mirror daemon): before a delta set overwrites blocks of
//! the mirror's volume, their old content is appended to an undo log and synced; every set
//! after which the volume is consistent is a recoverable **point**, stamped with the mirror's
//! own clock. The volume as of point P is, block by block, the oldest content saved by a set
//! after P (log order), or else the volume as it is now; bringing the volume back to P writes
//! that content, newest record first so that the oldest wins.
//!
//! Crash safety: a set's undo records are durable before any of its blocks is written, so
//! every change to the volume after a point has its before-image in the log, in order. A set
//! applied again after a crash (the redo log replays it) appends records again; those come
//! after the first ones, so they never win over them. A point record is not synced on its own
//! (a point lost in a crash is a point less, never a wrong one): the next set's sync carries it.
//!
//! Layout: `STATE/history/VOLUME/NNNNNNNNNNNNNNNNNNNN.undo` segments numbered in the order they
//! were started (log order: not set order, since a replay appends records of older sets), of
//! [`HEADER_LEN`]-byte records (CRC'd) followed by their data. Appends are written with
//! O_DIRECT, a set's records in one write of whole blocks: the block the last append ended in
//! is written again with the next, and a segment may end in zeroes up to the next block.
//! (Through the page cache the copy into fresh pages capped the applier at a fifth of the
//! disk's speed on the reference machine.)

use crate::disk::buf::{align_up, AlignedBuf, ALIGN};
use crate::env::{read_exact_at, write_all_at, write_back_and_sync, Fs, Handle, OpenOptions};
use crate::repl::apply::ApplyTarget;
use crate::repl::frame::DeltaSet;
use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MAGIC: u32 = 0x424d_5531; // "BMU1"
/// Bytes of a record's header.
pub const HEADER_LEN: usize = 56;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_POINT: u8 = 3;
/// A point thinned out (its record stays in its segment until retention drops it).
const KIND_DROP: u8 = 4;
const SUFFIX: &str = ".undo";
/// A new segment is started once the current one holds this much (old ones leave whole when
/// retention drops them).
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// The longest before-image record: a run of adjacent extents, or a piece of a long one (its
/// buffer is allocated whole, and reads of an export look this far back for records).
const MAX_RUN_BYTES: u64 = 4 << 20;
/// Before-images are appended once this many bytes of them are read (the applier's memory
/// for them stays near this plus one record).
const APPEND_BATCH_BYTES: usize = 8 << 20;

/// A recoverable point: the volume as it was right after `set` was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    pub set: u64,
    /// When it was applied, by the mirror's clock (Unix milliseconds).
    pub time_ms: u64,
    /// The primary's sequence number and generation the volume was consistent at.
    pub seq: u64,
    pub gen: u64,
}

/// One before-image in the log.
#[derive(Clone, Debug)]
struct Undo {
    /// Its place in log order (increasing along `History::undo`).
    id: u64,
    set: u64,
    offset: u64,
    len: u64,
    /// The range held zeroes (no data stored).
    zero: bool,
    segment: usize,
    data_pos: u64,
}

struct Segment {
    path: PathBuf,
    /// Reads, through the page cache.
    file: Handle,
    /// Appends, with O_DIRECT where the file system takes it: the last segment's only (the
    /// others are never appended to, and a long history must not hold twice the files open).
    writer: Option<Handle>,
    len: u64,
    /// The bytes of the block `len` ends in, written again with the next append.
    tail: Vec<u8>,
}

impl Segment {
    fn open(fs: &Fs, path: PathBuf, how: OpenOptions, len: u64, tail: Vec<u8>) -> io::Result<Self> {
        let file = fs.open(&path, how)?;
        debug_assert_eq!(tail.len() as u64, len % ALIGN as u64);
        Ok(Segment {
            path,
            file,
            writer: None,
            len,
            tail,
        })
    }

    /// Open it for appends (it is the last segment).
    fn writable(&mut self, fs: &Fs) -> io::Result<()> {
        if self.writer.is_none() {
            self.writer = Some(fs.open(&self.path, OpenOptions::write().direct())?);
        }
        Ok(())
    }
}

/// The bytes of the block `len` ends in (none when it ends on a block boundary).
fn tail_of(data: &[u8], len: usize) -> Vec<u8> {
    data[len - len % ALIGN..len].to_vec()
}

/// The undo log of one volume (module doc).
pub struct History {
    fs: Fs,
    dir: PathBuf,
    segments: Vec<Segment>,
    undo: Vec<Undo>,
    /// The before-images by (offset, id): a read of an export visits only those that overlap
    /// it, not the whole log.
    by_offset: BTreeSet<(u64, u64)>,
    /// The longest before-image indexed (how far before a read one may start and overlap).
    longest: u64,
    next_id: u64,
    points: Vec<Point>,
    /// The segment holding each point's record.
    point_segments: Vec<usize>,
    segment_bytes: u64,
    /// Bytes appended since it was opened (what keeping it costs, whatever retention frees).
    appended: u64,
    /// The number the next segment is named with.
    next_segment: u64,
    /// Bytes the log may hold (`--history-size`): a set whose before-images would take it
    /// past this is refused with `StorageFull`, as a full file system refuses it.
    cap: u64,
    /// The aligned buffer appends are written from (kept: sets come one after another).
    scratch: AlignedBuf,
    /// Why a sync of the log failed. Its last records may then never reach the disk whatever
    /// later syncs say (Linux marks pages whose writeback failed clean), and a record after
    /// them would sit behind a hole after a power cut: nothing more is appended until the log
    /// is opened again, which writes its last segment anew.
    failed: Option<String>,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A record's header: magic, kind, set, time, offset, length, aux (a point's generation),
/// the data's CRC, then the CRC of all that.
#[allow(clippy::too_many_arguments)]
fn header(
    kind: u8,
    set: u64,
    time_ms: u64,
    offset: u64,
    len: u64,
    aux: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC.to_be_bytes());
    h.push(kind);
    h.extend_from_slice(&[0; 3]);
    for v in [set, time_ms, offset, len, aux] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LEN);
    h
}

/// A parsed header: (kind, set, time_ms, offset, len, aux, data_crc).
type Parsed = (u8, u64, u64, u64, u64, u64, u32);

fn parse(h: &[u8]) -> Option<Parsed> {
    let u64_at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if h.len() < HEADER_LEN || u32_at(0) != MAGIC || crc32fast::hash(&h[..52]) != u32_at(52) {
        return None;
    }
    Some((
        h[4],
        u64_at(8),
        u64_at(16),
        u64_at(24),
        u64_at(32),
        u64_at(40),
        u32_at(48),
    ))
}

impl History {
    /// The log in `dir` (created if missing). A torn tail of the last segment (a crash while
    /// appending) is cut off; damage anywhere else is an error, never a shorter history.
    pub fn open(fs: Fs, dir: &Path) -> io::Result<History> {
        Self::open_with(fs, dir, SEGMENT_BYTES)
    }

    pub fn open_with(fs: Fs, dir: &Path, segment_bytes: u64) -> io::Result<History> {
        let names = crate::disk::segments::numbered_segments(&*fs, dir, SUFFIX)?;
        let mut h = History {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            undo: Vec::new(),
            by_offset: BTreeSet::new(),
            longest: 0,
            next_id: 0,
            points: Vec::new(),
            point_segments: Vec::new(),
            segment_bytes,
            appended: 0,
            next_segment: names.last().map_or(1, |(n, _)| n + 1),
            cap: u64::MAX,
            failed: None,
            scratch: AlignedBuf::zeroed(ALIGN),
        };
        let count = names.len();
        for (i, (_, path)) in names.into_iter().enumerate() {
            let file = fs.open(&path, OpenOptions::write())?;
            let data = crate::env::read_all(&*file)?;
            let seg = h.segments.len();
            let mut pos = 0usize;
            while pos + HEADER_LEN <= data.len() {
                let Some((kind, set, time_ms, offset, len, aux, crc)) =
                    parse(&data[pos..pos + HEADER_LEN])
                else {
                    break;
                };
                let stored = if kind == KIND_DATA { len as usize } else { 0 };
                let body = pos + HEADER_LEN;
                if body + stored > data.len() || crc32fast::hash(&data[body..body + stored]) != crc
                {
                    break;
                }
                match kind {
                    KIND_DATA | KIND_ZERO => h.push_undo(Undo {
                        id: 0,
                        set,
                        offset,
                        len,
                        zero: kind == KIND_ZERO,
                        segment: seg,
                        data_pos: body as u64,
                    }),
                    KIND_POINT => {
                        h.points.push(Point {
                            set,
                            time_ms,
                            seq: offset,
                            gen: aux,
                        });
                        h.point_segments.push(seg);
                    }
                    KIND_DROP => {
                        let mut i = 0;
                        while i < h.points.len() {
                            if h.points[i].set == set {
                                h.points.remove(i);
                                h.point_segments.remove(i);
                            } else {
                                i += 1;
                            }
                        }
                    }
                    _ => break,
                }
                pos = body + stored;
            }
            // Zeroes to the end of its last block: what an append left (module doc).
            let padding = data.len() <= align_up(pos) && data[pos..].iter().all(|&b| b == 0);
            if pos < data.len() && i + 1 < count && !padding {
                return Err(invalid(format!(
                    "{}: damaged at byte {pos} (not its tail): the history is not to be \
                     trusted",
                    path.display()
                )));
            }
            if i + 1 == count {
                // The only segment appended to since the last sync that worked (see `failed`):
                // made durable again, a torn tail cut off.
                if pos < data.len() {
                    file.set_len(pos as u64)?;
                }
                write_back_and_sync(&*file, &data[..pos])?;
            }
            drop(file);
            let tail = tail_of(&data, pos);
            let mut segment = Segment::open(&fs, path, OpenOptions::write(), pos as u64, tail)?;
            if i + 1 == count {
                segment.writable(&fs)?;
            }
            h.segments.push(segment);
        }
        // Retention writes the points it keeps from a segment it frees again, after newer
        // ones: in log order they are not in set order. Oldest first, each once (a crash
        // between the copy and the removal leaves both: the later copy is kept).
        let mut by_set: Vec<(Point, usize)> =
            h.points.drain(..).zip(h.point_segments.drain(..)).collect();
        by_set.sort_by_key(|(p, seg)| (p.set, std::cmp::Reverse(*seg)));
        by_set.dedup_by_key(|(p, _)| p.set);
        (h.points, h.point_segments) = by_set.into_iter().unzip();
        Ok(h)
    }

    /// The recoverable points, oldest first.
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// A before-image, next in log order (its id given here), indexed.
    fn push_undo(&mut self, mut u: Undo) {
        u.id = self.next_id;
        self.next_id += 1;
        self.by_offset.insert((u.offset, u.id));
        self.longest = self.longest.max(u.len);
        self.undo.push(u);
    }

    /// Drop the before-images `range` of `undo` (a prefix or a suffix), and their index.
    fn remove_undo(&mut self, range: std::ops::Range<usize>) {
        for u in self.undo.drain(range) {
            self.by_offset.remove(&(u.offset, u.id));
        }
    }

    /// The before-images overlapping `[offset, end)`, newest first.
    fn overlapping(&self, offset: u64, end: u64) -> Vec<&Undo> {
        let from = (offset.saturating_sub(self.longest), 0);
        let mut ids: Vec<u64> = self
            .by_offset
            .range(from..(end, 0))
            .map(|&(_, id)| id)
            .collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.into_iter()
            .map(|id| {
                let i = self
                    .undo
                    .binary_search_by_key(&id, |u| u.id)
                    .expect("indexed records are in the log");
                &self.undo[i]
            })
            .filter(|u| u.offset < end && offset < u.offset + u.len)
            .collect()
    }

    /// Bytes appended since the log was opened.
    pub fn appended_bytes(&self) -> u64 {
        self.appended
    }

    /// Bytes the log holds on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    fn append(&mut self, parts: &[&[u8]]) -> io::Result<(usize, u64)> {
        if let Some(why) = &self.failed {
            return Err(io::Error::other(why.clone()));
        }
        let need: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let start_new = self
            .segments
            .last()
            .is_none_or(|s| s.len > 0 && s.len + need > self.segment_bytes);
        if start_new {
            // What the full segment ends with (points, drops: not synced on their own) is
            // made durable first: a power cut must not leave a hole before a later segment.
            if !self.segments.is_empty() {
                self.sync_last()?;
            }
            let path = self.dir.join(format!("{:020}{SUFFIX}", self.next_segment));
            self.next_segment += 1;
            let how = OpenOptions::write().create().truncate();
            let mut segment = Segment::open(&self.fs, path, how, 0, Vec::new())?;
            segment.writable(&self.fs)?;
            self.fs.sync_dir(&self.dir)?;
            if let Some(last) = self.segments.last_mut() {
                last.writer = None;
            }
            self.segments.push(segment);
        }
        let seg = self.segments.len() - 1;
        let s = &mut self.segments[seg];
        // One write of whole blocks from the block `len` ends in: its bytes again, the parts,
        // zeroes to the end of the last block.
        let kept = s.tail.len();
        let total = kept + need as usize;
        let padded = align_up(total);
        if self.scratch.capacity() < padded {
            self.scratch = AlignedBuf::zeroed(padded);
        }
        self.scratch.set_len(padded);
        let buf = &mut self.scratch[..];
        buf[..kept].copy_from_slice(&s.tail);
        let mut at = kept;
        for p in parts {
            buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        buf[total..].fill(0);
        let start = s.len;
        let writer = s
            .writer
            .as_ref()
            .expect("the last segment is open for appends");
        if let Err(e) = write_all_at(&**writer, buf, start - kept as u64) {
            // A write cut short (a full file system) may have left bytes past `len`: cut
            // them, or a later segment would find more than padding after this one's records.
            let _ = s.file.set_len(s.len);
            return Err(e);
        }
        s.len = start + need;
        s.tail = tail_of(buf, total);
        self.appended += need;
        Ok((seg, start))
    }

    /// Save what the ranges `extents` (offset, length) of the volume hold now, before set
    /// `set` overwrites them, and make it durable. `read` reads the volume.
    pub fn before_apply(
        &mut self,
        set: u64,
        extents: &[(u64, u64)],
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        let need: u64 = extents.iter().map(|&(_, l)| l + HEADER_LEN as u64).sum();
        // Refused only while an older point could give way (by age, or by policy): with one
        // point left, every record kept is needed by it, and refusing would wait for good
        // (a set, or a staged resync, larger than the cap goes past it; the next point lets
        // retention act again).
        if self.points.len() >= 2 && self.bytes().saturating_add(need) > self.cap {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "the history is at its cap of {} bytes (--history-size)",
                    self.cap
                ),
            ));
        }
        // Adjacent extents (a sequential writer's) are read and kept as one record: one read
        // of the volume instead of one per NBD write, which was most of the applier's time.
        // Runs, and extents, are cut at MAX_RUN_BYTES. (A set's extents do not overlap: their
        // order does not matter.)
        let mut sorted = extents.to_vec();
        sorted.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
        for &(offset, len) in &sorted {
            let (mut at, end) = (offset, offset + len);
            while at < end {
                let piece = (end - at).min(MAX_RUN_BYTES);
                match runs.last_mut() {
                    Some(run) if run.0 + run.1 == at && run.1 + piece <= MAX_RUN_BYTES => {
                        run.1 += piece;
                    }
                    _ => runs.push((at, piece)),
                }
                at += piece;
            }
        }
        // Appended a batch of records at a time (a set may TRIM gigabytes: what they held
        // must not all be in memory at once), then one sync.
        let mut batch: Vec<(u64, u64, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0;
        for (i, &(offset, len)) in runs.iter().enumerate() {
            let mut data = vec![0u8; len as usize];
            read(offset, &mut data)?;
            if data.iter().all(|&b| b == 0) {
                data = Vec::new();
            }
            let kind = if data.is_empty() {
                KIND_ZERO
            } else {
                KIND_DATA
            };
            batch_bytes += HEADER_LEN + data.len();
            batch.push((
                offset,
                len,
                header(kind, set, 0, offset, len, 0, &data),
                data,
            ));
            if batch_bytes >= APPEND_BATCH_BYTES || i + 1 == runs.len() {
                self.append_records(set, &batch)?;
                batch.clear();
                batch_bytes = 0;
            }
        }
        self.sync_last()
    }

    /// Append before-images of `set` ((offset, len, header, data) each) and index them.
    fn append_records(
        &mut self,
        set: u64,
        batch: &[(u64, u64, Vec<u8>, Vec<u8>)],
    ) -> io::Result<()> {
        let parts: Vec<&[u8]> = batch
            .iter()
            .flat_map(|(_, _, h, d)| [&h[..], &d[..]])
            .collect();
        let (segment, start) = self.append(&parts)?;
        let mut at = start;
        for (offset, len, _, data) in batch {
            self.push_undo(Undo {
                id: 0,
                set,
                offset: *offset,
                len: *len,
                zero: data.is_empty(),
                segment,
                data_pos: at + HEADER_LEN as u64,
            });
            at += (HEADER_LEN + data.len()) as u64;
        }
        Ok(())
    }

    /// Why a sync of the log failed, if one did since it was opened (nothing more is
    /// appended until it is opened again: see `failed`).
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Sync the segment appended to; a failure is kept (see `failed`).
    fn sync_last(&mut self) -> io::Result<()> {
        let synced = self.segments.last().expect("a segment").file.sync_data();
        synced.map_err(|e| {
            let why = format!(
                "the history's log failed a sync ({e}): its last records may not be on the \
                 disk; restart the mirror once its disk is fixed"
            );
            self.failed = Some(why.clone());
            io::Error::new(e.kind(), why)
        })
    }

    /// The volume is consistent right after `set` (at the primary's `seq` of generation
    /// `gen`), applied at `time_ms` by this host's clock: a recoverable point.
    pub fn point(&mut self, p: Point) -> io::Result<()> {
        if self.points.last().is_some_and(|l| l.set >= p.set) {
            return Ok(());
        }
        let h = header(KIND_POINT, p.set, p.time_ms, p.seq, 0, p.gen, &[]);
        let (segment, _) = self.append(&[&h])?;
        self.points.push(p);
        self.point_segments.push(segment);
        Ok(())
    }

    /// Forget the points at `sets` (thinning): the before-images stay, so every point kept
    /// reads as before. Like a point, a drop is not synced on its own: lost in a crash, the
    /// point is simply still there.
    pub fn drop_points(&mut self, sets: &[u64]) -> io::Result<()> {
        for &set in sets {
            let Some(i) = self.points.iter().position(|p| p.set == set) else {
                continue;
            };
            self.drop_records(&[set])?;
            self.points.remove(i);
            self.point_segments.remove(i);
        }
        Ok(())
    }

    /// A drop record for each of `sets` (not synced here).
    fn drop_records(&mut self, sets: &[u64]) -> io::Result<()> {
        for &set in sets {
            let h = header(KIND_DROP, set, 0, 0, 0, 0, &[]);
            self.append(&[&h])?;
        }
        Ok(())
    }

    fn undo_data(&self, u: &Undo, out: &mut [u8], from: u64) -> io::Result<()> {
        if u.zero {
            out.fill(0);
            return Ok(());
        }
        read_exact_at(&*self.segments[u.segment].file, out, u.data_pos + from)
    }

    /// Read `out` at `offset` as the volume was at point `set`: `live` reads the volume now
    /// (the caller keeps the applier from writing meanwhile).
    pub fn read_at(
        &self,
        set: u64,
        offset: u64,
        out: &mut [u8],
        live: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        live(offset, out)?;
        let end = offset + out.len() as u64;
        // Newest first, so that the oldest record after the point is the one left.
        for u in self
            .overlapping(offset, end)
            .into_iter()
            .filter(|u| u.set > set)
        {
            let (a, b) = (u.offset.max(offset), (u.offset + u.len).min(end));
            if a >= b {
                continue;
            }
            let dst = &mut out[(a - offset) as usize..(b - offset) as usize];
            self.undo_data(u, dst, a - u.offset)?;
        }
        Ok(())
    }

    /// Bring the volume back to point `set`: `write` gets the old content to write, newest
    /// record first. The records after the point are then dropped from the log, as are the
    /// points after it (the volume is at `set` again; what follows is a new history).
    pub fn restore(
        &mut self,
        set: u64,
        write: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.restore_writes(set, write)?;
        self.forget_after(set)
    }

    /// [`History::restore`]'s writes only (the caller makes them durable and records the
    /// volume's new position, then calls [`History::forget_after`]).
    pub fn restore_writes(
        &self,
        set: u64,
        write: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if !self.points.iter().any(|p| p.set == set) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no recoverable point at set {set}"),
            ));
        }
        let mut buf = Vec::new();
        for u in self.undo.iter().rev().filter(|u| u.set > set) {
            buf.resize(u.len as usize, 0);
            self.undo_data(u, &mut buf, 0)?;
            write(u.offset, &buf)?;
        }
        Ok(())
    }

    /// The highest set with a record (0: none).
    pub fn last_set(&self) -> u64 {
        let undo = self.undo.iter().map(|u| u.set).max().unwrap_or(0);
        undo.max(self.points.last().map_or(0, |p| p.set))
    }

    /// Forget everything (the volume is not the one the history describes: a replaced disk).
    pub fn clear(&mut self) -> io::Result<()> {
        for s in self.segments.drain(..) {
            self.fs.remove_file(&s.path)?;
        }
        self.remove_undo(0..self.undo.len());
        self.points.clear();
        self.point_segments.clear();
        self.fs.sync_dir(&self.dir)
    }

    /// The newest point at or before `time_ms` (by this host's clock).
    pub fn point_at(&self, time_ms: u64) -> Option<Point> {
        self.points
            .iter()
            .rev()
            .find(|p| p.time_ms <= time_ms)
            .copied()
    }

    /// Retention: forget the points before `set` (which must be a point) and the segments
    /// only they needed: a segment goes once every record in it is of a set up to `set` (only
    /// the records of later sets bring the volume back to `set` or after). Returns the bytes
    /// freed. Only the mirror's own retention (its clock, its caps) calls this: nothing the
    /// primary sends can.
    pub fn retain_from(&mut self, set: u64) -> io::Result<u64> {
        if !self.points.iter().any(|p| p.set == set) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no recoverable point at set {set}"),
            ));
        }
        let first = self
            .points
            .iter()
            .position(|p| p.set >= set)
            .expect("checked");
        let dropped: Vec<(u64, usize)> = self
            .points
            .drain(..first)
            .map(|p| p.set)
            .zip(self.point_segments.drain(..first))
            .collect();
        // The segments that go: from the front, while none holds a record a kept point needs
        // (the last one always stays).
        let needed = self
            .undo
            .iter()
            .find(|u| u.set > set)
            .map_or(usize::MAX, |u| u.segment);
        let removable = needed.min(self.segments.len().saturating_sub(1));
        // A point dropped here whose record is in a segment kept (written again there by an
        // earlier retention, after newer records) would come back at the next open with its
        // before-images gone: a drop record says it is gone, durably, before any goes.
        let kept_records: Vec<u64> = dropped
            .iter()
            .filter(|&&(_, seg)| seg >= removable)
            .map(|&(set, _)| set)
            .collect();
        if !kept_records.is_empty() {
            self.drop_records(&kept_records)?;
            self.sync_last()?;
        }
        let mut freed = 0;
        for _ in 0..removable {
            let s = self.segments.remove(0);
            freed += s.len;
            self.fs.remove_file(&s.path)?;
            let gone = self.undo.iter().take_while(|u| u.segment == 0).count();
            debug_assert!(self.undo[gone..].iter().all(|u| u.segment != 0));
            self.remove_undo(0..gone);
            for u in &mut self.undo {
                u.segment -= 1;
            }
            // Points kept whose records were in it are written again, after the removal, so
            // that a full file system gets its room first (a crash in between loses those
            // points: a point less, never a wrong one).
            let mut moved = Vec::new();
            for (i, seg) in self.point_segments.iter_mut().enumerate() {
                match seg.checked_sub(1) {
                    Some(s) => *seg = s,
                    None => moved.push(i),
                }
            }
            for &i in &moved {
                let p = self.points[i];
                let h = header(KIND_POINT, p.set, p.time_ms, p.seq, 0, p.gen, &[]);
                let (segment, _) = self.append(&[&h])?;
                self.point_segments[i] = segment;
            }
            if !moved.is_empty() {
                self.sync_last()?;
            }
        }
        self.fs.sync_dir(&self.dir)?;
        Ok(freed)
    }

    /// Drop every record from the first one of a set after `set` on (log order).
    pub fn forget_after(&mut self, set: u64) -> io::Result<()> {
        let cut = self.undo.iter().position(|u| u.set > set);
        let point_cut = self.points.iter().position(|p| p.set > set);
        self.points.truncate(point_cut.unwrap_or(self.points.len()));
        self.point_segments.truncate(self.points.len());
        let Some(cut) = cut else { return Ok(()) };
        let first = self.undo[cut].clone();
        let cut_at = first.data_pos - HEADER_LEN as u64;
        for s in self.segments.drain(first.segment + 1..) {
            self.fs.remove_file(&s.path)?;
        }
        let s = &mut self.segments[first.segment];
        s.file.set_len(cut_at)?;
        s.len = cut_at;
        let from = cut_at - cut_at % ALIGN as u64;
        let mut tail = vec![0u8; (cut_at - from) as usize];
        read_exact_at(&*s.file, &mut tail, from)?;
        s.tail = tail;
        s.writable(&self.fs)?;
        self.sync_last()?;
        self.remove_undo(cut..self.undo.len());
        self.fs.sync_dir(&self.dir)
    }
}

/// How long and how much history a mirror keeps (`--history`, `--history-size`; None: the
/// volume's size), and how its older points are thinned (`--history-thin`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub keep: Duration,
    pub max_bytes: Option<u64>,
    pub thin: Vec<Tier>,
    pub when_full: WhenFull,
}

/// What a full history does (`--history-full`): its cap reached or its file system full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Applying waits until points age out of the retention (or the admin acts): nothing the
    /// primary sends can push out a point younger than `--history`, a flood of writes (a
    /// disk encrypted by ransomware) included. The mirror falls behind meanwhile; the primary
    /// goes on through its journal and dirty map.
    Wait,
    /// The oldest points go to make room: replication never waits for the history, which a
    /// flood of writes can shorten.
    DropOldest,
}

/// Points older than `older_than` are kept one per `every` (the oldest of each `every`-long
/// slice of the mirror's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    pub older_than: Duration,
    pub every: Duration,
}

/// Every point of the last hour, one a minute for a day, one an hour beyond (as Zerto and
/// AWS DRS thin their journals): a day of history lists about 1,400 points whatever the rate
/// of sets.
pub const DEFAULT_THINNING: &str = "1h:1m,1d:1h";

/// `AGE:EVERY,...` (durations as `parse`s them), ages and intervals both increasing, each
/// interval a multiple of the one before (so that a point kept in a coarser tier was kept in
/// the finer one: thinning never needs a point it already dropped); `none` keeps every point.
pub fn parse_thinning(
    s: &str,
    parse: impl Fn(&str) -> Result<Duration, String>,
) -> Result<Vec<Tier>, String> {
    if s == "none" {
        return Ok(Vec::new());
    }
    let mut tiers: Vec<Tier> = Vec::new();
    for part in s.split(',') {
        let (age, every) = part
            .split_once(':')
            .ok_or_else(|| format!("{part:?}: AGE:EVERY expected (e.g. 1h:1m)"))?;
        let t = Tier {
            older_than: parse(age)?,
            every: parse(every)?,
        };
        if let Some(prev) = tiers.last() {
            if t.older_than <= prev.older_than
                || t.every <= prev.every
                || !t.every.as_millis().is_multiple_of(prev.every.as_millis())
            {
                return Err(format!(
                    "{part:?}: each tier must be older and sparser than the one before, its \
                     interval a multiple of the one before ({s:?})"
                ));
            }
        }
        tiers.push(t);
    }
    Ok(tiers)
}

/// A volume's history as the mirror keeps it: the log, the pace of its points, its retention.
pub struct Keeper {
    pub log: History,
    pub keep: Duration,
    pub max_bytes: u64,
    pub thin: Vec<Tier>,
    pub when_full: WhenFull,
    /// Points being served (`blkmirror export`): retention keeps them and every later one.
    pins: Vec<u64>,
}

impl Keeper {
    pub fn dir(state_dir: &Path, volume: &str) -> PathBuf {
        state_dir.join("history").join(volume)
    }

    /// The history of `volume` (of `volume_bytes`) in `state_dir`.
    pub fn open(
        fs: Fs,
        state_dir: &Path,
        volume: &str,
        volume_bytes: u64,
        retention: Retention,
    ) -> io::Result<Keeper> {
        let max_bytes = retention.max_bytes.unwrap_or(volume_bytes);
        // Segments small enough that the cap frees space in steps of an eighth of it.
        let segment = (max_bytes / 8).clamp(1 << 20, SEGMENT_BYTES);
        // The cap holds from `opened` on: the redo log's replay before it brings back sets
        // already acknowledged, whose before-images must be kept whatever they cost.
        let log = History::open_with(fs, &Self::dir(state_dir, volume), segment)?;
        Ok(Keeper {
            log,
            keep: retention.keep,
            max_bytes,
            thin: retention.thin,
            when_full: retention.when_full,
            pins: Vec::new(),
        })
    }

    /// The volume was checkpointed at `state` (synced, saved), at `now_ms` by this host's
    /// clock: a point if it is consistent and moved since the last one, then the retention.
    /// Checkpoints come at most every 100 ms while sets arrive: a point per set would cost a
    /// record per set, thousands a second (every set keeps its before-images all the same).
    /// Time only moves forward here: a clock stepped back does not reorder points.
    pub fn checkpointed(
        &mut self,
        state: &crate::repl::apply::VolumeState,
        now_ms: u64,
    ) -> io::Result<()> {
        let (true, Some(gen)) = (state.consistent(), state.position_gen) else {
            return Ok(());
        };
        if state.holds_given_up_writes() {
            // Not the state it names: no point until the resync replaced those writes.
            return Ok(());
        }
        let last = self.log.points().last().copied();
        if last.is_some_and(|l| l.set >= state.applied_set) {
            return Ok(());
        }
        self.log.point(Point {
            set: state.applied_set,
            time_ms: now_ms.max(last.map_or(0, |l| l.time_ms)),
            seq: state.applied_seq,
            gen: gen.0,
        })?;
        self.enforce(now_ms)
    }

    /// At start, after the replay, with the volume's state `state` (at `now_ms`): a history
    /// of another disk (the volume changed) or ahead of the state (the state was lost or
    /// restored) describes nothing here and is dropped (returns why); then the state is a
    /// point if it is consistent.
    pub fn opened(
        &mut self,
        state: &crate::repl::apply::VolumeState,
        now_ms: u64,
    ) -> io::Result<Option<&'static str>> {
        let why = if state.volume_changed.is_some() {
            Some("the volume's disk changed")
        } else if self.log.last_set() > state.applied_set {
            Some("the mirror's state is older than its history (was it restored?)")
        } else {
            None
        };
        if why.is_some() {
            self.log.clear()?;
        }
        self.log.cap = self.max_bytes;
        self.checkpointed(state, now_ms)?;
        Ok(why)
    }

    /// Keep point `set` (and every later one) until [`Keeper::unpin`]: it is being served.
    pub fn pin(&mut self, set: u64) -> io::Result<Point> {
        let p = self.log.points().iter().find(|p| p.set == set).copied();
        let p = p.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no recoverable point at set {set} (see `blkmirror history`)"),
            )
        })?;
        self.pins.push(set);
        Ok(p)
    }

    /// The history is full (its cap, or the file system it shares with the mirror's state):
    /// at `now_ms`, drop what retention lets go (points older than `--history`), and with
    /// [`WhenFull::DropOldest`] the oldest points too (never a pinned one, never the newest)
    /// until some space is freed. True when anything was dropped (try the set again: room
    /// was freed, or one point is left and the cap no longer refuses); false when nothing
    /// could be: the set waits.
    pub fn make_room(&mut self, now_ms: u64) -> io::Result<bool> {
        let (bytes, points) = (self.log.bytes(), self.log.points().len());
        let changed = |k: &Keeper| k.log.bytes() < bytes || k.log.points().len() < points;
        // Not the thinning: its drop records would need room first.
        self.retire(now_ms)?;
        if changed(self) || self.when_full == WhenFull::Wait {
            return Ok(changed(self));
        }
        let pinned = self.pins.iter().min().copied().unwrap_or(u64::MAX);
        loop {
            let points = self.log.points();
            if points.len() < 2 || points[0].set >= pinned {
                return Ok(changed(self));
            }
            let next = points[1].set;
            if self.log.retain_from(next)? > 0 {
                return Ok(true);
            }
        }
    }

    pub fn unpin(&mut self, set: u64) {
        if let Some(i) = self.pins.iter().position(|&s| s == set) {
            self.pins.swap_remove(i);
        }
    }

    /// The points the thinning tiers drop at `now_ms`: in each tier, all but the oldest of
    /// each `every`-long slice of time; never the newest point nor a pinned one.
    fn thinned(&self, now_ms: u64) -> Vec<u64> {
        let points = self.log.points();
        let Some((newest, older)) = points.split_last() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut kept_slice: Option<(u128, u64)> = None;
        for p in older {
            let age = Duration::from_millis(now_ms.saturating_sub(p.time_ms));
            let Some(tier) = self.thin.iter().rev().find(|t| age >= t.older_than) else {
                continue;
            };
            let every = tier.every.as_millis().max(1);
            let slice = (every, p.time_ms / every as u64);
            if kept_slice == Some(slice) && !self.pins.contains(&p.set) && p.set != newest.set {
                out.push(p.set);
            } else {
                kept_slice = Some(slice);
            }
        }
        out
    }

    /// Thin the older points, drop points older than the retention, then (`DropOldest`) the
    /// oldest while over the cap; the newest point always stays, and so does every point from
    /// the oldest pinned one on.
    fn enforce(&mut self, now_ms: u64) -> io::Result<()> {
        let thinned = self.thinned(now_ms);
        self.log.drop_points(&thinned)?;
        self.retire(now_ms)
    }

    /// Retention alone: points older than `--history`, then (`DropOldest`) the oldest while
    /// over the cap.
    fn retire(&mut self, now_ms: u64) -> io::Result<()> {
        let cutoff = now_ms.saturating_sub(self.keep.as_millis() as u64);
        let pinned = self.pins.iter().min().copied().unwrap_or(u64::MAX);
        let points = self.log.points();
        let first_kept = points
            .iter()
            .position(|p| p.time_ms >= cutoff || p.set >= pinned)
            .unwrap_or(points.len() - 1);
        if first_kept > 0 {
            let set = points[first_kept].set;
            self.log.retain_from(set)?;
        }
        while self.when_full == WhenFull::DropOldest
            && self.log.bytes() > self.max_bytes
            && self.log.points().len() > 1
            && self.log.points()[0].set < pinned
        {
            let next = self.log.points()[1].set;
            self.log.retain_from(next)?;
        }
        Ok(())
    }

    /// The points, oldest first, each with the bytes of before-images kept for going back to
    /// it (what `recover` would write).
    pub fn listing(&self) -> Vec<(Point, u64)> {
        let mut sets: Vec<(u64, u64)> = self.log.undo.iter().map(|u| (u.set, u.len)).collect();
        sets.sort_unstable();
        let mut out = Vec::with_capacity(self.log.points.len());
        let mut after = 0u64;
        let mut i = sets.len();
        for p in self.log.points.iter().rev() {
            while i > 0 && sets[i - 1].0 > p.set {
                i -= 1;
                after += sets[i].1;
            }
            out.push((*p, after));
        }
        out.reverse();
        out
    }
}

/// An applier that saves the blocks each set overwrites in the history first.
pub struct WithHistory<'a> {
    pub target: &'a mut dyn ApplyTarget,
    pub history: &'a mut History,
}

/// A failure of the history (its file system full, failing), told apart from the volume's.
#[derive(Debug, thiserror::Error)]
#[error("history: {0}")]
pub struct HistoryError(pub io::Error);

impl HistoryError {
    /// The history error inside `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<&HistoryError> {
        e.get_ref().and_then(|i| i.downcast_ref::<HistoryError>())
    }
}

impl ApplyTarget for WithHistory<'_> {
    fn apply(&mut self, set: &DeltaSet) -> io::Result<()> {
        // Before the first point there is nothing to go back to (an initial copy): no
        // before-images to read and keep.
        if !self.history.points().is_empty() {
            let ranges: Vec<(u64, u64)> = set
                .extents
                .iter()
                .filter(|e| !e.is_empty())
                .map(|e| (e.offset, e.len()))
                .collect();
            let target = &mut *self.target;
            self.history
                .before_apply(set.set, &ranges, &mut |o, out| target.read(o, out))
                .map_err(|e| io::Error::new(e.kind(), HistoryError(e)))?;
        }
        self.target.apply(set)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.target.sync()
    }

    fn read(&mut self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.target.read(offset, out)
    }

    fn fingerprint(&self) -> io::Result<crate::disk::fingerprint::Fingerprint> {
        self.target.fingerprint()
    }

    fn holds_data(&self) -> io::Result<bool> {
        self.target.holds_data()
    }
}

/// A point at `set`, `time_ms` (tests).
#[cfg(test)]
fn test_point(set: u64, time_ms: u64) -> Point {
    Point {
        set,
        time_ms,
        seq: set,
        gen: 1,
    }
}

/// The whole of `vol` (the volume now) as it was at point `set` (tests).
#[cfg(test)]
fn view_at(h: &History, set: u64, vol: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; vol.len()];
    h.read_at(set, 0, &mut out, &mut |o, b| {
        b.copy_from_slice(&vol[o as usize..o as usize + b.len()]);
        Ok(())
    })
    .expect("a point's before-images read");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::mem::MemFs;

    const SIZE: usize = 64 << 10;

    /// A volume in memory with a history: sets of (offset, byte, len) writes.
    struct Rig {
        fs: MemFs,
        vol: Vec<u8>,
        h: History,
        /// The volume after each point.
        states: Vec<(u64, Vec<u8>)>,
    }

    impl Rig {
        fn new() -> Rig {
            let fs = MemFs::new();
            let h = History::open_with(Arc::new(fs.clone()), Path::new("/h/v"), 8 << 10).unwrap();
            Rig {
                fs,
                vol: vec![0; SIZE],
                h,
                states: Vec::new(),
            }
        }

        fn apply(&mut self, set: u64, writes: &[(usize, u8, usize)]) {
            let extents: Vec<(u64, u64)> = writes
                .iter()
                .map(|&(o, _, l)| (o as u64, l as u64))
                .collect();
            let vol = self.vol.clone();
            self.h
                .before_apply(set, &extents, &mut |o, out| {
                    out.copy_from_slice(&vol[o as usize..o as usize + out.len()]);
                    Ok(())
                })
                .unwrap();
            for &(o, b, l) in writes {
                self.vol[o..o + l].fill(b);
            }
        }

        fn point(&mut self, set: u64) {
            self.h
                .point(Point {
                    set,
                    time_ms: 1000 + set,
                    seq: set * 10,
                    gen: 7,
                })
                .unwrap();
            self.states.push((set, self.vol.clone()));
        }

        fn view(&self, set: u64) -> Vec<u8> {
            view_at(&self.h, set, &self.vol)
        }
    }

    use std::sync::Arc;

    fn workload(r: &mut Rig) {
        let mut x = 12345u64;
        for set in 1..=40u64 {
            let mut writes = Vec::new();
            for _ in 0..3 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let o = ((x >> 33) as usize % (SIZE / 512 - 8)) * 512;
                let l = 512 * (1 + (x >> 20) as usize % 6);
                // Non-overlapping within a set, as delta sets are.
                if writes
                    .iter()
                    .all(|&(wo, _, wl): &(usize, u8, usize)| o + l <= wo || wo + wl <= o)
                {
                    writes.push((o, (set % 250) as u8 + 1, l));
                }
            }
            r.apply(set, &writes);
            if set % 3 != 0 {
                r.point(set);
            }
        }
    }

    /// A full file system cuts an append short, a smaller append follows (a thinned point),
    /// then a set that starts a new segment: the log still opens, and every point reads as
    /// the volume was. (The bytes the cut append left past the records made the segment look
    /// damaged once it was no longer the last.)
    #[test]
    fn an_append_cut_short_leaves_nothing_behind_its_records() {
        use crate::env::mem::Faults;
        let mut r = Rig::new();
        r.h = History::open_with(Arc::new(r.fs.clone()), Path::new("/h/v"), 64 << 10).unwrap();
        r.apply(1, &[(0, 1, 32768)]);
        r.point(1);
        r.apply(2, &[(0, 2, 32768)]);
        r.point(2);
        r.point(3);
        // 16 KiB of before-images would fit the segment; the file system takes 8 KiB of them.
        r.fs.set_faults(Faults {
            capacity: Some(r.fs.used_bytes() + 8192),
            ..Default::default()
        });
        let vol = r.vol.clone();
        let failed = r.h.before_apply(4, &[(0, 16384)], &mut |o, out| {
            out.copy_from_slice(&vol[o as usize..o as usize + out.len()]);
            Ok(())
        });
        assert!(failed.is_err(), "the file system is full");
        assert_eq!(r.h.segments.len(), 1);
        r.fs.set_faults(Faults::default());
        r.h.drop_points(&[2]).unwrap();
        r.states.retain(|(set, _)| *set != 2);
        r.apply(4, &[(0, 4, 32768)]);
        r.point(4);
        assert_eq!(r.h.segments.len(), 2, "the set started a new segment");
        r.h = History::open_with(Arc::new(r.fs.clone()), Path::new("/h/v"), 64 << 10).unwrap();
        for (set, state) in r.states.clone() {
            assert!(r.view(set) == state, "point {set} reads wrong");
        }
    }

    /// A sync of the log fails: nothing more is appended (a record after the failed ones
    /// would sit behind a hole after a power cut, Linux having marked their pages clean);
    /// opened again after a restart, the log writes its last segment anew, and after a power
    /// cut every point still reads exactly as the volume was.
    #[test]
    fn a_failed_sync_stops_appends_until_reopened_and_loses_nothing() {
        use crate::env::mem::Faults;
        let reopen = |fs: &MemFs| {
            History::open_with(Arc::new(fs.clone()), Path::new("/h/v"), 1 << 20).unwrap()
        };
        for seed in 0..20 {
            let mut r = Rig::new();
            r.h = reopen(&r.fs);
            r.point(1);
            r.apply(2, &[(0, 2, 4096), (16384, 2, 16384)]);
            r.point(2);
            r.fs.set_faults(Faults {
                failing_syncs: 1,
                ..Default::default()
            });
            let vol = r.vol.clone();
            let mut read = |o: u64, out: &mut [u8]| {
                out.copy_from_slice(&vol[o as usize..o as usize + out.len()]);
                Ok(())
            };
            // Before-images of 16 KiB: whole blocks of the log that only they fill.
            let e =
                r.h.before_apply(3, &[(16384, 16384)], &mut read)
                    .unwrap_err();
            assert!(e.to_string().contains("restart the mirror"), "{e}");
            assert!(r.h.failed().is_some());
            assert!(
                r.h.before_apply(3, &[(16384, 16384)], &mut read).is_err(),
                "nothing is appended after a failed sync"
            );
            // The mirror restarts (its set 3 was never applied) and goes on.
            r.fs.restart();
            r.h = reopen(&r.fs);
            assert!(r.h.failed().is_none());
            r.apply(3, &[(16384, 3, 16384)]);
            r.point(3);
            r.apply(4, &[(0, 4, 512)]);
            r.h.sync_last().unwrap();
            r.fs.crash(&mut crate::sim::rng::Prng::new(seed));
            r.h = reopen(&r.fs);
            let sets: Vec<u64> = r.h.points().iter().map(|p| p.set).collect();
            assert_eq!(sets, vec![1, 2, 3], "seed {seed}");
            for (set, state) in r.states.clone() {
                assert!(r.view(set) == state, "seed {seed}: point {set} reads wrong");
            }
        }
    }

    /// Every point reads back exactly as the volume was then, while the volume has moved on.
    #[test]
    fn every_point_reads_as_the_volume_was() {
        let mut r = Rig::new();
        workload(&mut r);
        assert!(r.h.segments.len() > 1, "several segments were used");
        for (set, state) in r.states.clone() {
            assert!(r.view(set) == state, "point {set}");
        }
        // Reads of a part (an export's), at every alignment: only the records overlapping it
        // are visited, and they are the right ones.
        let mut x = 99u64;
        for (set, state) in r.states.clone() {
            for _ in 0..20 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let offset = (x >> 35) as usize % SIZE;
                let len = 1 + (x >> 13) as usize % (SIZE - offset).min(5000);
                let mut out = vec![0; len];
                let vol = &r.vol;
                r.h.read_at(set, offset as u64, &mut out, &mut |o, b| {
                    b.copy_from_slice(&vol[o as usize..o as usize + b.len()]);
                    Ok(())
                })
                .unwrap();
                assert!(
                    out == state[offset..offset + len],
                    "point {set} at {offset}+{len}"
                );
            }
        }
    }

    /// After a restart (records synced, points possibly not), the same; a set applied again
    /// (a redo replay) changes nothing; a torn tail is cut.
    #[test]
    fn a_restart_keeps_the_points_and_a_replay_changes_nothing() {
        let mut r = Rig::new();
        workload(&mut r);
        // The redo log replays the last sets after a crash: their records again, enough of
        // them to start new segments (which must come after the older ones in log order,
        // whatever the sets' numbers).
        let vol = r.vol.clone();
        let segments = r.h.segments.len();
        for set in 30..=39 {
            r.h.before_apply(set, &[(0, 4096)], &mut |o, out| {
                out.copy_from_slice(&vol[o as usize..o as usize + out.len()]);
                Ok(())
            })
            .unwrap();
        }
        assert!(
            r.h.segments.len() > segments,
            "the replay started a segment"
        );
        r.fs.restart();
        let h = History::open_with(Arc::new(r.fs.clone()), Path::new("/h/v"), 8 << 10).unwrap();
        assert!(!h.points().is_empty());
        r.h = h;
        let kept: Vec<u64> = r.h.points().iter().map(|p| p.set).collect();
        for (set, state) in r.states.clone() {
            if kept.contains(&set) {
                assert!(r.view(set) == state, "point {set} after the restart");
            }
        }
    }

    /// Retention drops the old points and the segments only they needed; every point kept
    /// still reads exactly, and the volume can still be brought back to the oldest.
    #[test]
    fn retention_frees_old_segments_and_keeps_later_points_exact() {
        let mut r = Rig::new();
        workload(&mut r);
        let before = r.h.bytes();
        let appended = r.h.appended_bytes();
        let (keep, _) = r.states[15];
        let freed = r.h.retain_from(keep).unwrap();
        // (Points kept whose records were in a freed segment are written again.)
        let rewritten = r.h.appended_bytes() - appended;
        assert!(
            freed > 0 && r.h.bytes() == before - freed + rewritten,
            "{freed} of {before} freed, {rewritten} written again, now {}",
            r.h.bytes()
        );
        assert_eq!(r.h.points().first().map(|p| p.set), Some(keep));
        let h = History::open_with(Arc::new(r.fs.clone()), Path::new("/h/v"), 8 << 10).unwrap();
        assert_eq!(h.bytes(), r.h.bytes(), "what was freed stays freed");
        assert_eq!(
            h.points(),
            r.h.points(),
            "the points kept are kept after a restart"
        );
        r.h = h;
        for (set, state) in r.states.clone().into_iter().filter(|(s, _)| *s >= keep) {
            assert!(r.view(set) == state, "point {set}");
        }
        assert_eq!(
            r.h.point_at(1000 + keep).map(|p| p.set),
            Some(keep),
            "the point applied at that time"
        );
    }

    /// Restoring a point writes the volume back to it exactly; the later points are gone and
    /// new sets make a new history from there.
    #[test]
    fn restore_brings_the_volume_back_and_history_goes_on() {
        let mut r = Rig::new();
        workload(&mut r);
        let (set, state) = r.states[8].clone();
        let mut vol = r.vol.clone();
        r.h.restore(set, &mut |o, data| {
            vol[o as usize..o as usize + data.len()].copy_from_slice(data);
            Ok(())
        })
        .unwrap();
        assert!(vol == state, "the volume is as it was at set {set}");
        assert_eq!(r.h.points().last().map(|p| p.set), Some(set));
        assert!(
            r.h.restore(set + 1, &mut |_, _| Ok(())).is_err(),
            "later points are gone"
        );
        r.vol = vol;
        r.states.truncate(9);
        r.apply(100, &[(0, 0xAA, 4096)]);
        r.point(100);
        for (s, st) in r.states.clone() {
            assert!(r.view(s) == st, "point {s}");
        }
    }
}

#[cfg(test)]
mod crash_tests {
    use super::*;
    use crate::env::mem::MemFs;
    use std::sync::Arc;

    fn point(set: u64) -> Point {
        test_point(set, set * 1000)
    }

    /// Retention writes the points it keeps from a segment it frees again, after newer ones;
    /// reopened, the points are still in set order, so a later retention keeps the right
    /// before-images and every point reads as it was (found in review: the old order kept an
    /// old point whose before-images it freed, and an export served another set's data); and
    /// a point a later retention drops stays dropped across a reopen (found by the simulator:
    /// it came back without its before-images).
    #[test]
    fn points_stay_in_order_after_retention_and_a_reopen() {
        let fs = MemFs::new();
        let dir = Path::new("/h/v");
        let open = || History::open_with(Arc::new(fs.clone()), dir, 300).unwrap();
        let mut h = open();
        let mut vol = vec![0u8; 256];
        let mut states = std::collections::BTreeMap::new();
        let apply = |h: &mut History, vol: &mut Vec<u8>, set: u64| {
            let before = vol.clone();
            h.before_apply(set, &[(0, 64)], &mut |o, out| {
                out.copy_from_slice(&before[o as usize..o as usize + out.len()]);
                Ok(())
            })
            .unwrap();
            vol[..64].fill(set as u8);
            h.point(point(set)).unwrap();
        };
        for set in 1..=6 {
            apply(&mut h, &mut vol, set);
            states.insert(set, vol.clone());
        }
        h.retain_from(2).unwrap();
        let mut h = open();
        for set in 7..=8 {
            apply(&mut h, &mut vol, set);
            states.insert(set, vol.clone());
        }
        h.retain_from(4).unwrap();
        let order: Vec<u64> = h.points().iter().map(|p| p.set).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(order.first(), Some(&4), "{order:?}");
        // Reopened, no dropped point comes back (point 2's record was written again in a
        // segment that stays: its drop record says it is gone).
        let h = open();
        let reopened: Vec<u64> = h.points().iter().map(|p| p.set).collect();
        assert_eq!(reopened, order);
        for p in h.points() {
            let out = view_at(&h, p.set, &vol);
            assert!(out == states[&p.set], "point {} of {order:?}", p.set);
        }
    }

    /// A power cut just after the next set's records start a new segment: the full
    /// segment's tail (a point record, not synced on its own) was made durable first, so
    /// the history opens (found in review: 11 of 40 cuts left a hole before the last
    /// segment, and a mirror with --history refused to start).
    #[test]
    fn a_power_cut_after_a_segment_rolls_over_leaves_a_history_that_opens() {
        for seed in 0..40u64 {
            let fs = MemFs::new();
            let dir = Path::new("/h/v");
            let mut h = History::open_with(Arc::new(fs.clone()), dir, 200).unwrap();
            let vol = vec![7u8; 256];
            let mut read = |o: u64, out: &mut [u8]| {
                out.copy_from_slice(&vol[o as usize..o as usize + out.len()]);
                Ok(())
            };
            h.before_apply(1, &[(0, 64)], &mut read).unwrap();
            h.point(point(1)).unwrap();
            h.before_apply(2, &[(0, 64)], &mut read).unwrap();
            fs.crash(&mut crate::sim::rng::Prng::new(seed));
            let h = History::open_with(Arc::new(fs.clone()), dir, 200)
                .unwrap_or_else(|e| panic!("power cut {seed}: {e}"));
            assert_eq!(h.points().len(), 1, "power cut {seed}");
        }
    }
}

#[cfg(test)]
mod keeper_tests {
    use super::*;
    use crate::env::mem::MemFs;
    use std::sync::Arc;

    const TIERS: &str = "10s:1s,60s:10s";

    fn secs(s: &str) -> Result<Duration, String> {
        s.trim_end_matches('s')
            .parse()
            .map(Duration::from_secs)
            .map_err(|e| format!("{s}: {e}"))
    }

    fn keeper(fs: &MemFs) -> Keeper {
        let log = History::open_with(Arc::new(fs.clone()), Path::new("/h/v"), 4 << 10).unwrap();
        Keeper {
            log,
            keep: Duration::from_secs(3600),
            max_bytes: u64::MAX,
            thin: parse_thinning(TIERS, secs).unwrap(),
            when_full: WhenFull::Wait,
            pins: Vec::new(),
        }
    }

    /// A point every 100 ms for 200 s, retention enforced after each: every point of the last
    /// 10 s stays, one a second between 10 s and 60 s old, one per 10 s beyond, and each kept
    /// point is the first made in its slice (so a coarser tier never needs one a finer tier
    /// dropped). A pinned point (being exported) stays whatever its age; the newest always
    /// does. The drops survive a reopen, and every kept point still reads exactly.
    #[test]
    fn older_points_are_thinned_by_tier() {
        let fs = MemFs::new();
        let mut k = keeper(&fs);
        let mut vol = vec![0u8; 64 << 10];
        let mut states = std::collections::BTreeMap::new();
        let t0 = 1_000_000u64;
        let mut pinned = None;
        for set in 1..=2000u64 {
            let at = ((set * 37) % 120) as usize * 512;
            let before = vol.clone();
            k.log
                .before_apply(set, &[(at as u64, 512)], &mut |o, out| {
                    out.copy_from_slice(&before[o as usize..o as usize + out.len()]);
                    Ok(())
                })
                .unwrap();
            vol[at..at + 512].fill((set % 251) as u8 + 1);
            let now = t0 + (set - 1) * 100;
            k.log.point(test_point(set, now)).unwrap();
            states.insert(set, vol.clone());
            if set == 1234 {
                k.pin(set).unwrap();
                pinned = Some(set);
            }
            k.enforce(now).unwrap();
        }
        let now = t0 + 1999 * 100;
        let check = |points: &[Point]| {
            assert_eq!(points.last().unwrap().set, 2000, "the newest stays");
            assert!(points.iter().any(|p| Some(p.set) == pinned), "pinned stays");
            let age = |p: &Point| now - p.time_ms;
            let young = points.iter().filter(|p| age(p) < 10_000).count();
            assert_eq!(young, 100, "every point of the last 10 s");
            for (every, lo, hi) in [(1000, 10_000, 60_000), (10_000, 60_000, u64::MAX)] {
                let tier: Vec<&Point> = points
                    .iter()
                    .filter(|p| (lo..hi).contains(&age(p)) && Some(p.set) != pinned)
                    .collect();
                let mut slices: Vec<u64> = tier.iter().map(|p| p.time_ms / every).collect();
                let n = slices.len();
                slices.dedup();
                assert_eq!(slices.len(), n, "one point per {every} ms slice");
                for p in &tier {
                    assert_eq!(p.time_ms % every, 0, "the first of its slice: {p:?}");
                }
            }
            points.len()
        };
        let n = check(k.log.points());
        assert!(n < 200, "{n} points kept of 2000");
        let reopened = keeper(&fs);
        assert_eq!(
            reopened.log.points(),
            k.log.points(),
            "drops survive a reopen"
        );
        for p in k.log.points() {
            let out = view_at(&k.log, p.set, &vol);
            assert!(out == states[&p.set], "point {} reads as it was", p.set);
        }
    }

    /// A history at its cap: with `wait`, a set that would take it past the cap is refused
    /// (`StorageFull`, as a full file system refuses it) and no point younger than the
    /// retention is dropped to make room, whatever arrives: the set waits until the oldest
    /// age out. With `drop-oldest` the oldest points go at once.
    #[test]
    fn a_full_history_waits_or_drops_the_oldest() {
        for when_full in [WhenFull::Wait, WhenFull::DropOldest] {
            let fs = MemFs::new();
            let mut k = keeper(&fs);
            k.keep = Duration::from_secs(60);
            k.max_bytes = 64 << 10;
            k.when_full = when_full;
            k.log.cap = k.max_bytes;
            let t0 = 1_000_000u64;
            let block = vec![7u8; 4096];
            let mut refused = None;
            for set in 1..=100u64 {
                let now = t0 + set * 100;
                let r =
                    k.log
                        .before_apply(set, &[(set * 4096 % (1 << 20), 4096)], &mut |_, out| {
                            out.copy_from_slice(&block);
                            Ok(())
                        });
                match r {
                    Ok(()) => {}
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
                        refused = Some((set, now));
                        break;
                    }
                }
                k.log.point(test_point(set, now)).unwrap();
                k.enforce(now).unwrap();
            }
            let (set, now) = refused.expect("the cap refuses a set");
            assert!(k.log.bytes() <= k.max_bytes);
            let oldest = k.log.points()[0].set;
            assert_eq!(oldest, 1, "nothing was dropped before the cap was reached");
            let freed = k.make_room(now).unwrap();
            match when_full {
                WhenFull::Wait => {
                    assert!(!freed, "no point younger than the retention goes");
                    assert_eq!(k.log.points()[0].set, 1);
                    // A minute later the oldest have aged out: room again.
                    assert!(k.make_room(now + 60_000).unwrap());
                    assert!(k.log.points()[0].set > 1);
                }
                WhenFull::DropOldest => {
                    assert!(freed);
                    assert!(k.log.points()[0].set > 1, "the oldest went");
                }
            }
            k.log
                .before_apply(set, &[(0, 4096)], &mut |_, out| {
                    out.copy_from_slice(&block);
                    Ok(())
                })
                .expect("the set fits once room was made");
        }
    }

    /// With one point left every record kept is needed by it: the cap lets a set (or a
    /// staged resync) larger than itself through rather than wait for good; and a drop that
    /// leaves one point (no segment freed) still counts as room made.
    #[test]
    fn the_cap_never_waits_for_good() {
        for when_full in [WhenFull::Wait, WhenFull::DropOldest] {
            let fs = MemFs::new();
            let mut k = keeper(&fs);
            k.when_full = when_full;
            k.max_bytes = 8 << 10;
            k.log.cap = k.max_bytes;
            let apply = |k: &mut Keeper, set: u64| {
                k.log.before_apply(set, &[(0, 16 << 10)], &mut |_, out| {
                    out.fill(1);
                    Ok(())
                })
            };
            k.log
                .point(Point {
                    set: 1,
                    time_ms: 1,
                    seq: 1,
                    gen: 1,
                })
                .unwrap();
            apply(&mut k, 2).expect("one point: the cap does not refuse");
            apply(&mut k, 3).expect("still one point");
            k.log
                .point(Point {
                    set: 3,
                    time_ms: 2,
                    seq: 3,
                    gen: 1,
                })
                .unwrap();
            let e = apply(&mut k, 4).expect_err("two points: over the cap");
            assert_eq!(e.kind(), io::ErrorKind::StorageFull);
            let made = k.make_room(3).unwrap();
            assert_eq!(made, when_full == WhenFull::DropOldest, "{when_full:?}");
            if made {
                apply(&mut k, 4).expect("room made");
            }
        }
    }

    #[test]
    fn thinning_tiers_must_grow_older_and_sparser() {
        assert!(parse_thinning("none", secs).unwrap().is_empty());
        assert_eq!(parse_thinning(TIERS, secs).unwrap().len(), 2);
        for bad in [
            "10s",
            "60s:10s,10s:1s",
            "10s:10s,60s:10s",
            "10s:4s,60s:10s",
            "x:1s",
        ] {
            assert!(parse_thinning(bad, secs).is_err(), "{bad} accepted");
        }
    }
}
