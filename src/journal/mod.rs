//! The primary's write journal: every completed local write, in completion order, kept until
//! the mirror has made it durable.
//!
//! - Records go to on-disk segments (`STATE/journal/VOLUME/<first seq>.jnl`) through the page
//!   cache, so they survive kill -9 of the daemon; `sync()` makes them durable and is called
//!   for every client FLUSH and FUA before the reply.
//! - The data of recent records also stays in a bounded RAM ring, so the shipper rarely reads
//!   segments back.
//! - An intent record precedes each local write. After a crash, intents without a completion
//!   name the ranges that may hold writes the journal never saw; they are re-read from the
//!   volume and journaled again ("resync"), so the mirror cannot silently diverge (I2).
//! - The journal's size is bounded: a write that does not fit waits (logged) until the mirror
//!   acknowledges enough to trim whole segments.
//! - Acknowledged segments are recycled, as the mirror's redo log does: up to [`MAX_SPARES`]
//!   become `<n>.spare` and the next rotation renames one and overwrites it from the start.
//!   Overwriting cached, allocated blocks skips ext4's block allocation and the page-cache
//!   release of a deleted file (12 % of the primary's CPU per MiB at the journal's cap), and a
//!   FLUSH's fdatasync no longer commits metadata. What an older lap left past a segment's new
//!   tail is never taken for records: records carry consecutive sequence numbers from the one
//!   in the segment's name, and sequence numbers never repeat.

pub mod record;

use crate::disk::segments::{numbered_segments, sync_dir, Spares};
use crate::repl::fold::{Extent, Payload};
use bytes::Bytes;
use record::{Header, Kind, HEADER_LEN};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct JournalOptions {
    pub dir: PathBuf,
    /// Cap on bytes held on disk; writes wait beyond it.
    pub max_disk_bytes: u64,
    /// Cap on record data kept in RAM for the shipper.
    pub ram_bytes: u64,
    pub segment_bytes: u64,
}

impl JournalOptions {
    pub fn new(dir: PathBuf, max_disk_bytes: u64) -> Self {
        JournalOptions {
            dir,
            max_disk_bytes,
            ram_bytes: 32 << 20,
            segment_bytes: 64 << 20,
        }
    }
}

/// Smallest journal that can hold the largest NBD write with room to rotate.
pub const MIN_JOURNAL_BYTES: u64 = 128 << 20;

/// A record the shipper sends: sequence number and what it did to the volume.
#[derive(Clone, Debug)]
pub struct ShipRecord {
    pub seq: u64,
    pub extent: Extent,
    /// CRC32 of the data (data records), computed once when the write was journaled: the
    /// frame encoder reuses it for a piece that is exactly this record's data.
    pub crc: Option<u32>,
}

/// A write announced to the journal but not yet completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intent {
    seq: u64,
    reserved: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct JournalStats {
    /// Bytes of segments on disk.
    pub disk_bytes: u64,
    /// Bytes of data written but not yet durable at the mirror.
    pub lag_bytes: u64,
    /// Age of the oldest such write.
    pub lag: Duration,
    pub last_seq: u64,
    pub acked_seq: u64,
    /// Writes are waiting for journal space.
    pub full: bool,
}

struct Segment {
    first_seq: u64,
    last_seq: u64,
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    synced_len: u64,
}

/// A shippable record not yet acknowledged.
struct Entry {
    seq: u64,
    offset: u64,
    len: u32,
    zero: bool,
    segment: u64,
    pos: u64,
    /// CRC32 of the data (0 for zero records).
    crc: u32,
    at: Instant,
}

struct Inner {
    next_seq: u64,
    segments: VecDeque<Segment>,
    disk_bytes: u64,
    reserved: u64,
    index: VecDeque<Entry>,
    ram: VecDeque<(u64, Bytes)>,
    ram_bytes: u64,
    open_intents: BTreeMap<u64, (u64, u32)>,
    /// Ranges that must be re-read from the volume and journaled (crash, failed write).
    dirty: Vec<(u64, u64)>,
    acked_seq: u64,
    lag_bytes: u64,
    waiting_for_space: bool,
    /// Times the journal filled since the last "journal full" line, and when that was.
    full_episodes: u64,
    full_logged_at: Option<Instant>,
    /// The current wait was logged: its end is logged too.
    full_logged: bool,
    /// Acknowledged segments kept for reuse. Not counted against the
    /// journal's cap: at the cap, which a mirror slower than its clients always reaches, they
    /// are what saves the allocation work; the directory may hold [`MAX_SPARES`] segments
    /// more than the cap.
    spares: Spares,
    /// A segment was renamed into place since the last `sync`: the directory needs one too.
    renamed: bool,
}

/// Acknowledged segments kept for reuse, at most.
pub const MAX_SPARES: usize = 2;

/// "journal full" is logged at most this often.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Journal {
    opts: JournalOptions,
    inner: Mutex<Inner>,
    /// Wakes the shipper when records or dirty ranges arrive.
    pub available: tokio::sync::Notify,
}

fn write_all_vectored(mut file: &File, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match file.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.jnl"))
}

impl Journal {
    /// Open (and recover) the journal in `opts.dir`.
    pub fn open(opts: JournalOptions) -> io::Result<Journal> {
        let names = numbered_segments(&opts.dir, ".jnl")?;
        let mut inner = Inner {
            next_seq: 1,
            segments: VecDeque::new(),
            disk_bytes: 0,
            reserved: 0,
            index: VecDeque::new(),
            ram: VecDeque::new(),
            ram_bytes: 0,
            open_intents: BTreeMap::new(),
            dirty: Vec::new(),
            acked_seq: 0,
            lag_bytes: 0,
            waiting_for_space: false,
            full_episodes: 0,
            full_logged_at: None,
            full_logged: false,
            spares: Spares::load(&opts.dir, MAX_SPARES)?,
            renamed: false,
        };
        let mut broken = false;
        for (first_seq, path) in names {
            // Each segment continues the one before: after a torn record (or a spare renamed
            // into place just before a crash) nothing can be trusted to be in order.
            if broken || (!inner.segments.is_empty() && first_seq != inner.next_seq) {
                tracing::warn!(path = %path.display(), expected_seq = inner.next_seq,
                    "journal segment does not continue the journal; removed");
                std::fs::remove_file(&path)?;
                broken = true;
                continue;
            }
            recover_segment(&mut inner, first_seq, &path)?;
        }
        inner
            .dirty
            .extend(inner.open_intents.values().map(|&(o, l)| (o, l as u64)));
        if !inner.open_intents.is_empty() {
            tracing::warn!(ranges = inner.open_intents.len(),
                "journal: writes were in flight at the last stop; their ranges will be re-read and shipped");
            inner.open_intents.clear();
        }
        let first = inner.index.front().map(|e| e.seq);
        tracing::info!(dir = %opts.dir.display(), records = inner.index.len(), first_seq = ?first,
            next_seq = inner.next_seq, bytes = inner.disk_bytes, "journal open");
        Ok(Journal {
            opts,
            inner: Mutex::new(inner),
            available: tokio::sync::Notify::new(),
        })
    }

    /// Announce a write of `len` bytes at `offset`. `Ok(None)` means "not now, try again
    /// after a moment": the journal is full (the mirror is behind). Never blocks: the caller
    /// keeps reaping its other completions meanwhile. (Overlapping writes never reach here
    /// together: the volume's range locks order them, so journal order is disk order.)
    pub fn begin(&self, offset: u64, len: u32) -> io::Result<Option<Intent>> {
        let need = 2 * HEADER_LEN as u64 + len as u64;
        let mut g = self.inner.lock().unwrap();
        if g.disk_bytes + g.reserved + need > self.opts.max_disk_bytes && !g.segments.is_empty() {
            if !g.waiting_for_space {
                g.waiting_for_space = true;
                g.full_episodes += 1;
                // A mirror slower than the clients fills the journal again as soon as it has
                // room, many times a second: say so every FULL_LOG_EVERY, not every time.
                if g.full_logged_at
                    .is_none_or(|t| t.elapsed() >= FULL_LOG_EVERY)
                {
                    tracing::warn!(journal_bytes = g.disk_bytes, limit = self.opts.max_disk_bytes,
                        times = g.full_episodes,
                        "journal full: writes wait until the mirror acknowledges (is the mirror reachable? is it slower than the clients?)");
                    g.full_logged_at = Some(Instant::now());
                    g.full_episodes = 0;
                    g.full_logged = true;
                }
            }
            return Ok(None);
        }
        if g.waiting_for_space {
            g.waiting_for_space = false;
            if std::mem::take(&mut g.full_logged) {
                tracing::info!("journal has room again: writes resume");
            }
        }
        g.reserved += need;
        let seq = g.next_seq;
        let h = Header {
            kind: Kind::Intent,
            seq,
            offset,
            len,
            data_crc: 0,
            completes: 0,
        };
        self.append_locked(&mut g, &h, &[])?;
        g.reserved -= HEADER_LEN as u64;
        g.open_intents.insert(seq, (offset, len));
        Ok(Some(Intent {
            seq,
            reserved: need - HEADER_LEN as u64,
        }))
    }

    /// The write announced by `intent` completed on the local disk; returns its sequence number.
    pub fn complete(&self, intent: Intent, offset: u64, payload: Payload) -> io::Result<u64> {
        let mut g = self.inner.lock().unwrap();
        g.reserved -= intent.reserved;
        g.open_intents.remove(&intent.seq);
        self.record_locked(&mut g, offset, payload, intent.seq)
    }

    /// The write announced by `intent` failed: the range's content is unknown, re-read it.
    pub fn fail(&self, intent: Intent) {
        let mut g = self.inner.lock().unwrap();
        g.reserved -= intent.reserved;
        if let Some((o, l)) = g.open_intents.remove(&intent.seq) {
            g.dirty.push((o, l as u64));
        }
        drop(g);
        self.available.notify_one();
    }

    /// Journal the current content of a range re-read from the volume.
    pub fn resync(&self, offset: u64, data: Bytes) -> io::Result<u64> {
        let mut g = self.inner.lock().unwrap();
        self.record_locked(&mut g, offset, Payload::Data(data), 0)
    }

    /// Ranges waiting to be re-read from the volume (taken: the caller must journal them).
    pub fn take_dirty(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.inner.lock().unwrap().dirty)
    }

    fn record_locked(
        &self,
        g: &mut Inner,
        offset: u64,
        payload: Payload,
        completes: u64,
    ) -> io::Result<u64> {
        let seq = g.next_seq;
        let (h, data): (Header, &[u8]) = match &payload {
            Payload::Data(d) => (
                Header {
                    kind: Kind::Data,
                    seq,
                    offset,
                    len: d.len() as u32,
                    data_crc: crc32fast::hash(d),
                    completes,
                },
                d,
            ),
            Payload::Zero(len) => (
                Header {
                    kind: Kind::Zero,
                    seq,
                    offset,
                    len: *len,
                    data_crc: 0,
                    completes,
                },
                &[],
            ),
        };
        let (segment, pos) = self.append_locked(g, &h, data)?;
        g.index.push_back(Entry {
            seq,
            offset,
            len: h.len,
            zero: h.kind == Kind::Zero,
            segment,
            pos,
            crc: h.data_crc,
            at: Instant::now(),
        });
        g.lag_bytes += h.len as u64;
        if let Payload::Data(d) = payload {
            g.ram_bytes += d.len() as u64;
            g.ram.push_back((seq, d));
            while g.ram_bytes > self.opts.ram_bytes {
                let (_, old) = g.ram.pop_front().expect("ram bytes imply entries");
                g.ram_bytes -= old.len() as u64;
            }
        }
        self.available.notify_one();
        Ok(seq)
    }

    /// Append one record to the current segment; returns (segment id, header position).
    fn append_locked(&self, g: &mut Inner, h: &Header, data: &[u8]) -> io::Result<(u64, u64)> {
        let rotate = g
            .segments
            .back()
            .is_none_or(|s| s.len >= self.opts.segment_bytes);
        if rotate {
            // A closed segment is not synced here: only a client FLUSH or FUA asks for
            // durability (`sync`). Syncing at rotation stalled every writer behind the lock
            // and wrote records to disk that, once acknowledged, are deleted unread.
            let path = segment_path(&self.opts.dir, h.seq);
            let reused = g.spares.reuse_as(&path)?;
            // A rename is durable with the next `sync`, which syncs the directory first.
            g.renamed |= reused;
            let file = OpenOptions::new()
                .create(!reused)
                .truncate(!reused)
                .read(true)
                .write(true)
                .open(&path)?;
            g.segments.push_back(Segment {
                first_seq: h.seq,
                last_seq: h.seq,
                path,
                file: Arc::new(file),
                len: 0,
                synced_len: 0,
            });
        }
        let seg = g.segments.back_mut().expect("segment just ensured");
        let pos = seg.len;
        // Header and data in one system call: a 4 KiB write costs two records per write
        // (intent, completion), so calls are most of the journal's cost.
        let head = h.encode();
        write_all_vectored(&seg.file, &mut [IoSlice::new(&head), IoSlice::new(data)])?;
        let n = (HEADER_LEN + data.len()) as u64;
        seg.len += n;
        seg.last_seq = h.seq;
        let id = seg.first_seq;
        g.disk_bytes += n;
        g.next_seq = h.seq + 1;
        Ok((id, pos))
    }

    /// Make every record appended so far durable (client FLUSH / FUA).
    pub fn sync(&self) -> io::Result<()> {
        // Oldest first, outside the lock: writers keep appending meanwhile.
        let (unsynced, renamed): (Vec<(Arc<File>, u64)>, bool) = {
            let mut g = self.inner.lock().unwrap();
            let renamed = std::mem::take(&mut g.renamed);
            let unsynced = g
                .segments
                .iter()
                .filter(|s| s.synced_len < s.len)
                .map(|s| (s.file.clone(), s.len))
                .collect();
            (unsynced, renamed)
        };
        // A recycled segment's new name must survive a power loss with its records.
        if renamed {
            if let Err(e) = sync_dir(&self.opts.dir) {
                self.inner.lock().unwrap().renamed = true;
                return Err(e);
            }
        }
        for (file, len) in unsynced {
            file.sync_data()?;
            let mut g = self.inner.lock().unwrap();
            // The segment may have been acknowledged and removed meanwhile.
            if let Some(s) = g.segments.iter_mut().find(|s| Arc::ptr_eq(&s.file, &file)) {
                s.synced_len = s.synced_len.max(len);
            }
        }
        Ok(())
    }

    /// The mirror made everything up to `seq` durable: forget it and free whole segments.
    pub fn ack(&self, seq: u64) {
        let mut g = self.inner.lock().unwrap();
        if seq <= g.acked_seq {
            return;
        }
        g.acked_seq = seq;
        while g.index.front().is_some_and(|e| e.seq <= seq) {
            let e = g.index.pop_front().unwrap();
            g.lag_bytes -= e.len as u64;
        }
        while g.ram.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, d) = g.ram.pop_front().unwrap();
            g.ram_bytes -= d.len() as u64;
        }
        let oldest_open = g.open_intents.keys().next().copied().unwrap_or(u64::MAX);
        // Never the last segment: it is being appended to.
        while g.segments.len() > 1 {
            let s = g.segments.front().unwrap();
            if s.last_seq > seq || s.last_seq >= oldest_open {
                break;
            }
            let s = g.segments.pop_front().unwrap();
            g.disk_bytes -= s.len;
            if let Err(e) = Self::retire(&mut g, s) {
                tracing::warn!("cannot remove or recycle an acknowledged journal segment: {e}");
            }
        }
    }

    /// Keep an acknowledged segment as a spare, or delete it. Never a segment still mapped
    /// by records in flight (or being synced): its pages must not change under them.
    fn retire(g: &mut Inner, s: Segment) -> io::Result<()> {
        if Arc::strong_count(&s.file) > 1 {
            return std::fs::remove_file(&s.path);
        }
        g.spares.retire(&s.path)
    }

    /// Up to `max_bytes` of records after `after_seq`, and the last sequence number they cover
    /// (everything journaled up to then when nothing was left out).
    pub fn collect(&self, after_seq: u64, max_bytes: u64) -> io::Result<(Vec<ShipRecord>, u64)> {
        // Records whose data left the RAM ring are mapped from their segment after the lock
        // is dropped: that must not hold up the writes appending meanwhile. (An acknowledged
        // segment may be unlinked meanwhile; the open file still maps.)
        enum Data {
            Ready(Payload),
            OnDisk(Arc<File>, u64, u32),
        }
        let (pending, covered) = {
            let g = self.inner.lock().unwrap();
            let start = g.index.partition_point(|e| e.seq <= after_seq);
            let mut pending = Vec::new();
            let mut bytes = 0u64;
            let mut covered = g.next_seq - 1;
            for e in g.index.range(start..) {
                if bytes > 0 && bytes + e.len as u64 > max_bytes {
                    covered = e.seq - 1;
                    break;
                }
                bytes += e.len as u64;
                let data = if e.zero {
                    Data::Ready(Payload::Zero(e.len))
                } else if let Ok(i) = g.ram.binary_search_by_key(&e.seq, |(s, _)| *s) {
                    Data::Ready(Payload::Data(g.ram[i].1.clone()))
                } else {
                    let seg_idx = g.segments.partition_point(|s| s.first_seq <= e.segment) - 1;
                    Data::OnDisk(
                        g.segments[seg_idx].file.clone(),
                        e.pos + HEADER_LEN as u64,
                        e.len,
                    )
                };
                let crc = (!e.zero).then_some(e.crc);
                pending.push((e.seq, e.offset, data, crc));
            }
            (pending, covered)
        };
        // Records read back from a segment are usually neighbours there: one mapping per run
        // of them, sliced without copying.
        let mut out = Vec::with_capacity(pending.len());
        let mut i = 0;
        while i < pending.len() {
            let (seq, offset, data, crc) = &pending[i];
            let Data::OnDisk(file, first_pos, _) = data else {
                let Data::Ready(p) = data else { unreachable!() };
                out.push(ShipRecord {
                    seq: *seq,
                    extent: Extent {
                        offset: *offset,
                        payload: p.clone(),
                    },
                    crc: *crc,
                });
                i += 1;
                continue;
            };
            // The first record always joins, however long (an NBD write may be 32 MiB).
            let mut end = i;
            let mut span_end = *first_pos;
            while let Some((_, _, Data::OnDisk(f, pos, len), _)) = pending.get(end) {
                let next_end = pos + *len as u64;
                let joins = end == i
                    || (Arc::ptr_eq(f, file)
                        && *pos >= *first_pos
                        && next_end - first_pos <= READ_RUN_BYTES);
                if !joins {
                    break;
                }
                span_end = span_end.max(next_end);
                end += 1;
            }
            let span = map_span(file, *first_pos, (span_end - first_pos) as usize)?;
            for (seq, offset, data, crc) in &pending[i..end] {
                let Data::OnDisk(_, pos, len) = data else {
                    unreachable!()
                };
                let at = (pos - first_pos) as usize;
                out.push(ShipRecord {
                    seq: *seq,
                    extent: Extent {
                        offset: *offset,
                        payload: Payload::Data(span.slice(at..at + *len as usize)),
                    },
                    crc: *crc,
                });
            }
            i = end;
        }
        Ok((out, covered.max(after_seq)))
    }

    pub fn last_seq(&self) -> u64 {
        self.inner.lock().unwrap().next_seq - 1
    }

    pub fn stats(&self) -> JournalStats {
        let g = self.inner.lock().unwrap();
        JournalStats {
            disk_bytes: g.disk_bytes,
            lag_bytes: g.lag_bytes,
            lag: g.index.front().map_or(Duration::ZERO, |e| e.at.elapsed()),
            last_seq: g.next_seq - 1,
            acked_seq: g.acked_seq,
            full: g.waiting_for_space,
        }
    }
}

/// Largest single mapping when records are read back from a segment.
const READ_RUN_BYTES: u64 = 8 << 20;

/// `len` bytes of a segment at `pos`, mapped rather than read: the shipper sends the records
/// straight from the page cache (reading them back into buffers cost a copy per byte, 5 % of
/// both daemons' CPU once the journal is at its cap). Segments are only ever appended to
/// while mapped and never truncated (only at open, before any mapping), so a mapping cannot
/// lose its pages; a segment unlinked meanwhile stays readable until the last mapping goes.
/// The records were written through the page cache moments to minutes before, so their pages
/// are normally still there. (The one thing a mapping handles worse than a read: a disk error
/// while reading a page back would stop the daemon with SIGBUS instead of failing the read.)
fn map_span(file: &Arc<File>, pos: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: see above; the mapping is read-only and lives as long as the Bytes sharing it.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(pos)
            .len(len)
            .map(&**file)?
    };
    Ok(Bytes::from_owner(MappedSpan {
        map,
        _file: file.clone(),
    }))
}

/// A mapped run of records. It holds its segment's file so the segment is not recycled (and
/// overwritten) while the records are in flight: see `Journal::retire`.
struct MappedSpan {
    map: memmap2::Mmap,
    _file: Arc<File>,
}

impl AsRef<[u8]> for MappedSpan {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// Read one segment back into the index. Its records run from the sequence number in its name
/// without a gap; the first record that is torn or not the next one ends it (in a recycled
/// segment, what follows the live records is an older lap), and the file is cut there.
fn recover_segment(g: &mut Inner, first_seq: u64, path: &Path) -> io::Result<()> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    let mut pos = 0usize;
    let mut last_seq = first_seq;
    // An empty segment (a crash right after rotating) still fixes where numbering resumes.
    g.next_seq = g.next_seq.max(first_seq);
    let mut older_lap = false;
    let now = Instant::now();
    while pos < data.len() {
        let Some(h) = Header::decode(&data[pos..]) else {
            break;
        };
        if h.seq != g.next_seq {
            older_lap = h.seq < first_seq;
            break;
        }
        let body = &data[pos + HEADER_LEN..];
        if body.len() < h.data_len()
            || (h.kind == Kind::Data && crc32fast::hash(&body[..h.data_len()]) != h.data_crc)
        {
            break;
        }
        match h.kind {
            Kind::Intent => {
                g.open_intents.insert(h.seq, (h.offset, h.len));
            }
            Kind::Data | Kind::Zero => {
                g.open_intents.remove(&h.completes);
                g.index.push_back(Entry {
                    seq: h.seq,
                    offset: h.offset,
                    len: h.len,
                    zero: h.kind == Kind::Zero,
                    segment: first_seq,
                    pos: pos as u64,
                    crc: h.data_crc,
                    at: now,
                });
                g.lag_bytes += h.len as u64;
            }
        }
        last_seq = h.seq;
        g.next_seq = h.seq + 1;
        pos += HEADER_LEN + h.data_len();
    }
    if pos < data.len() {
        if older_lap {
            tracing::debug!(path = %path.display(), at = pos, "journal: recycled segment's older records cut");
        } else {
            tracing::warn!(path = %path.display(), at = pos, "journal: torn record at the tail, truncated");
        }
        file.set_len(pos as u64)?;
        file.sync_data()?;
    }
    file.seek(SeekFrom::End(0))?;
    g.disk_bytes += pos as u64;
    g.segments.push_back(Segment {
        first_seq,
        last_seq,
        path: path.to_path_buf(),
        file: Arc::new(file),
        len: pos as u64,
        synced_len: pos as u64,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> JournalOptions {
        JournalOptions {
            dir: dir.to_path_buf(),
            max_disk_bytes: 1 << 20,
            ram_bytes: 8192,
            segment_bytes: 16 << 10,
        }
    }

    /// Begin, retrying while the journal says "not now" (as the connection loop does).
    fn begin(j: &Journal, offset: u64, len: u32) -> io::Result<Intent> {
        loop {
            if let Some(i) = j.begin(offset, len)? {
                return Ok(i);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn data(b: u8, n: usize) -> Payload {
        Payload::Data(Bytes::from(vec![b; n]))
    }

    #[test]
    fn records_survive_reopen_and_open_intents_become_dirty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(opts(dir.path())).unwrap();
            for i in 0..20u64 {
                let it = begin(&j, i * 4096, 4096).unwrap();
                j.complete(it, i * 4096, data(i as u8, 4096)).unwrap();
            }
            let z = begin(&j, 0, 8192).unwrap();
            j.complete(z, 0, Payload::Zero(8192)).unwrap();
            let _in_flight = begin(&j, 1 << 19, 512).unwrap();
            j.sync().unwrap();
        }
        let j = Journal::open(opts(dir.path())).unwrap();
        let (recs, covered) = j.collect(0, u64::MAX).unwrap();
        assert_eq!(recs.len(), 21);
        assert_eq!(covered, j.last_seq());
        assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(
            recs[5].extent,
            Extent {
                offset: 5 * 4096,
                payload: data(5, 4096)
            }
        );
        assert_eq!(recs[20].extent.payload, Payload::Zero(8192));
        assert_eq!(j.take_dirty(), vec![(1 << 19, 512)]);
    }

    #[test]
    fn a_failed_write_is_re_read() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(opts(dir.path())).unwrap();
        let c = j.begin(4095, 2).unwrap().expect("room");
        j.fail(c);
        assert_eq!(j.take_dirty(), vec![(4095, 2)]);
    }

    #[test]
    fn torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(opts(dir.path())).unwrap();
            for i in 0..3u64 {
                let it = begin(&j, i * 512, 512).unwrap();
                j.complete(it, i * 512, data(1, 512)).unwrap();
            }
        }
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let j = Journal::open(opts(dir.path())).unwrap();
        let (recs, _) = j.collect(0, u64::MAX).unwrap();
        assert_eq!(recs.len(), 2, "the torn third record is gone");
        assert_eq!(
            j.take_dirty(),
            vec![(1024, 512)],
            "its intent survived: the range is re-read"
        );
    }

    #[test]
    fn ack_trims_segments_and_full_journal_waits() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(opts(dir.path())).unwrap());
        let mut last = 0;
        // Fill to just under the 1 MiB cap.
        while j.stats().disk_bytes + 3 * (32 << 10) < (1 << 20) {
            let it = begin(&j, 0, 32 << 10).unwrap();
            last = j.complete(it, 0, data(7, 32 << 10)).unwrap();
        }
        let before = j.stats().disk_bytes;
        let j2 = j.clone();
        let waiter = std::thread::spawn(move || {
            let it = begin(&j2, 0, 256 << 10).unwrap();
            j2.complete(it, 0, data(8, 256 << 10)).unwrap()
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(j.stats().full, "the big write waits for space");
        assert!(!waiter.is_finished());
        j.ack(last);
        let seq = waiter.join().unwrap();
        assert!(seq > last);
        assert!(
            j.stats().disk_bytes < before,
            "acknowledged segments were removed"
        );
        let (recs, _) = j.collect(last, u64::MAX).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(j.stats().lag_bytes, 256 << 10);
    }

    /// A record larger than one read-back run (an NBD write may be 32 MiB) comes back whole,
    /// and so do its smaller neighbours.
    #[test]
    fn a_record_larger_than_a_read_run_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.max_disk_bytes = 64 << 20;
        o.segment_bytes = 32 << 20;
        let j = Journal::open(o).unwrap();
        let big = READ_RUN_BYTES as usize + 4096;
        for (len, b) in [(4096, 1u8), (big, 2), (4096, 3)] {
            let it = begin(&j, 0, len as u32).unwrap();
            j.complete(it, 0, data(b, len)).unwrap();
        }
        let (recs, _) = j.collect(0, u64::MAX).unwrap();
        let got: Vec<Payload> = recs.into_iter().map(|r| r.extent.payload).collect();
        assert_eq!(got, vec![data(1, 4096), data(2, big), data(3, 4096)]);
    }

    #[test]
    fn collect_respects_byte_budget_and_reads_evicted_data_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(opts(dir.path())).unwrap();
        for i in 0..10u8 {
            let it = begin(&j, 0, 4096).unwrap();
            j.complete(it, 0, data(i, 4096)).unwrap();
        }
        // RAM holds 8 KiB: the first records come from the segment files.
        let (recs, covered) = j.collect(0, 3 * 4096).unwrap();
        assert_eq!(recs.len(), 3);
        // Covered up to (not including) the fourth record: the intent just before it counts.
        assert_eq!(covered, recs[2].seq + 1);
        assert_eq!(recs[0].extent.payload, data(0, 4096));
        let (rest, _) = j.collect(covered, u64::MAX).unwrap();
        assert_eq!(rest.len(), 7);
        assert_eq!(rest[6].extent.payload, data(9, 4096));
    }

    /// Records read back are mapped from their segment: they stay intact while the shipper
    /// holds them, even once the mirror acknowledged them and their segment was deleted.
    #[test]
    fn read_back_records_survive_their_segment_being_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.segment_bytes = 64 << 10;
        let j = Journal::open(o).unwrap();
        for i in 0..40u8 {
            let it = begin(&j, 0, 4096).unwrap();
            j.complete(it, 0, data(i, 4096)).unwrap();
        }
        let (recs, _) = j.collect(0, u64::MAX).unwrap();
        assert_eq!(recs.len(), 40);
        let segments = || std::fs::read_dir(dir.path()).unwrap().count();
        let before = segments();
        j.ack(recs[35].seq);
        assert!(segments() < before, "acknowledged segments are deleted");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.extent.payload, data(i as u8, 4096), "record {i}");
        }
    }

    fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
        numbered_segments(dir, suffix)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    fn write(j: &Journal, b: u8) -> u64 {
        let it = begin(j, u64::from(b) * 4096, 4096).unwrap();
        j.complete(it, u64::from(b) * 4096, data(b, 4096)).unwrap()
    }

    /// Records after `after`, with their first data byte.
    fn shipped(j: &Journal, after: u64) -> Vec<(u64, u8)> {
        let (recs, _) = j.collect(after, u64::MAX).unwrap();
        recs.iter()
            .map(|r| match &r.extent.payload {
                Payload::Data(d) => (r.seq, d[0]),
                Payload::Zero(_) => panic!("zero record"),
            })
            .collect()
    }

    /// Acknowledged segments are reused; what an older lap left in them never comes back, and
    /// the journal reopens to exactly the unacknowledged records.
    #[test]
    fn recycled_segments_keep_only_the_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(opts(dir.path())).unwrap();
        let mut expect = Vec::new();
        for b in 0..120u8 {
            let seq = write(&j, b);
            expect.push((seq, b));
            if b % 10 == 9 {
                // The mirror acknowledges all but the last 5 records.
                let acked = expect[expect.len() - 6].0;
                j.ack(acked);
                expect.retain(|(s, _)| *s > acked);
            }
        }
        assert!(
            !files(dir.path(), ".spare").is_empty(),
            "acknowledged segments become spares"
        );
        assert!(files(dir.path(), ".spare").len() <= MAX_SPARES);
        assert!(
            files(dir.path(), ".jnl").len() <= 3,
            "segments are reused, not piled up"
        );
        let acked = j.stats().acked_seq;
        assert_eq!(shipped(&j, acked), expect);
        drop(j);
        let j = Journal::open(opts(dir.path())).unwrap();
        assert_eq!(shipped(&j, acked), expect);
        // Numbering continues, and the journal reopens again to the same records plus these.
        let seq = write(&j, 200);
        assert_eq!(seq, j.last_seq());
        expect.push((seq, 200));
        drop(j);
        let j = Journal::open(opts(dir.path())).unwrap();
        assert_eq!(shipped(&j, acked), expect);
    }

    /// A spare renamed into place just before a crash (the rotation's first step) holds only an
    /// older lap: nothing of it is replayed, the segments before it still are, and records
    /// written after the restart follow on.
    #[test]
    fn a_renamed_spare_with_old_records_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut expect = Vec::new();
        let next;
        {
            let j = Journal::open(opts(dir.path())).unwrap();
            for b in 0..12u8 {
                expect.push((write(&j, b), b));
            }
            let acked = expect[7].0;
            j.ack(acked);
            expect.retain(|(s, _)| *s > acked);
            next = j.last_seq() + 1;
        }
        let spare = files(dir.path(), ".spare").pop().expect("a spare");
        std::fs::rename(&spare, dir.path().join(format!("{next:020}.jnl"))).unwrap();
        let j = Journal::open(opts(dir.path())).unwrap();
        assert_eq!(j.last_seq(), next - 1);
        let acked = expect[0].0 - 1;
        assert_eq!(shipped(&j, acked), expect);
        let seq = write(&j, 99);
        assert_eq!(seq, next + 1, "an intent, then the record");
        expect.push((seq, 99));
        drop(j);
        let j = Journal::open(opts(dir.path())).unwrap();
        assert_eq!(shipped(&j, acked), expect);
    }
}
