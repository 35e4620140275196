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
//!   volume and journaled again ("resync"), so the mirror cannot silently diverge (I2). A
//!   completed write the journal failed to record (a full file system) is re-read the same way.
//! - The journal's size is bounded: a write whose data does not fit waits until the mirror
//!   acknowledges enough to trim whole segments; waiters are woken when space frees, not
//!   polled. The last segment is never trimmed (it is appended to): once it is wholly
//!   acknowledged and alone in the way, the next write starts a new segment and it goes. A TRIM or WRITE_ZEROES costs a record whatever its length, so it never waits for
//!   room its length would not take.
//! - Acknowledged segments are recycled, as the mirror's redo log does: up to [`MAX_SPARES`]
//!   become `<n>.spare` and the next rotation renames one and overwrites it from the start.
//!   Overwriting cached, allocated blocks skips ext4's block allocation and the page-cache
//!   release of a deleted file (12 % of the primary's CPU per MiB at the journal's cap), and a
//!   FLUSH's fdatasync no longer commits metadata. What an older lap left past a segment's new
//!   tail is never taken for records: records carry consecutive sequence numbers from the one
//!   in the segment's name, and sequence numbers never repeat.
//! - Records are written at explicit offsets: a failed or short append (ENOSPC) leaves the
//!   segment's length where it was, and the next append overwrites what it left.
//! - When it is full and the admin chose `--on-journal-full track` (the default), or when a
//!   record cannot be written (its file system full, its disk failing), the journal **folds**:
//!   the ranges of every record not yet acknowledged, and of every write in flight, are marked
//!   in the dirty map (`dirty.rs`, `STATE/journal/VOLUME/dirty.map`), the records are dropped,
//!   and from then on writes only mark the map ("tracking"), at local-disk speed, until a
//!   session with the mirror starts ([`Journal::resume_journaling`]). The session then reads
//!   the dirty regions from the volume and ships them as a resync the mirror stages (I1). The
//!   map's header records the fold ([`dirty::Fold`]): records up to `folded_through` are never
//!   shipped again, even after a crash, and numbering goes on after it. One sequence number is
//!   skipped at each fold: the tracked writes' place in the order (`folded_through` itself).
//! - `STATE/journal/VOLUME/stop.json` says how the journal was last closed: `close()` writes
//!   it clean after cutting the tail segment to its records; `open` marks it running (with the
//!   host's boot id) before any record is written, so the next start knows whether the last
//!   stop was clean, a crash of the process, or of the whole host.

pub mod dirty;
pub mod record;

use crate::disk::segments::{numbered_segments, Spares};
use crate::env::{write_all_vectored_at, write_atomic, Fs, Handle, OpenOptions};
use crate::extent::{Extent, Payload};
use crate::wake::{Waiters, Wake};
use bytes::Bytes;
use dirty::{DirtyMap, Fold};
use record::{Header, Kind, HEADER_LEN};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct JournalOptions {
    pub fs: Fs,
    pub dir: PathBuf,
    /// Cap on bytes held on disk; writes carrying data wait beyond it.
    pub max_disk_bytes: u64,
    /// Cap on record data kept in RAM for the shipper.
    pub ram_bytes: u64,
    pub segment_bytes: u64,
    /// This boot of the host (`/proc/sys/kernel/random/boot_id`): a stop that was not clean
    /// under another boot id was a crash of the host, which may have lost unsynced records.
    pub boot_id: String,
    /// The wall clock records are stamped with (Unix milliseconds).
    pub clock: WallClock,
    /// What a full journal does (`--on-journal-full`).
    pub on_full: OnFull,
    /// The volume's size, which the dirty map covers (0: no map; a full journal blocks).
    pub volume_bytes: u64,
    /// The dirty map's region (`--dirty-region`).
    pub region_bytes: u64,
    /// Pace writes once the journal holds more than this percent of its cap unacknowledged
    /// (`--pace-above`; None: never). See [`Journal::pace_delay`].
    pub pace_above: Option<u8>,
}

/// What a full journal does (`--on-journal-full`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Fold into the dirty map: writes go on at local speed, the mirror is resynced later
    /// (staged, so it stays consistent).
    #[default]
    Track,
    /// Writes wait for the mirror to acknowledge (production stops while the mirror is away).
    Block,
}

/// Pieces of the volume with changes the mirror has not been sent ([`Journal::changed_chunks`]).
#[derive(Debug)]
pub struct ChangedChunks {
    /// The journal's last sequence number when it was taken.
    pub as_of: u64,
    /// Writes were being tracked in the dirty map (nothing is settled).
    pub tracking: bool,
    chunks: std::collections::HashSet<u64>,
}

impl ChangedChunks {
    pub fn touched(&self, chunk_number: u64) -> bool {
        self.tracking || self.chunks.contains(&chunk_number)
    }
}

/// A wall clock in Unix milliseconds: the system's in production, a virtual one in the
/// simulator.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system's wall clock.
pub fn system_clock() -> WallClock {
    Arc::new(|| crate::repl::core::primary::unix_ms(std::time::SystemTime::now()))
}

impl JournalOptions {
    pub fn new(fs: Fs, dir: PathBuf, max_disk_bytes: u64) -> Self {
        JournalOptions {
            fs,
            dir,
            max_disk_bytes,
            ram_bytes: 32 << 20,
            segment_bytes: segment_bytes_for(max_disk_bytes),
            boot_id: boot_id(),
            clock: system_clock(),
            on_full: OnFull::Block,
            volume_bytes: 0,
            region_bytes: dirty::DEFAULT_REGION_BYTES,
            pace_above: None,
        }
    }
}

/// The dirty map's file in a journal's directory.
pub const DIRTY_MAP: &str = "dirty.map";

/// This boot of the host, as the kernel names it (empty when it cannot be read: every stop
/// then counts as a crash of the process only).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Smallest journal: the largest NBD write (32 MiB) and a tail segment of 16 MiB fit twice
/// over, so a write waits only for acknowledgements, never for good.
pub const MIN_JOURNAL_BYTES: u64 = 64 << 20;

/// Prepare `dir` as the journal of a volume whose numbering goes on at `next_seq` (a promoted
/// mirror: its volume holds every write up to `next_seq - 1`, none of which is the journal's to
/// ship): whatever `dir` held is removed, an empty segment named `next_seq` fixes where
/// numbering resumes ([`Journal::open`] keeps it), and the stop marker says the last stop was
/// clean. Everything is synced before it returns.
pub fn create_at(fs: &Fs, dir: &Path, start: &JournalStart, boot_id: &str) -> io::Result<()> {
    let next_seq = start.next_seq;
    assert!(next_seq >= 1, "sequence numbers start at 1");
    fs.create_dir_all(dir)?;
    crate::env::remove_files_in(&**fs, dir)?;
    if !start.resync.is_empty() {
        // An open resync of these regions from the start: every write after `next_seq - 1`
        // is in the journal or the map.
        let mut map = DirtyMap::create(
            fs,
            &dir.join(DIRTY_MAP),
            start.volume_bytes,
            dirty::DEFAULT_REGION_BYTES,
        )?;
        map.mark_ranges(&start.resync)?;
        map.set_fold(Fold {
            covers_after: Some(next_seq - 1),
            folded_through: next_seq - 1,
        })?;
        map.sync()?;
    }
    let seg = fs.open(
        &segment_path(dir, next_seq),
        OpenOptions::write().create().truncate(),
    )?;
    seg.sync_data()?;
    let m = StopMarker {
        clean: true,
        boot_id: boot_id.to_string(),
        next_seq,
    };
    let bytes = serde_json::to_vec_pretty(&m).map_err(io::Error::other)?;
    write_atomic(&**fs, &dir.join(STOP_MARKER), &bytes)?;
    fs.sync_dir(dir)
}

/// Where a journal made by [`create_at`] starts: the sequence number it numbers on at, and
/// regions of the volume (of `volume_bytes`) to resync before anything else (a promoted
/// volume that still holds writes it had given up: its peer, at the point both held, lacks
/// them).
pub struct JournalStart {
    pub next_seq: u64,
    pub resync: Vec<(u64, u64)>,
    pub volume_bytes: u64,
}

/// Segments of a quarter of the journal, from 16 to 64 MiB: large enough that rotations are
/// rare, small enough that a small journal frees space in steps while the mirror catches up
/// (a 64 MiB journal of 64 MiB segments would free nothing until its one segment is passed).
pub fn segment_bytes_for(max_disk_bytes: u64) -> u64 {
    (max_disk_bytes / 4).clamp(16 << 20, 64 << 20)
}

/// How the journal was last closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LastStop {
    /// No journal was there: a new volume or a lost state directory.
    Fresh,
    /// `close()` ran: every record was synced and the tail cut.
    Clean,
    /// The process died (same boot): the page cache kept every record it had written.
    ProcessCrash,
    /// The host went down without a clean stop: records not yet synced may be lost, and so
    /// may writes the volume had not yet flushed.
    HostCrash,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StopMarker {
    clean: bool,
    boot_id: String,
    /// Where numbering resumes (after a clean stop; informational otherwise).
    next_seq: u64,
}

const STOP_MARKER: &str = "stop.json";

/// A record the shipper sends: sequence number and what it did to the volume.
#[derive(Clone, Debug)]
pub struct ShipRecord {
    pub seq: u64,
    pub extent: Extent,
    /// CRC32 of the data (data records), computed once when the write was journaled: the
    /// frame encoder reuses it for a piece that is exactly this record's data.
    pub crc: Option<u32>,
    /// When the write completed (Unix milliseconds, 0 if not known).
    pub written_ms: u64,
}

/// A range whose content the journal cannot vouch for (a write in flight at a crash, a write
/// that failed, a completed write whose record could not be written): it is re-read from the
/// volume and journaled. Its intent stays open until then, so a crash meanwhile finds it
/// again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirty {
    pub offset: u64,
    pub len: u64,
    intent: u64,
}

/// A write announced to the journal but not yet completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intent {
    seq: u64,
    reserved: u64,
}

impl Intent {
    /// Whether the dirty map holds the write rather than the journal: it was announced while
    /// tracking, or folded into the map while in flight. A crash leaves such a write to the
    /// map's regions, not to a re-read of its intent.
    pub fn in_map(&self, journal: &Journal) -> bool {
        let g = journal.inner.lock().unwrap();
        journal.tracked(&g, *self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The mirror acknowledged a sequence number the journal never wrote: a protocol error
    /// (or another journal's mirror), never a reason to trim.
    #[error("acknowledgement for seq {acked} beyond the journal's end (last seq {last})")]
    AckBeyondEnd { acked: u64, last: u64 },
}

#[derive(Clone, Debug, Default)]
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
    /// Ranges waiting to be re-read from the volume.
    pub dirty_ranges: usize,
    /// The journal's appends or syncs fail (its file system full, an I/O error): why. An
    /// append failure clears with the next record with data appended, a sync failure with
    /// the next sync that works.
    pub failure: Option<String>,
    /// Acknowledged tail segments rotated out because they alone kept a write from fitting,
    /// since the journal opened.
    pub tail_rotations: u64,
    /// Writes go to the dirty map, not the journal (folded; until the mirror is back).
    pub tracking: bool,
    /// Bytes of the volume in dirty regions, to resync.
    pub dirty_bytes: u64,
    /// Times the journal folded into the dirty map, since it opened.
    pub folds: u64,
    /// The dirty map could not be written: why. Its bits are kept in memory; if the daemon
    /// stops before the resync ends, the next start cannot trust the map.
    pub map_failure: Option<String>,
    /// Writes held back by `--pace-above` since the journal opened.
    pub paced_writes: u64,
}

struct Segment {
    first_seq: u64,
    last_seq: u64,
    path: PathBuf,
    file: Handle,
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
    /// Where the record's data starts in its segment.
    data_pos: u64,
    /// CRC32 of the data (0 for zero records).
    crc: u32,
    at: Instant,
    written_ms: u64,
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
    dirty: Vec<Dirty>,
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
    /// A segment was created or renamed into place since the last `sync`: the directory needs
    /// one too, or a power cut could lose the segment's name with the records a FLUSH synced.
    dir_changed: bool,
    closed: bool,
    /// Why the last append failed, until a record with data is appended (status).
    append_failure: Option<String>,
    /// Why the last sync failed, until a sync works (status).
    sync_failure: Option<String>,
    /// `mark_running` was called: appends are allowed.
    running: bool,
    /// The next append starts a new segment: the tail is acknowledged and alone keeps a
    /// write from fitting (it cannot be trimmed while it is the last).
    rotate_next: bool,
    /// How many times that happened (`JournalStats::tail_rotations`).
    tail_rotations: u64,
    /// The daemon is stopping: no new write is admitted (parked ones are told so), writes
    /// already admitted complete and are journaled.
    stopping: bool,
    /// Where writes go once the journal folds (module doc).
    map: Option<DirtyMap>,
    /// Folded: writes mark the map instead of being journaled.
    tracking: bool,
    tracked_writes: u64,
    map_failure: Option<String>,
    /// The map's file may lack marks: it was removed, and is written whole once that works.
    map_untrusted: bool,
}

/// Acknowledged segments kept for reuse, at most.
pub const MAX_SPARES: usize = 2;

/// "journal full" is logged at most this often.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);
/// The longest a write is held back by `--pace-above` (at a full journal): long enough to
/// slow a client that writes faster than the link carries, short enough that no write waits
/// noticeably (a disk's own latency under load is of this order).
pub const MAX_PACE_DELAY: Duration = Duration::from_millis(10);

pub struct Journal {
    opts: JournalOptions,
    inner: Mutex<Inner>,
    last_stop: LastStop,
    /// Writers parked because the journal was full.
    space: Waiters,
    /// Times the journal folded since it opened ([`Journal::folds`]).
    folds: AtomicU64,
    /// Writes held back by [`Journal::pace_delay`] since it opened.
    paced_writes: AtomicU64,
    /// The shipper: woken when records or dirty ranges arrive.
    records: Waiters,
    /// One [`Journal::sync`] at a time: a failed fdatasync reports its error to one caller
    /// only, and a concurrent sync of the same file must not succeed (and acknowledge its
    /// FLUSH) before the failure is handled.
    sync_serial: Mutex<()>,
    /// Test builds: told of every record appended (the simulator's model of the volume).
    #[cfg(any(test, feature = "test-hooks"))]
    observer: Mutex<Option<RecordObserver>>,
}

/// What the simulator's model hears of the journal.
#[cfg(any(test, feature = "test-hooks"))]
#[derive(Debug)]
pub enum Observed<'a> {
    /// A record appended: its sequence number and what it did.
    Record(u64, &'a Extent),
    /// A write the dirty map took instead: its place in the order is just after `seq`'s
    /// records (the fold's skipped number).
    Tracked(u64, &'a Extent),
    /// A range the journal could not vouch for (a write in flight at a crash), folded into
    /// the map: whatever the volume holds there now counts as written at `seq`'s place.
    Adopted { seq: u64, offset: u64, len: u64 },
}

/// Sees what the journal records ([`Observed`]).
#[cfg(any(test, feature = "test-hooks"))]
pub type RecordObserver = Box<dyn Fn(Observed<'_>) + Send>;

fn closed() -> io::Error {
    io::Error::other("the journal is not running (not started, or closed: the daemon is stopping)")
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.jnl"))
}

impl Journal {
    /// Open (and recover) the journal in `opts.dir`. Nothing may be appended until
    /// [`Journal::mark_running`]: until then `stop.json` still tells how the last run ended,
    /// so a start that fails before the caller has recorded it (say, a host crash) learns it
    /// again next time.
    pub fn open(opts: JournalOptions) -> io::Result<Journal> {
        let fs = opts.fs.clone();
        let names = numbered_segments(&*fs, &opts.dir, ".jnl")?;
        let marker_path = opts.dir.join(STOP_MARKER);
        let marker: Option<StopMarker> = match fs.read(&marker_path) {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let last_stop = match &marker {
            _ if names.is_empty() && marker.is_none() => LastStop::Fresh,
            Some(m) if m.clean => LastStop::Clean,
            Some(m) if !m.boot_id.is_empty() && m.boot_id != opts.boot_id => LastStop::HostCrash,
            // A journal from a release without the marker: intents cover what was in flight.
            _ => LastStop::ProcessCrash,
        };
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
            spares: Spares::load(&fs, &opts.dir, MAX_SPARES)?,
            // After a stop that was not clean the segments' names may be in the page cache
            // only, as their records may (see `recover_segment`): the next sync makes them
            // durable.
            dir_changed: last_stop != LastStop::Clean,
            closed: false,
            append_failure: None,
            sync_failure: None,
            running: false,
            rotate_next: false,
            tail_rotations: 0,
            stopping: false,
            map: None,
            tracking: false,
            tracked_writes: 0,
            map_failure: None,
            map_untrusted: false,
        };
        // The dirty map: kept while a resync is open, whatever the mode now (an admin who
        // switched to `block` still gets the regions resynced). Read first: segments wholly
        // folded into it are not the journal any more.
        let map_path = opts.dir.join(DIRTY_MAP);
        let map_exists = fs.exists(&map_path)?;
        if map_exists || (opts.on_full == OnFull::Track && opts.volume_bytes > 0) {
            let map = if map_exists {
                DirtyMap::open(&fs, &map_path, opts.volume_bytes)?
            } else {
                DirtyMap::create(&fs, &map_path, opts.volume_bytes, opts.region_bytes)?
            };
            let fold = map.fold();
            // Numbering goes on after the fold.
            inner.next_seq = inner.next_seq.max(fold.folded_through + 1);
            if fold.covers_after.is_some() {
                tracing::warn!(
                    dirty_bytes = map.dirty_bytes(),
                    ?fold,
                    "journal: a resync from the dirty map is due"
                );
            }
            inner.map = Some(map);
        }
        let folded_through = inner.map.as_ref().map_or(0, |m| m.fold().folded_through);
        let mut broken = false;
        for (first_seq, path) in names {
            // A segment begun before the fold holds only folded records (every segment is
            // retired at a fold; one seen again was brought back by a power cut).
            if first_seq <= folded_through {
                tracing::info!(path = %path.display(), folded_through,
                    "journal segment folded into the dirty map; removed");
                fs.remove_file(&path)?;
                inner.dir_changed = true;
                continue;
            }
            // Each segment continues the one before: after a torn record (or a spare renamed
            // into place just before a crash) nothing can be trusted to be in order.
            if broken || (!inner.segments.is_empty() && first_seq != inner.next_seq) {
                tracing::warn!(path = %path.display(), expected_seq = inner.next_seq,
                    "journal segment does not continue the journal; removed");
                fs.remove_file(&path)?;
                inner.dir_changed = true;
                broken = true;
                continue;
            }
            recover_segment(&opts, &mut inner, first_seq, &path, last_stop)?;
        }
        // Intents without a completion stay open (their segments are kept) until the ranges
        // they name are re-read and journaled: a crash before that finds them again.
        let open: Vec<Dirty> = inner
            .open_intents
            .iter()
            .map(|(&intent, &(offset, len))| Dirty {
                offset,
                len: u64::from(len),
                intent,
            })
            .collect();
        if !open.is_empty() {
            tracing::warn!(ranges = open.len(),
                "journal: writes were in flight at the last stop; their ranges will be re-read and shipped");
        }
        inner.dirty.extend(open);
        let first = inner.index.front().map(|e| e.seq);
        tracing::info!(dir = %opts.dir.display(), records = inner.index.len(), first_seq = ?first,
            next_seq = inner.next_seq, bytes = inner.disk_bytes, ?last_stop, "journal open");
        let journal = Journal {
            opts,
            inner: Mutex::new(inner),
            last_stop,
            space: Waiters::new(),
            folds: AtomicU64::new(0),
            paced_writes: AtomicU64::new(0),
            records: Waiters::new(),
            sync_serial: Mutex::new(()),
            #[cfg(any(test, feature = "test-hooks"))]
            observer: Mutex::new(None),
        };
        Ok(journal)
    }

    /// How the journal was closed before this open.
    pub fn last_stop(&self) -> LastStop {
        self.last_stop
    }

    /// Test builds: call `f` for every record appended from now on.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn observe(&self, f: RecordObserver) {
        *self.observer.lock().unwrap() = Some(f);
    }

    /// From now on a stop that is not [`Journal::close`] is seen as a crash at the next open:
    /// records may be appended.
    pub fn mark_running(&self) -> io::Result<()> {
        let next_seq = self.inner.lock().unwrap().next_seq;
        self.write_marker(false, next_seq)?;
        self.inner.lock().unwrap().running = true;
        Ok(())
    }

    fn write_marker(&self, clean: bool, next_seq: u64) -> io::Result<()> {
        let m = StopMarker {
            clean,
            boot_id: self.opts.boot_id.clone(),
            next_seq,
        };
        let bytes = serde_json::to_vec_pretty(&m).map_err(io::Error::other)?;
        write_atomic(&*self.opts.fs, &self.opts.dir.join(STOP_MARKER), &bytes)
    }

    /// A clean stop: sync every record, cut the tail segment to its records (so no older lap
    /// follows them), and say so for the next open. Nothing may be appended afterwards.
    pub fn close(&self) -> io::Result<()> {
        self.sync()?;
        {
            let mut g = self.inner.lock().unwrap();
            g.closed = true;
            if let Some(s) = g.segments.back() {
                s.file.set_len(s.len)?;
                s.file.sync_data()?;
            }
            self.write_marker(true, g.next_seq)?;
        }
        tracing::info!(dir = %self.opts.dir.display(), "journal closed cleanly");
        Ok(())
    }

    /// Wake `w` once when journal space may have freed up (a writer parked on `begin`).
    pub fn wait_for_space(&self, w: &Arc<dyn Wake>) {
        self.space.register(w);
    }

    /// Wake `w` whenever records or dirty ranges arrive (the shipper).
    pub fn subscribe(&self, w: &Arc<dyn Wake>) {
        self.records.register(w);
    }

    /// Announce a change of `len` bytes at `offset`; `carries_data` for a write (a TRIM or
    /// WRITE_ZEROES is recorded without data). `Ok(None)` means "not now": the journal has no
    /// room for the data (the mirror is behind); call [`Journal::wait_for_space`] and try
    /// again when woken. Never blocks. (Overlapping writes never reach here together: the
    /// volume's range locks order them, so journal order is disk order.)
    pub fn begin(&self, offset: u64, len: u32, carries_data: bool) -> io::Result<Option<Intent>> {
        self.begin_or_wait(offset, len, carries_data, None)
    }

    /// [`Journal::begin`]; when it says "not now", `waker` is woken once space may have freed
    /// (registered under the same lock as the check, so no wake-up is lost).
    pub fn begin_or_wait(
        &self,
        offset: u64,
        len: u32,
        carries_data: bool,
        waker: Option<&Arc<dyn Wake>>,
    ) -> io::Result<Option<Intent>> {
        let data = if carries_data { u64::from(len) } else { 0 };
        let need = 2 * HEADER_LEN as u64 + data;
        let mut g = self.inner.lock().unwrap();
        if g.closed || !g.running {
            return Err(closed());
        }
        if g.stopping {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        if g.tracking {
            return Ok(Some(self.track_locked(&mut g, offset, len)));
        }
        let fits = |g: &Inner, held: u64| held + g.reserved + need <= self.opts.max_disk_bytes;
        if data > 0 && !g.segments.is_empty() && !fits(&g, g.disk_bytes) {
            // Only the tail, acknowledged, in the way: start a new segment (with this write's
            // intent) and trim the tail then. Waiting would be for good: nothing is left to
            // acknowledge, and the last segment is never trimmed.
            if let Some(tail) = self.acked_tail_bytes(&g) {
                if fits(&g, g.disk_bytes - tail) {
                    g.rotate_next = true;
                }
            }
        }
        if data > 0 && !g.segments.is_empty() && !g.rotate_next && !fits(&g, g.disk_bytes) {
            if self.folds_when_stuck(&g) {
                self.fold_locked(&mut g, "the journal is full");
                return Ok(Some(self.track_locked(&mut g, offset, len)));
            }
            if let Some(w) = waker {
                self.space.register(w);
            }
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
        if g.waiting_for_space && data > 0 {
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
            time_ms: 0,
        };
        let rotating = g.rotate_next;
        let appended = self.append_locked(&mut g, &h, &[]);
        g.reserved -= HEADER_LEN as u64;
        if rotating && !g.rotate_next {
            // The rotation trimmed the old tail (`append_locked_once`).
            g.tail_rotations += 1;
        }
        if let Err(e) = appended {
            g.reserved -= need - HEADER_LEN as u64;
            if self.folds_when_stuck(&g) {
                // Nothing reached the disk yet: the map takes the write.
                self.fold_locked(&mut g, &format!("an intent cannot be written ({e})"));
                return Ok(Some(self.track_locked(&mut g, offset, len)));
            }
            return Err(e);
        }
        g.open_intents.insert(seq, (offset, len));
        Ok(Some(Intent {
            seq,
            reserved: need - HEADER_LEN as u64,
        }))
    }

    /// The write announced by `intent` completed on the local disk; returns its sequence
    /// number. If the record cannot be written, the range is marked for a re-read (the disk
    /// holds the write; the mirror must get it) and the error is returned.
    pub fn complete(&self, intent: Intent, offset: u64, payload: Payload) -> io::Result<u64> {
        let mut g = self.inner.lock().unwrap();
        g.reserved -= intent.reserved;
        let len = payload.len();
        if self.tracked(&g, intent) {
            self.observe_tracked(&g, offset, &payload);
            return Ok(0);
        }
        #[cfg(any(test, feature = "test-hooks"))]
        let kept = payload.clone();
        match self.record_locked(&mut g, offset, payload, intent.seq) {
            Ok(seq) => Ok(seq),
            Err(e) if self.folds_when_stuck(&g) => {
                // The write is on the disk; its range (an open intent) goes into the map with
                // everything unshipped, and the client hears success.
                self.fold_locked(&mut g, &format!("a record cannot be written ({e})"));
                #[cfg(any(test, feature = "test-hooks"))]
                self.observe_tracked(&g, offset, &kept);
                Ok(0)
            }
            Err(e) => {
                // The intent stays open (its segment is kept, a crash finds it again) until the
                // range is re-read and journaled.
                g.dirty.push(Dirty {
                    offset,
                    len,
                    intent: intent.seq,
                });
                drop(g);
                self.records.notify_subscribers();
                Err(e)
            }
        }
    }

    /// The write announced by `intent` failed: the range's content is unknown, re-read it (the
    /// intent stays open until then).
    pub fn fail(&self, intent: Intent) {
        let mut g = self.inner.lock().unwrap();
        g.reserved -= intent.reserved;
        if self.tracked(&g, intent) {
            // Its region is dirty: the resync reads whatever the disk holds.
            return;
        }
        if let Some(&(offset, len)) = g.open_intents.get(&intent.seq) {
            g.dirty.push(Dirty {
                offset,
                len: u64::from(len),
                intent: intent.seq,
            });
        }
        drop(g);
        self.records.notify_subscribers();
    }

    /// Journal the current content of a range re-read from the volume; `closes` is the dirty
    /// range this read finishes (its intent is closed by the record).
    pub fn resync(&self, offset: u64, data: Bytes, closes: Option<&Dirty>) -> io::Result<u64> {
        let mut g = self.inner.lock().unwrap();
        let completes = closes.map_or(0, |d| d.intent);
        self.record_locked(&mut g, offset, Payload::Data(data), completes)
    }

    /// Ranges waiting to be re-read from the volume (taken: the caller must journal them with
    /// [`Journal::resync`], or give them back with [`Journal::give_back`]).
    pub fn take_dirty(&self) -> Vec<Dirty> {
        std::mem::take(&mut self.inner.lock().unwrap().dirty)
    }

    /// Dirty ranges the caller could not re-read now.
    pub fn give_back(&self, ranges: impl IntoIterator<Item = Dirty>) {
        self.inner.lock().unwrap().dirty.extend(ranges);
        self.records.notify_subscribers();
    }

    /// A journal that is full or cannot append folds (track mode) rather than make writes
    /// wait or fail.
    fn folds_when_stuck(&self, g: &Inner) -> bool {
        self.opts.on_full == OnFull::Track && g.map.is_some()
    }

    /// A write the dirty map took (or an intent folded into it while in flight).
    fn tracked(&self, g: &Inner, intent: Intent) -> bool {
        intent.seq == 0
            || g.map
                .as_ref()
                .is_some_and(|m| intent.seq <= m.fold().folded_through)
    }

    #[allow(unused_variables)]
    fn observe_tracked(&self, g: &Inner, offset: u64, payload: &Payload) {
        #[cfg(any(test, feature = "test-hooks"))]
        if let Some(f) = &*self.observer.lock().unwrap() {
            let at = g.map.as_ref().map_or(0, |m| m.fold().folded_through);
            f(Observed::Tracked(
                at,
                &Extent {
                    offset,
                    payload: payload.clone(),
                },
            ));
        }
    }

    /// Tracking: mark the write's regions (before it reaches the disk) instead of journaling.
    fn track_locked(&self, g: &mut Inner, offset: u64, len: u32) -> Intent {
        g.tracked_writes += 1;
        let map = g.map.as_mut().expect("tracking needs the map");
        if let Err(e) = map.mark(offset, u64::from(len)) {
            self.map_failed(g, &e);
        }
        Intent {
            seq: 0,
            reserved: 0,
        }
    }

    /// The map's file may lack marks now. Its regions are kept in memory (the resync sends
    /// them while the process lives); the file is removed, durably, so that a restart cannot
    /// trust it: a journal whose map is gone makes the mirror be compared in full
    /// (`holds_after`). The whole map is written afresh once that works again
    /// ([`Journal::heal_map_locked`]).
    fn map_failed(&self, g: &mut Inner, e: &io::Error) {
        let mut why = format!(
            "cannot write the dirty map: {e}; its regions are kept in memory: a stop before \
             the map is saved again means a full comparison of the mirror"
        );
        if !g.map_untrusted {
            g.map_untrusted = true;
            let path = g.map.as_ref().expect("a map failed").path().to_path_buf();
            let removed = match self.opts.fs.remove_file(&path) {
                Err(r) if r.kind() != io::ErrorKind::NotFound => Err(format!(
                    "it cannot be removed ({r}): a restart would trust an incomplete map"
                )),
                _ => self.opts.fs.sync_dir(&self.opts.dir).map_err(|r| {
                    format!(
                        "its removal cannot be made durable ({r}): a restart after a power \
                         cut could trust an incomplete map"
                    )
                }),
            };
            if let Err(r) = removed {
                why.push_str(&format!("; and {r}"));
            }
            tracing::error!("{why}");
        }
        g.map_failure = Some(why);
    }

    /// After a failure of the map's file, or its removal behind the daemon's back (seen at a
    /// FLUSH): write it whole again, if that works now.
    fn heal_map_locked(&self, g: &mut Inner) {
        let Some(map) = g.map.as_mut() else {
            return;
        };
        if !g.map_untrusted && self.opts.fs.exists(map.path()).is_ok_and(|e| !e) {
            tracing::error!(path = %map.path().display(),
                "the dirty map was removed while the daemon runs: written again whole");
            g.map_untrusted = true;
        }
        if !g.map_untrusted {
            return;
        }
        match map.rewrite(&self.opts.fs) {
            Ok(()) => {
                tracing::info!("dirty map saved again: a restart resyncs only its regions");
                g.map_untrusted = false;
                g.map_failure = None;
            }
            Err(e) => tracing::debug!("the dirty map still cannot be saved: {e}"),
        }
    }

    /// Fold (module doc): every unshipped record and write in flight into the dirty map, the
    /// records dropped, writes tracked from now on. Sessions see [`Journal::folds`] move and
    /// end: what they had in flight is in the map now.
    fn fold_locked(&self, g: &mut Inner, why: &str) {
        // Segments are only trimmed once acknowledged: before the first one kept, the mirror
        // holds everything (what `acked_seq`, which starts at 0 after a restart, may not say).
        let trimmed_through = g.segments.front().map_or(0, |s| s.first_seq - 1);
        let mut ranges: Vec<(u64, u64)> = g
            .index
            .iter()
            .filter(|e| e.seq > g.acked_seq)
            .map(|e| (e.offset, u64::from(e.len)))
            .collect();
        ranges.extend(g.open_intents.values().map(|&(o, l)| (o, u64::from(l))));
        ranges.extend(g.dirty.iter().map(|d| (d.offset, d.len)));
        let map = g.map.as_mut().expect("folding needs the map");
        let mut fold = map.fold();
        // Every write after this is in the journal or the map from now on.
        let covers = g.acked_seq.max(trimmed_through);
        fold.covers_after = Some(fold.covers_after.map_or(covers, |c| c.min(covers)));
        fold.folded_through = g.next_seq;
        let mut failed = None;
        for (offset, len) in ranges {
            if let Err(e) = map.mark(offset, len) {
                failed = Some(e);
            }
        }
        if let Err(e) = map.set_fold(fold).and_then(|()| map.sync()) {
            failed = Some(e);
        }
        let dirty_bytes = map.dirty_bytes();
        if let Some(e) = failed {
            self.map_failed(g, &e);
        }
        #[cfg(any(test, feature = "test-hooks"))]
        if let Some(f) = &*self.observer.lock().unwrap() {
            for d in &g.dirty {
                f(Observed::Adopted {
                    seq: fold.folded_through,
                    offset: d.offset,
                    len: d.len,
                });
            }
        }
        g.index.clear();
        g.ram.clear();
        g.ram_bytes = 0;
        g.lag_bytes = 0;
        g.dirty.clear();
        g.open_intents.clear();
        g.next_seq = fold.folded_through + 1;
        g.rotate_next = false;
        while let Some(seg) = g.segments.pop_front() {
            g.disk_bytes -= seg.len;
            if let Err(e) = self.retire(g, seg) {
                tracing::warn!("cannot remove a folded journal segment: {e}");
            }
        }
        // The next segment now, empty: its name keeps the numbering after the fold even if the
        // dirty map is lost (then the journal holds nothing before it, and the mirror is
        // compared rather than resumed past writes that are nowhere).
        if let Err(e) = self.start_segment_locked(g, g.next_seq) {
            tracing::warn!("cannot start a journal segment after the fold: {e}");
        }
        g.dir_changed = true;
        g.tracking = true;
        // Under the lock, with the fold: a reader that sees the count sees the fold.
        self.folds.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(dirty_bytes, folded_through = fold.folded_through,
            covers_after = ?fold.covers_after,
            "journal folded into the dirty map ({why}): writes go on at local speed, the \
             regions they change are resynced when the mirror is back");
        if std::mem::take(&mut g.waiting_for_space) {
            g.full_logged = false;
        }
        self.space.wake_all();
        self.records.notify_subscribers();
    }

    /// Every byte range this journal knows a write in after seq `after_seq` (0: every record
    /// it holds), with writes announced and not recorded, ranges to re-read, and the dirty
    /// map's regions (those may be older: they are included whole); coalesced, in offset
    /// order. With [`Journal::holds_after`] at or below `after_seq`, these cover every write
    /// after it (a divergent tail's regions).
    pub fn regions_after(&self, after_seq: u64) -> Vec<(u64, u64)> {
        let g = self.inner.lock().unwrap();
        let start = g.index.partition_point(|e| e.seq <= after_seq);
        let mut ranges: Vec<(u64, u64)> = g
            .index
            .range(start..)
            .map(|e| (e.offset, u64::from(e.len)))
            .collect();
        ranges.extend(g.open_intents.values().map(|&(o, l)| (o, u64::from(l))));
        ranges.extend(g.dirty.iter().map(|d| (d.offset, d.len)));
        if let Some(map) = &g.map {
            ranges.extend(map.runs());
        }
        coalesce(ranges)
    }

    /// A peer that gave up data of its own (a divergent tail, saved there) needs `regions`
    /// resynced from this side along with everything this journal holds: mark them in the
    /// dirty map (created if this journal has none) and fold, so that the session's resync
    /// reads them all from the volume and the peer stages them (it stays the state it was
    /// until the resync's end). Call it before the session's decision takes effect.
    pub fn take_over(&self, regions: &[(u64, u64)]) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        if g.map.is_none() {
            let path = self.opts.dir.join(DIRTY_MAP);
            g.map = Some(DirtyMap::create(
                &self.opts.fs,
                &path,
                self.opts.volume_bytes,
                self.opts.region_bytes,
            )?);
            self.opts.fs.sync_dir(&self.opts.dir)?;
        }
        let map = g.map.as_mut().expect("created above");
        map.mark_ranges(regions)?;
        map.sync()?;
        self.fold_locked(
            &mut g,
            "the peer gave up writes of its own: resynced from here",
        );
        Ok(())
    }

    /// A session with the mirror started: journal writes again (the resync reads what the map
    /// tracked meanwhile).
    pub fn resume_journaling(&self) {
        let mut g = self.inner.lock().unwrap();
        if std::mem::take(&mut g.tracking) {
            // The append that failed (if one made the journal fold) is tried afresh: the next
            // one that fails says so again.
            g.append_failure = None;
            tracing::info!(
                tracked_writes = g.tracked_writes,
                "journal: writes are journaled again; the dirty regions are being resynced"
            );
        }
    }

    /// Times the journal folded since it opened: a session that began before the latest fold
    /// must end (the map holds what it had in flight).
    pub fn folds(&self) -> u64 {
        // Not behind the journal's lock: the shipper asks before every set.
        self.folds.load(Ordering::SeqCst)
    }

    /// The open resync, if any (`dirty::Fold`).
    pub fn fold(&self) -> Option<Fold> {
        let g = self.inner.lock().unwrap();
        g.map
            .as_ref()
            .map(|m| m.fold())
            .filter(|f| f.covers_after.is_some())
    }

    /// Dirty runs of at most `max_bytes` in all, from `offset` on (the first clipped to start
    /// there), each at most `piece` long.
    pub fn dirty_runs(&self, offset: u64, max_bytes: u64, piece: u64) -> Vec<(u64, u64)> {
        let g = self.inner.lock().unwrap();
        let Some(map) = g.map.as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut total = 0;
        for (o, l) in map.runs_from(offset) {
            let (mut at, end) = (o.max(offset), o + l);
            while at < end && total < max_bytes {
                let n = piece.min(end - at);
                out.push((at, n));
                total += n;
                at += n;
            }
            if total >= max_bytes {
                break;
            }
        }
        out
    }

    /// The mirror holds `ranges` (read while [`Journal::folds`] was `folds`): their regions
    /// are clean, unless the journal folded since (the fold may have marked them again).
    pub fn resynced(&self, ranges: &[(u64, u64)], folds: u64) {
        let mut g = self.inner.lock().unwrap();
        if self.folds() != folds {
            return;
        }
        let Some(map) = g.map.as_mut() else { return };
        let mut failed = None;
        for &(o, l) in ranges {
            if let Err(e) = map.clear(o, l) {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            self.map_failed(&mut g, &e);
        }
    }

    /// The mirror holds the resync's end (read while [`Journal::folds`] was `folds`): if no
    /// region is left (`whole`: a full copy or comparison covered them all), the resync is
    /// closed.
    pub fn resync_complete(&self, folds: u64, whole: bool) -> bool {
        let mut g = self.inner.lock().unwrap();
        if self.folds() != folds || g.tracking {
            return false;
        }
        // Closed only in a map that is on disk: a restart must not find an older one.
        self.heal_map_locked(&mut g);
        if g.map_untrusted {
            return false;
        }
        let volume_bytes = self.opts.volume_bytes;
        let Some(map) = g.map.as_mut() else {
            return false;
        };
        if whole && map.dirty_regions() > 0 {
            if let Err(e) = map.clear(0, volume_bytes) {
                self.map_failed(&mut g, &e);
                return false;
            }
        }
        let map = g.map.as_mut().expect("checked");
        let mut fold = map.fold();
        if map.dirty_regions() > 0 || fold.covers_after.is_none() {
            return false;
        }
        fold.covers_after = None;
        match map.set_fold(fold).and_then(|()| map.sync()) {
            Ok(()) => {
                tracing::info!("resync from the dirty map complete: the mirror holds it");
                g.map_failure = None;
                true
            }
            Err(e) => {
                self.map_failed(&mut g, &e);
                false
            }
        }
    }

    fn record_locked(
        &self,
        g: &mut Inner,
        offset: u64,
        payload: Payload,
        completes: u64,
    ) -> io::Result<u64> {
        // A write that completes after a clean close stays an open intent, which the next
        // start re-reads: nothing is appended behind the closed tail.
        if g.closed || !g.running {
            return Err(closed());
        }
        let seq = g.next_seq;
        let time_ms = (self.opts.clock)();
        let (h, data): (Header, &[u8]) = match &payload {
            Payload::Data(d) => (
                Header {
                    kind: Kind::Data,
                    seq,
                    offset,
                    len: d.len() as u32,
                    data_crc: crc32fast::hash(d),
                    completes,
                    time_ms,
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
                    time_ms,
                },
                &[],
            ),
        };
        let (segment, pos) = self.append_locked(g, &h, data)?;
        // The write it completes (or the dirty range it re-read) is accounted for.
        if completes != 0 {
            g.open_intents.remove(&completes);
        }
        #[cfg(any(test, feature = "test-hooks"))]
        if let Some(f) = &*self.observer.lock().unwrap() {
            f(Observed::Record(
                seq,
                &Extent {
                    offset,
                    payload: payload.clone(),
                },
            ));
        }
        g.index.push_back(Entry {
            seq,
            offset,
            len: h.len,
            zero: h.kind == Kind::Zero,
            segment,
            data_pos: pos + HEADER_LEN as u64,
            crc: h.data_crc,
            at: Instant::now(),
            written_ms: time_ms,
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
        self.records.notify_subscribers();
        Ok(seq)
    }

    /// Append one record to the current segment; returns (segment id, header position). A
    /// failure is kept for status until a record with data is appended (a bare header may
    /// still fit in a full file system's last page).
    fn append_locked(&self, g: &mut Inner, h: &Header, data: &[u8]) -> io::Result<(u64, u64)> {
        let appended = self.append_locked_once(g, h, data);
        match &appended {
            Ok(_) if !data.is_empty() => g.append_failure = None,
            Ok(_) => {}
            Err(e) => g.append_failure = Some(format!("cannot append to the journal: {e}")),
        }
        appended
    }

    fn append_locked_once(&self, g: &mut Inner, h: &Header, data: &[u8]) -> io::Result<(u64, u64)> {
        let rotate = g.rotate_next
            || g.segments
                .back()
                .is_none_or(|s| s.len >= self.opts.segment_bytes);
        if rotate {
            // A closed segment is not synced here: only a client FLUSH or FUA asks for
            // durability (`sync`). Syncing at rotation stalled every writer behind the lock
            // and wrote records to disk that, once acknowledged, are deleted unread.
            self.start_segment_locked(g, h.seq)?;
            // The old tail may have been acknowledged while it was the last segment, which
            // only an acknowledgement trimmed: with the mirror away none comes, and it would
            // hold its bytes against the cap. Trimmable now, it goes; parked writers retry
            // (waking under the lock is the order `begin_or_wait` registers them in).
            let acked = g.acked_seq;
            if self.trim_locked(g, acked) {
                g.waiting_for_space = false;
                self.space.wake_all();
            }
        }
        let seg = g.segments.back_mut().expect("segment just ensured");
        let pos = seg.len;
        // Header and data in one system call, at an explicit offset: a 4 KiB write costs two
        // records (intent, completion), so calls are most of the journal's cost; and a write
        // that fails half-way leaves `len` where it was, for the next record to overwrite.
        let head = h.encode();
        write_all_vectored_at(
            &*seg.file,
            &mut [IoSlice::new(&head), IoSlice::new(data)],
            pos,
        )?;
        let n = (HEADER_LEN + data.len()) as u64;
        seg.len += n;
        seg.last_seq = h.seq;
        let id = seg.first_seq;
        g.disk_bytes += n;
        g.next_seq = h.seq + 1;
        Ok((id, pos))
    }

    /// A new, empty segment for records from `first_seq` on: a spare renamed, or a new file.
    fn start_segment_locked(&self, g: &mut Inner, first_seq: u64) -> io::Result<()> {
        let path = segment_path(&self.opts.dir, first_seq);
        let reused = g.spares.reuse_as(&path)?;
        // The new name is durable with the next `sync`, which syncs the directory first.
        g.dir_changed = true;
        let mut how = OpenOptions::write();
        if !reused {
            how = how.create().truncate();
        }
        let file = self.opts.fs.open(&path, how)?;
        g.rotate_next = false;
        g.segments.push_back(Segment {
            first_seq,
            last_seq: first_seq,
            path,
            file,
            len: 0,
            synced_len: 0,
        });
        Ok(())
    }

    /// Make every record appended so far durable (client FLUSH / FUA).
    pub fn sync(&self) -> io::Result<()> {
        let _serial = self.sync_serial.lock().unwrap();
        // Oldest first, outside the lock: writers keep appending meanwhile.
        let (unsynced, dir_changed): (Vec<(Handle, u64)>, bool) = {
            let mut g = self.inner.lock().unwrap();
            self.heal_map_locked(&mut g);
            // Regions tracked so far survive a power cut with the writes this sync covers.
            if let Some(Err(e)) = g.map.as_mut().map(|m| m.sync()) {
                self.map_failed(&mut g, &e);
            }
            let dir_changed = std::mem::take(&mut g.dir_changed);
            let unsynced = g
                .segments
                .iter()
                .filter(|s| s.synced_len < s.len)
                .map(|s| (s.file.clone(), s.len))
                .collect();
            (unsynced, dir_changed)
        };
        // A new segment's name must survive a power loss with its records.
        if dir_changed {
            if let Err(e) = self.opts.fs.sync_dir(&self.opts.dir) {
                self.inner.lock().unwrap().dir_changed = true;
                return self.sync_failed(e, "cannot sync the journal's directory");
            }
        }
        let synced_any = !unsynced.is_empty();
        for (file, len) in unsynced {
            if let Err(e) = file.sync_data() {
                return self.sync_failed(e, "cannot sync the journal");
            }
            let mut g = self.inner.lock().unwrap();
            // The segment may have been acknowledged and removed meanwhile.
            if let Some(s) = g.segments.iter_mut().find(|s| Arc::ptr_eq(&s.file, &file)) {
                s.synced_len = s.synced_len.max(len);
            }
        }
        if dir_changed || synced_any {
            self.inner.lock().unwrap().sync_failure = None;
        }
        Ok(())
    }

    /// A sync of the journal failed: its records may not survive a power cut. In track mode
    /// they fold into the dirty map, synced by the fold, and the FLUSH that asked succeeds:
    /// the volume holds the writes (its own sync is the caller's) and the map names their
    /// regions. If the map cannot be saved either, its file is removed and status says a
    /// full comparison is due: a restart finds no map (or, after a power cut, a host crash
    /// that breaks the generation) and the mirror is compared, never resumed past writes
    /// that are nowhere. In block mode the caller hears the error, once, as from a disk whose
    /// write failed: the records may never reach the disk (Linux marks pages whose writeback
    /// failed clean, so a later sync does not retry them). After a power cut that is no worse
    /// than any unsynced tail (a host crash breaks the generation: the mirror is compared);
    /// pages evicted before they are shipped read back old, and the mirror refuses them (the
    /// journal's CRC travels with each record).
    /// Status names the failure until a sync works again.
    fn sync_failed(&self, e: io::Error, what: &str) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        let why = format!("{what}: {e}");
        g.sync_failure = Some(why.clone());
        if !self.folds_when_stuck(&g) {
            return Err(e);
        }
        // Already tracking: nothing is at risk. Writes go to the map; the only records are
        // re-reads of ranges whose intents the fold already put in the map.
        if !g.tracking {
            self.fold_locked(&mut g, &why);
        }
        Ok(())
    }

    /// The daemon stops: refuse every write not yet admitted (ESHUTDOWN, which NBD tells the
    /// client as such) and wake the parked ones so they hear it, rather than waiting for room
    /// only the mirror could make. Writes already admitted complete, so the journal then
    /// closes cleanly.
    pub fn refuse_new_writes(&self) {
        self.inner.lock().unwrap().stopping = true;
        self.space.wake_all();
    }

    /// The mirror made everything up to `seq` durable: forget it and free whole segments.
    /// A sequence number the journal never wrote is refused, not trimmed to.
    pub fn ack(&self, seq: u64) -> Result<(), JournalError> {
        let mut g = self.inner.lock().unwrap();
        let last = g.next_seq - 1;
        if seq > last {
            return Err(JournalError::AckBeyondEnd { acked: seq, last });
        }
        if seq <= g.acked_seq {
            return Ok(());
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
        let freed = self.trim_locked(&mut g, seq);
        // A tail now wholly acknowledged is rotated out by the next write that needs its room
        // (`begin_or_wait`): a writer parked on it must retry, though nothing was freed yet.
        // Not only when `waiting_for_space` says so: any write that fits clears it, also while
        // a larger one stays parked (waking no one is cheap).
        let tail_free = self.acked_tail_bytes(&g).is_some();
        if freed || tail_free {
            // Whoever waits retries; one that still does not fit marks the journal full again.
            g.waiting_for_space = false;
            drop(g);
            self.space.wake_all();
        }
        Ok(())
    }

    /// Bytes of the tail segment when every record in it is acknowledged and no write it
    /// announced is still open (it would be trimmed, were it not the last).
    fn acked_tail_bytes(&self, g: &Inner) -> Option<u64> {
        let tail = g.segments.back()?;
        let oldest_open = g.open_intents.keys().next().copied().unwrap_or(u64::MAX);
        (tail.last_seq <= g.acked_seq && tail.last_seq < oldest_open).then_some(tail.len)
    }

    /// Free the whole segments acknowledged up to `seq`; whether any was.
    fn trim_locked(&self, g: &mut Inner, seq: u64) -> bool {
        let oldest_open = g.open_intents.keys().next().copied().unwrap_or(u64::MAX);
        let mut freed = false;
        // Never the last segment: it is being appended to.
        while g.segments.len() > 1 {
            let s = g.segments.front().unwrap();
            if s.last_seq > seq || s.last_seq >= oldest_open {
                break;
            }
            let s = g.segments.pop_front().unwrap();
            g.disk_bytes -= s.len;
            freed = true;
            if let Err(e) = self.retire(g, s) {
                tracing::warn!("cannot remove or recycle an acknowledged journal segment: {e}");
            }
            g.dir_changed = true;
        }
        freed
    }

    /// Keep an acknowledged segment as a spare, or delete it. Never a segment still mapped
    /// by records in flight (or being synced): its pages must not change under them.
    /// A spare is cut back to one segment (every segment ends up to one record past it, a
    /// large write's by up to 32 MiB, an older configuration's may be larger): reused, its
    /// whole length would stay on disk while only the records written into it are counted,
    /// and the journal's disk would outgrow its cap. The cut frees at most the last record's
    /// blocks, not the segment's.
    fn retire(&self, g: &mut Inner, s: Segment) -> io::Result<()> {
        if Arc::strong_count(&s.file) > 1 || s.file.mapped() {
            return self.opts.fs.remove_file(&s.path);
        }
        if s.file.size()? > self.opts.segment_bytes {
            s.file.set_len(self.opts.segment_bytes)?;
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
            OnDisk(Handle, u64, u32),
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
                    Data::OnDisk(g.segments[seg_idx].file.clone(), e.data_pos, e.len)
                };
                let crc = (!e.zero).then_some(e.crc);
                pending.push((e.seq, e.offset, data, crc, e.written_ms));
            }
            (pending, covered)
        };
        // Records read back from a segment are usually neighbours there: one mapping per run
        // of them, sliced without copying.
        let mut out = Vec::with_capacity(pending.len());
        let mut i = 0;
        while i < pending.len() {
            let (seq, offset, data, crc, written_ms) = &pending[i];
            let Data::OnDisk(file, first_pos, _) = data else {
                let Data::Ready(p) = data else { unreachable!() };
                out.push(ShipRecord {
                    seq: *seq,
                    extent: Extent {
                        offset: *offset,
                        payload: p.clone(),
                    },
                    crc: *crc,
                    written_ms: *written_ms,
                });
                i += 1;
                continue;
            };
            // The first record always joins, however long (an NBD write may be 32 MiB).
            let mut end = i;
            let mut span_end = *first_pos;
            while let Some((_, _, Data::OnDisk(f, pos, len), _, _)) = pending.get(end) {
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
            let span = file.map(*first_pos, (span_end - first_pos) as usize)?;
            for (seq, offset, data, crc, written_ms) in &pending[i..end] {
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
                    written_ms: *written_ms,
                });
            }
            i = end;
        }
        Ok((out, covered.max(after_seq)))
    }

    /// The `chunk`-sized pieces of the volume (numbered from 0) that records after
    /// `after_seq`, open intents and ranges to re-read touch, as of now: one pass over the
    /// unshipped records for a whole verify pass, instead of one per chunk. Complete it with
    /// [`Journal::settled_since`]`(changed.as_of, ..)` for what came after.
    pub fn changed_chunks(&self, after_seq: u64, chunk: u64) -> ChangedChunks {
        let g = self.inner.lock().unwrap();
        let mut chunks = std::collections::HashSet::new();
        let mut add = |o: u64, l: u64| {
            if l > 0 {
                chunks.extend(o / chunk..=(o + l - 1) / chunk);
            }
        };
        let start = g.index.partition_point(|e| e.seq <= after_seq);
        for e in g.index.range(start..) {
            add(e.offset, u64::from(e.len));
        }
        for &(o, l) in g.open_intents.values() {
            add(o, u64::from(l));
        }
        for d in &g.dirty {
            add(d.offset, d.len);
        }
        ChangedChunks {
            as_of: g.next_seq - 1,
            tracking: g.tracking,
            chunks,
        }
    }

    /// Whether `[offset, offset + len)` holds nothing the records up to `after_seq` do not
    /// say: no record after it, no write announced and not recorded (in flight, failed, or
    /// from before a crash), no range waiting to be re-read, and no tracking into the dirty
    /// map. Read under the range's lock, such a range is what the records up to `after_seq`
    /// made it (the online verify's precondition).
    pub fn settled_since(&self, after_seq: u64, offset: u64, len: u64) -> bool {
        let g = self.inner.lock().unwrap();
        let end = offset + len;
        let overlaps = |o: u64, l: u64| o < end && offset < o + l;
        if g.tracking || g.dirty.iter().any(|d| overlaps(d.offset, d.len)) {
            return false;
        }
        if g.open_intents
            .values()
            .any(|&(o, l)| overlaps(o, u64::from(l)))
        {
            return false;
        }
        let start = g.index.partition_point(|e| e.seq <= after_seq);
        !g.index
            .range(start..)
            .any(|e| overlaps(e.offset, u64::from(e.len)))
    }

    /// How long to hold back a write before it is admitted (`--pace-above`): nothing while
    /// the unacknowledged records fill less than `pace_above` percent of the cap, then rising
    /// linearly to [`MAX_PACE_DELAY`] at a full journal. It slows the clients of a mirror that
    /// falls behind for a while, so that the journal may not have to fold; never for longer
    /// than that bound per write, and not at all once the journal has folded (writes then go
    /// at local speed).
    pub fn pace_delay(&self) -> Duration {
        let Some(above) = self.opts.pace_above else {
            return Duration::ZERO;
        };
        let g = self.inner.lock().unwrap();
        if g.tracking || g.closed {
            return Duration::ZERO;
        }
        let cap = self.opts.max_disk_bytes as f64;
        let fill = (g.lag_bytes + g.reserved) as f64 / cap;
        let from = f64::from(above) / 100.0;
        if fill <= from {
            return Duration::ZERO;
        }
        let share = ((fill - from) / (1.0 - from)).min(1.0);
        drop(g);
        self.paced_writes.fetch_add(1, Ordering::Relaxed);
        MAX_PACE_DELAY.mul_f64(share)
    }

    pub fn last_seq(&self) -> u64 {
        self.inner.lock().unwrap().next_seq - 1
    }

    /// The highest sequence number the mirror acknowledged in this run (0 after a start).
    pub fn acked_seq(&self) -> u64 {
        self.inner.lock().unwrap().acked_seq
    }

    /// What the journal can vouch for (`PrimaryClaim::journal_acked`): every write after this
    /// sequence number is in the journal or in the dirty map, so a mirror that holds less
    /// must be compared. Segments are trimmed only once acknowledged, so the first one kept
    /// says how far the mirror had got even after a restart; an open fold covers what it
    /// folded; a fold whose map was lost covers nothing, and the records it dropped are
    /// missing.
    pub fn holds_after(&self) -> u64 {
        let g = self.inner.lock().unwrap();
        let trimmed = g.segments.front().map_or(0, |s| s.first_seq - 1);
        let fold = g.map.as_ref().map(|m| m.fold()).unwrap_or_default();
        let trimmed = match fold.covers_after {
            // The first segment after a fold starts right after it: what lies before is in
            // the map, not trimmed.
            Some(covers) if trimmed <= fold.folded_through => covers,
            Some(covers) => covers.max(trimmed),
            None => trimmed,
        };
        g.acked_seq.max(trimmed)
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
            dirty_ranges: g.dirty.len(),
            failure: g.append_failure.clone().or_else(|| g.sync_failure.clone()),
            tail_rotations: g.tail_rotations,
            tracking: g.tracking,
            dirty_bytes: g.map.as_ref().map_or(0, |m| {
                (m.dirty_regions() * m.region_bytes()).min(self.opts.volume_bytes)
            }),
            folds: self.folds(),
            map_failure: g.map_failure.clone(),
            paced_writes: self.paced_writes.load(Ordering::Relaxed),
        }
    }
}

/// Largest single mapping when records are read back from a segment.
const READ_RUN_BYTES: u64 = 8 << 20;

/// Read one segment back into the index. Its records run from the sequence number in its name
/// without a gap; the first record that is torn or not the next one ends it (in a recycled
/// segment, what follows the live records is an older lap), and the file is cut there.
fn recover_segment(
    opts: &JournalOptions,
    g: &mut Inner,
    first_seq: u64,
    path: &Path,
    last_stop: LastStop,
) -> io::Result<()> {
    let file = opts.fs.open(path, OpenOptions::write())?;
    let data = crate::env::read_all(&*file)?;
    let mut pos = 0usize;
    let mut last_seq = first_seq;
    // An empty segment (a crash right after rotating) still fixes where numbering resumes.
    g.next_seq = g.next_seq.max(first_seq);
    let mut older_lap = false;
    let now = Instant::now();
    let now_ms = (opts.clock)();
    while pos < data.len() {
        let Some((h, header_len)) = Header::decode(&data[pos..]) else {
            break;
        };
        if h.seq != g.next_seq {
            older_lap = h.seq < first_seq;
            break;
        }
        let body = &data[pos + header_len..];
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
                // Lag counts from when the write completed, as far as the clock says.
                let age = Duration::from_millis(now_ms.saturating_sub(h.time_ms));
                g.index.push_back(Entry {
                    seq: h.seq,
                    offset: h.offset,
                    len: h.len,
                    zero: h.kind == Kind::Zero,
                    segment: first_seq,
                    data_pos: (pos + header_len) as u64,
                    crc: h.data_crc,
                    at: now.checked_sub(age).unwrap_or(now),
                    written_ms: h.time_ms,
                });
                g.lag_bytes += h.len as u64;
            }
        }
        last_seq = h.seq;
        g.next_seq = h.seq + 1;
        pos += header_len + h.data_len();
    }
    if pos < data.len() {
        match last_stop {
            // After a clean stop the tail was cut: anything there now is damage.
            LastStop::Clean => tracing::warn!(path = %path.display(), at = pos,
                "journal: unexpected bytes after the last record of a cleanly closed journal; cut"),
            _ if older_lap => tracing::debug!(path = %path.display(), at = pos,
                "journal: recycled segment's older records cut"),
            _ => tracing::info!(path = %path.display(), at = pos,
                "journal: tail cut after the last intact record (the last stop was not clean)"),
        }
        file.set_len(pos as u64)?;
        file.sync_data()?;
    }
    g.disk_bytes += pos as u64;
    g.segments.push_back(Segment {
        first_seq,
        last_seq,
        path: path.to_path_buf(),
        file,
        len: pos as u64,
        // After a stop that was not clean the records read may sit in the page cache only (a
        // killed process's writes): the next sync makes them durable before anything (a clean
        // stop's marker, a new generation) vouches for them.
        synced_len: if last_stop == LastStop::Clean {
            pos as u64
        } else {
            0
        },
    });
    Ok(())
}

/// `ranges` sorted by offset, overlapping and touching ones merged.
pub fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|&(_, l)| l > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (o, l) in ranges {
        match out.last_mut() {
            Some((po, pl)) if o <= *po + *pl => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{os, OsFs};

    fn opts(dir: &Path) -> JournalOptions {
        JournalOptions {
            fs: os(),
            boot_id: "boot-1".into(),
            clock: system_clock(),
            dir: dir.to_path_buf(),
            max_disk_bytes: 1 << 20,
            ram_bytes: 8192,
            segment_bytes: 16 << 10,
            on_full: OnFull::Block,
            volume_bytes: 0,
            region_bytes: dirty::DEFAULT_REGION_BYTES,
            pace_above: None,
        }
    }

    fn ranges(d: Vec<Dirty>) -> Vec<(u64, u64)> {
        d.into_iter().map(|d| (d.offset, d.len)).collect()
    }

    /// Open and mark running, as a daemon does once its state is recorded.
    fn open(o: JournalOptions) -> Journal {
        let j = Journal::open(o).unwrap();
        j.mark_running().unwrap();
        j
    }

    /// Begin, retrying while the journal says "not now" (as the connection loop does).
    fn begin(j: &Journal, offset: u64, len: u32) -> io::Result<Intent> {
        loop {
            if let Some(i) = j.begin(offset, len, true)? {
                return Ok(i);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn data(b: u8, n: usize) -> Payload {
        Payload::Data(Bytes::from(vec![b; n]))
    }

    use std::sync::atomic::{AtomicBool, Ordering};

    /// A waker that remembers it was woken.
    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Small acknowledged-or-not records until the only segment is just under `segment` bytes
    /// (within 300 bytes): the next large write still goes into it.
    fn fill_tail_to_just_under(j: &Journal, segment: u64) {
        let write = |len: u32| {
            let it = j.begin(0, len, true).unwrap().expect("fits");
            j.complete(it, 0, data(1, len as usize)).unwrap();
        };
        while j.stats().disk_bytes + 4096 + 200 < segment {
            write(4096);
        }
        while j.stats().disk_bytes < segment - 300 {
            write(64);
        }
    }

    /// A journal of `max` bytes in segments of `segment` bytes, open and running.
    fn small_journal(dir: &Path, max: u64, segment: u64) -> Journal {
        let mut o = opts(dir);
        o.max_disk_bytes = max;
        o.segment_bytes = segment;
        open(o)
    }

    #[test]
    fn records_survive_reopen_and_open_intents_become_dirty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = open(opts(dir.path()));
            for i in 0..20u64 {
                let it = begin(&j, i * 4096, 4096).unwrap();
                j.complete(it, i * 4096, data(i as u8, 4096)).unwrap();
            }
            let z = begin(&j, 0, 8192).unwrap();
            j.complete(z, 0, Payload::Zero(8192)).unwrap();
            let _in_flight = begin(&j, 1 << 19, 512).unwrap();
            j.sync().unwrap();
        }
        let j = open(opts(dir.path()));
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
        assert_eq!(ranges(j.take_dirty()), vec![(1 << 19, 512)]);
    }

    #[test]
    fn a_failed_write_is_re_read() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(opts(dir.path()));
        let c = j.begin(4095, 2, true).unwrap().expect("room");
        j.fail(c);
        assert_eq!(ranges(j.take_dirty()), vec![(4095, 2)]);
    }

    #[test]
    fn torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = open(opts(dir.path()));
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
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let j = open(opts(dir.path()));
        let (recs, _) = j.collect(0, u64::MAX).unwrap();
        assert_eq!(recs.len(), 2, "the torn third record is gone");
        assert_eq!(
            ranges(j.take_dirty()),
            vec![(1024, 512)],
            "its intent survived: the range is re-read"
        );
    }

    #[test]
    fn ack_trims_segments_and_full_journal_waits() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(open(opts(dir.path())));
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
        j.ack(last).unwrap();
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
        let j = open(o);
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
        let j = open(opts(dir.path()));
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
        let j = open(o);
        for i in 0..40u8 {
            let it = begin(&j, 0, 4096).unwrap();
            j.complete(it, 0, data(i, 4096)).unwrap();
        }
        let (recs, _) = j.collect(0, u64::MAX).unwrap();
        assert_eq!(recs.len(), 40);
        let segments = || std::fs::read_dir(dir.path()).unwrap().count();
        let before = segments();
        j.ack(recs[35].seq).unwrap();
        assert!(segments() < before, "acknowledged segments are deleted");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.extent.payload, data(i as u8, 4096), "record {i}");
        }
    }

    fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
        numbered_segments(&OsFs, dir, suffix)
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
        let j = open(opts(dir.path()));
        let mut expect = Vec::new();
        for b in 0..120u8 {
            let seq = write(&j, b);
            expect.push((seq, b));
            if b % 10 == 9 {
                // The mirror acknowledges all but the last 5 records.
                let acked = expect[expect.len() - 6].0;
                j.ack(acked).unwrap();
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
        let j = open(opts(dir.path()));
        assert_eq!(shipped(&j, acked), expect);
        // Numbering continues, and the journal reopens again to the same records plus these.
        let seq = write(&j, 200);
        assert_eq!(seq, j.last_seq());
        expect.push((seq, 200));
        drop(j);
        let j = open(opts(dir.path()));
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
            let j = open(opts(dir.path()));
            for b in 0..12u8 {
                expect.push((write(&j, b), b));
            }
            let acked = expect[7].0;
            j.ack(acked).unwrap();
            expect.retain(|(s, _)| *s > acked);
            next = j.last_seq() + 1;
        }
        let spare = files(dir.path(), ".spare").pop().expect("a spare");
        std::fs::rename(&spare, dir.path().join(format!("{next:020}.jnl"))).unwrap();
        let j = open(opts(dir.path()));
        assert_eq!(j.last_seq(), next - 1);
        let acked = expect[0].0 - 1;
        assert_eq!(shipped(&j, acked), expect);
        let seq = write(&j, 99);
        assert_eq!(seq, next + 1, "an intent, then the record");
        expect.push((seq, 99));
        drop(j);
        let j = open(opts(dir.path()));
        assert_eq!(shipped(&j, acked), expect);
    }

    fn mem_opts(fs: &crate::env::mem::MemFs, boot: &str) -> JournalOptions {
        JournalOptions {
            fs: Arc::new(fs.clone()),
            boot_id: boot.into(),
            clock: Arc::new(|| 1_000),
            dir: PathBuf::from("/state/journal/v"),
            max_disk_bytes: 1 << 20,
            ram_bytes: 8192,
            segment_bytes: 16 << 10,
            on_full: OnFull::Block,
            volume_bytes: 0,
            region_bytes: dirty::DEFAULT_REGION_BYTES,
            pace_above: None,
        }
    }

    /// A 64 KiB journal in track mode over a 1 MiB volume of 4 KiB regions: it folds after a
    /// dozen writes.
    fn tracking_opts(fs: &crate::env::mem::MemFs) -> JournalOptions {
        JournalOptions {
            max_disk_bytes: 64 << 10,
            on_full: OnFull::Track,
            volume_bytes: 1 << 20,
            region_bytes: 4096,
            ..mem_opts(fs, "b1")
        }
    }

    /// Write blocks `first`, `first + 1`, ... until the journal folds; the next block.
    fn write_until_fold(j: &Journal, first: u8) -> u8 {
        let mut b = first;
        while j.stats().folds == 0 {
            write(j, b);
            b += 1;
        }
        b
    }

    /// Track mode, the journal's file system full: a write whose record cannot be written
    /// still succeeds (it is on the disk), its range and everything unshipped go into the
    /// dirty map, and status names the failure until journaling resumes.
    #[test]
    fn a_record_that_cannot_be_written_folds_and_the_write_succeeds() {
        use crate::env::mem::{Faults, MemFs};
        let fs = MemFs::new();
        let j = open(JournalOptions {
            on_full: OnFull::Track,
            volume_bytes: 1 << 20,
            region_bytes: 4096,
            pace_above: None,
            ..mem_opts(&fs, "b1")
        });
        write(&j, 1);
        fs.set_faults(Faults {
            capacity: Some(fs.used_bytes() + 3000),
            failing_syncs: 0,
            ..Default::default()
        });
        let it = begin(&j, 9 * 4096, 4096).unwrap();
        j.complete(it, 9 * 4096, data(9, 4096))
            .expect("the client hears success");
        let st = j.stats();
        assert!(st.tracking && st.folds == 1, "{st:?}");
        assert!(st.failure.is_some_and(|f| f.contains("No space")));
        let runs = j.dirty_runs(0, u64::MAX, u64::MAX);
        assert!(
            runs.contains(&(4096, 4096)) && runs.contains(&(9 * 4096, 4096)),
            "{runs:?}"
        );
        fs.set_faults(Faults::default());
        j.resume_journaling();
        assert_eq!(j.stats().failure, None);
        write(&j, 2);
    }

    /// A full journal in track mode folds: the unshipped records' regions go into the dirty
    /// map, writes go on without waiting, and after kill -9 the fold, the tracked regions and
    /// the numbering survive (no record folded is shipped again, no number is reused).
    /// `--pace-above 50`: no delay while the unacknowledged writes fill half the journal or
    /// less, then a delay that grows with the fill and never exceeds MAX_PACE_DELAY; none
    /// once acknowledged again, none once the journal has folded.
    #[test]
    fn pacing_rises_with_the_fill_and_stays_bounded() {
        use crate::env::mem::MemFs;
        let fs = MemFs::new();
        let j = open(JournalOptions {
            pace_above: Some(50),
            ..tracking_opts(&fs)
        });
        let mut delays = Vec::new();
        let mut b = 0u8;
        while j.stats().folds == 0 {
            delays.push(j.pace_delay());
            write(&j, b);
            b += 1;
        }
        assert_eq!(delays[0], Duration::ZERO, "an empty journal paces nothing");
        let paced: Vec<Duration> = delays.iter().copied().filter(|d| !d.is_zero()).collect();
        assert!(
            !paced.is_empty(),
            "the journal filled past half: {delays:?}"
        );
        assert!(paced.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert!(paced.iter().all(|&d| d <= MAX_PACE_DELAY), "{delays:?}");
        assert_eq!(j.stats().paced_writes, paced.len() as u64);
        assert_eq!(
            j.pace_delay(),
            Duration::ZERO,
            "folded: writes go at local speed"
        );
        // Journaling again, everything acknowledged: no pacing.
        j.resume_journaling();
        let s = write(&j, 250);
        j.ack(s).unwrap();
        assert_eq!(j.pace_delay(), Duration::ZERO);
    }

    /// The dirty map's file cannot be saved (a failing sync): status says a full comparison
    /// is due, and the file is removed, so that a restart cannot trust it (its journal no
    /// longer vouches for the mirror's point: the mirror is compared). Once it works again
    /// the map is written whole, every region in it, and the failure clears.
    #[test]
    fn a_dirty_map_that_cannot_be_saved_is_removed_then_written_whole() {
        use crate::env::mem::{Faults, MemFs};
        let fs = MemFs::new();
        let o = tracking_opts(&fs);
        let map_path = o.dir.join(DIRTY_MAP);
        let fsd: Fs = Arc::new(fs.clone());
        let j = open(o.clone());
        let first = write(&j, 0);
        j.ack(first).unwrap();
        write_until_fold(&j, 1);
        j.sync().unwrap();
        assert!(dirty::DirtyMap::open(&fsd, &map_path, 1 << 20).is_ok());
        fs.set_faults(Faults {
            failing_syncs: 1,
            ..Default::default()
        });
        write(&j, 200);
        let _ = j.sync();
        let failure = j.stats().map_failure.expect("the failure is shown");
        assert!(failure.contains("full comparison"), "{failure}");
        assert_eq!(
            dirty::DirtyMap::open(&fsd, &map_path, 1 << 20)
                .err()
                .map(|e| e.kind()),
            Some(io::ErrorKind::NotFound),
            "the untrusted map is gone"
        );
        // A crash now: the journal cannot vouch for the mirror's point any more.
        let crashed = fs.snapshot();
        crashed.restart();
        let j2 = open(JournalOptions {
            fs: Arc::new(crashed.clone()),
            ..o.clone()
        });
        assert!(
            j2.holds_after() > first,
            "a mirror holding only the first write must be compared, not resumed: holds_after {}",
            j2.holds_after()
        );
        drop(j2);
        // No crash: the map is written whole at the next sync.
        j.sync().unwrap();
        assert_eq!(j.stats().map_failure, None);
        let saved = dirty::DirtyMap::open(&fsd, &map_path, 1 << 20).unwrap();
        let runs: Vec<(u64, u64)> = saved.runs().collect();
        let in_memory = j.dirty_runs(0, u64::MAX, u64::MAX);
        assert_eq!(
            runs, in_memory,
            "every region, the one marked during the failure too"
        );
        assert!(runs
            .iter()
            .any(|&(o, l)| o <= 200 * 4096 && 201 * 4096 <= o + l));
        assert_eq!(saved.fold(), j.fold().unwrap());
    }

    /// The dirty map's file removed behind the daemon's back while a fold is open: the next
    /// FLUSH writes it whole again (a restart would otherwise compare the whole volume, or
    /// trust nothing).
    #[test]
    fn a_dirty_map_removed_by_hand_is_written_again_at_the_next_flush() {
        use crate::env::mem::MemFs;
        let fs = MemFs::new();
        let o = tracking_opts(&fs);
        let map_path = o.dir.join(DIRTY_MAP);
        let fsd: Fs = Arc::new(fs.clone());
        let j = open(o);
        write_until_fold(&j, 0);
        j.sync().unwrap();
        fsd.remove_file(&map_path).unwrap();
        write(&j, 200);
        j.sync().unwrap();
        let saved = dirty::DirtyMap::open(&fsd, &map_path, 1 << 20).unwrap();
        assert_eq!(
            saved.runs().collect::<Vec<_>>(),
            j.dirty_runs(0, u64::MAX, u64::MAX)
        );
        assert_eq!(saved.fold(), j.fold().unwrap());
        assert_eq!(j.stats().map_failure, None);
    }

    #[test]
    fn a_full_journal_folds_and_a_restart_keeps_the_fold() {
        use crate::env::mem::MemFs;
        let fs = MemFs::new();
        let o = tracking_opts(&fs);
        let j = open(o.clone());
        let first = write(&j, 0);
        j.ack(first).unwrap();
        write_until_fold(&j, 1);
        let st = j.stats();
        assert!(st.tracking && st.dirty_bytes > 0, "{st:?}");
        let fold = j.fold().expect("a resync is open");
        assert_eq!(
            fold.covers_after,
            Some(first),
            "the mirror holds the first write"
        );
        assert!(fold.folded_through > first);
        // Tracked writes: taken at once, their regions marked.
        write(&j, 200);
        assert!(j
            .dirty_runs(0, u64::MAX, u64::MAX)
            .contains(&(200 * 4096, 4096)));
        assert!(
            !j.dirty_runs(0, u64::MAX, u64::MAX).contains(&(0, 4096)),
            "the acknowledged write is not dirty"
        );
        assert_eq!(
            j.collect(0, u64::MAX).unwrap().0.len(),
            0,
            "nothing left to ship"
        );
        // The mirror is back: journaling resumes after the skipped number.
        j.resume_journaling();
        let after = write(&j, 201);
        assert!(
            after > fold.folded_through,
            "numbering goes on after the fold"
        );
        drop(j);
        fs.restart();
        let j = open(o);
        assert_eq!(j.fold(), Some(fold), "the fold survives kill -9");
        assert!(j
            .dirty_runs(0, u64::MAX, u64::MAX)
            .contains(&(200 * 4096, 4096)));
        assert_eq!(
            shipped(&j, 0),
            vec![(after, 201)],
            "folded records never ship"
        );
        assert_eq!(j.holds_after(), first, "the mirror's point is remembered");
        assert!(write(&j, 202) > after, "no number is reused");
        // The resync's end: the regions are clean, the fold closed.
        let runs = j.dirty_runs(0, u64::MAX, u64::MAX);
        j.resynced(&runs, j.folds());
        assert!(j.resync_complete(j.folds(), false));
        assert_eq!(j.fold(), None);
        assert_eq!(j.stats().dirty_bytes, 0);
    }

    /// A TRIM or WRITE_ZEROES costs a record, not its length: one larger than the whole
    /// journal goes through even when the journal is full (mkfs.ext4 discards the whole
    /// device; a 200 MiB discard once hung for good behind a 128 MiB journal).
    #[test]
    fn a_trim_larger_than_the_journal_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(opts(dir.path()));
        while j.begin(0, 32 << 10, true).unwrap().is_some_and(|it| {
            j.complete(it, 0, data(1, 32 << 10)).unwrap();
            true
        }) {}
        assert!(j.stats().full, "data writes wait");
        let it = j
            .begin(0, u32::MAX, false)
            .unwrap()
            .expect("a zero record is always admitted");
        let seq = j.complete(it, 0, Payload::Zero(u32::MAX)).unwrap();
        assert_eq!(seq, j.last_seq());
    }

    /// "journal full" describes writers waiting now: it clears when the mirror frees space,
    /// even if no writer comes back (the client went away), and parked writers are woken.
    #[test]
    fn full_clears_and_waiters_are_woken_when_space_frees() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(opts(dir.path()));
        let mut last = 0;
        while let Some(it) = j.begin(0, 32 << 10, true).unwrap() {
            last = j.complete(it, 0, data(1, 32 << 10)).unwrap();
        }
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker: Arc<dyn Wake> = flag.clone();
        j.wait_for_space(&waker);
        assert!(j.stats().full);
        j.ack(last).unwrap();
        assert!(!j.stats().full, "nobody waits once space is free");
        assert!(flag.0.load(Ordering::SeqCst), "the parked writer was woken");
    }

    /// An acknowledgement beyond what the journal wrote is a protocol error, not a trim.
    #[test]
    fn an_ack_beyond_the_end_is_refused_and_trims_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(opts(dir.path()));
        let seq = write(&j, 1);
        let err = j.ack(seq + 10).unwrap_err();
        assert!(
            err.to_string().contains("beyond the journal's end"),
            "{err}"
        );
        assert_eq!(j.stats().acked_seq, 0);
        assert_eq!(shipped(&j, 0), vec![(seq, 1)]);
    }

    /// A full file system under the journal: an append cut short leaves no hole, the write
    /// whose record could not be written is re-read from the volume, and once there is room
    /// again the journal reopens to every record it acknowledged writing, in order, with no
    /// sequence number given twice.
    #[test]
    fn a_full_file_system_loses_no_record_and_reuses_no_number() {
        use crate::env::mem::{Faults, MemFs};
        let fs = MemFs::new();
        let j = open(mem_opts(&fs, "b1"));
        let mut written = Vec::new();
        for b in 0..3u8 {
            written.push((write(&j, b), b));
        }
        let used = fs.used_bytes();
        fs.set_faults(Faults {
            capacity: Some(used + 3000),
            failing_syncs: 0,
            ..Default::default()
        });
        let it = begin(&j, 9 * 4096, 4096).unwrap();
        let err = j.complete(it, 9 * 4096, data(9, 4096)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let failure = j.stats().failure.expect("status says the journal failed");
        assert!(
            failure.contains("cannot append to the journal") && failure.contains("No space"),
            "{failure}"
        );
        assert_eq!(
            ranges(j.take_dirty()),
            vec![(9 * 4096, 4096)],
            "re-read, not forgotten"
        );
        fs.set_faults(Faults::default());
        for b in 3..6u8 {
            written.push((write(&j, b), b));
        }
        assert_eq!(j.stats().failure, None, "cleared once an append works");
        let seqs: Vec<u64> = written.iter().map(|(s, _)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        j.close().unwrap();
        drop(j);
        let j = open(mem_opts(&fs, "b1"));
        assert_eq!(j.last_stop(), LastStop::Clean);
        assert_eq!(shipped(&j, 0), written);
    }

    /// A failing sync (a FLUSH the disk could not honour) shows in status until a sync works.
    #[test]
    fn a_failing_sync_shows_until_a_sync_works() {
        use crate::env::mem::{Faults, MemFs};
        let fs = MemFs::new();
        let j = open(mem_opts(&fs, "b1"));
        write(&j, 1);
        fs.set_faults(Faults {
            capacity: None,
            failing_syncs: 1,
            ..Default::default()
        });
        assert!(j.sync().is_err());
        let failure = j.stats().failure.expect("status says the sync failed");
        assert!(failure.contains("cannot sync the journal"), "{failure}");
        write(&j, 2);
        assert!(
            j.stats().failure.is_some(),
            "an append does not vouch for syncs"
        );
        j.sync().unwrap();
        assert_eq!(j.stats().failure, None);
    }

    /// Track mode, the journal's disk fails a sync (EIO): the FLUSH succeeds, every unshipped
    /// record's region is in the dirty map (synced by the fold), and after a power cut the map
    /// still names them: nothing the mirror lacks is forgotten. Status names the failure
    /// until a sync works again.
    #[test]
    fn a_journal_sync_that_fails_folds_and_the_flush_succeeds() {
        use crate::env::mem::{Faults, MemFs};
        let fs = MemFs::new();
        let o = tracking_opts(&fs);
        let j = open(o.clone());
        let shipped = write(&j, 0);
        j.ack(shipped).unwrap();
        j.sync().unwrap();
        write(&j, 3);
        write(&j, 5);
        fs.set_faults(Faults {
            failing_syncs: 1,
            ..Default::default()
        });
        j.sync()
            .expect("the FLUSH succeeds: the writes are on the volume");
        let st = j.stats();
        assert!(st.tracking && st.folds == 1, "{st:?}");
        assert!(
            st.failure
                .as_deref()
                .is_some_and(|f| f.contains("cannot sync the journal")),
            "{st:?}"
        );
        assert_eq!(st.map_failure, None, "the fold's own sync worked");
        write(&j, 7);
        j.sync().unwrap();
        for seed in 0..20 {
            let cut = fs.snapshot();
            cut.crash(&mut crate::sim::rng::Prng::new(seed));
            let j = open(JournalOptions {
                fs: Arc::new(cut),
                ..o.clone()
            });
            let runs = j.dirty_runs(0, u64::MAX, u64::MAX);
            for b in [3u64, 5, 7] {
                assert!(
                    runs.iter()
                        .any(|&(at, len)| at <= b * 4096 && b * 4096 < at + len),
                    "seed {seed}: block {b} is in the map after a power cut: {runs:?}"
                );
            }
            assert!(
                !runs.iter().any(|&(at, _)| at == 0),
                "seed {seed}: the acknowledged block is not: {runs:?}"
            );
        }
    }

    /// Block mode, the same failing sync: the FLUSH hears the error (nothing can take the
    /// records' place) and no fold happens.
    #[test]
    fn a_journal_sync_that_fails_in_block_mode_fails_the_flush() {
        use crate::env::mem::{Faults, MemFs};
        let fs = MemFs::new();
        let j = open(mem_opts(&fs, "b1"));
        write(&j, 1);
        fs.set_faults(Faults {
            failing_syncs: 1,
            ..Default::default()
        });
        assert!(j.sync().is_err());
        assert_eq!(j.stats().folds, 0);
    }

    /// A range whose record could not be written is kept through acknowledgements and a
    /// crash until it is re-read: its intent's segment is not trimmed, and the journal
    /// reopens with the range dirty again. Re-reading it closes the intent.
    #[test]
    fn a_dirty_range_survives_trimming_and_a_crash_until_it_is_re_read() {
        use crate::env::mem::{Faults, MemFs};
        let fs = MemFs::new();
        let j = open(mem_opts(&fs, "b1"));
        let it = begin(&j, 3 * 4096, 4096).unwrap();
        fs.set_faults(Faults {
            capacity: Some(fs.used_bytes()),
            failing_syncs: 0,
            ..Default::default()
        });
        assert!(j.complete(it, 3 * 4096, data(3, 4096)).is_err());
        fs.set_faults(Faults::default());
        for b in 10..40u8 {
            write(&j, b);
        }
        j.ack(j.last_seq()).unwrap();
        drop(j);
        fs.restart();
        let j = open(mem_opts(&fs, "b1"));
        let dirty = j.take_dirty();
        assert_eq!(ranges(dirty.clone()), vec![(3 * 4096, 4096)]);
        j.resync(3 * 4096, Bytes::from(vec![3u8; 4096]), Some(&dirty[0]))
            .unwrap();
        drop(j);
        fs.restart();
        let j = open(mem_opts(&fs, "b1"));
        assert!(j.take_dirty().is_empty(), "closed by its re-read");
    }

    /// How the last stop went: clean, a crash of the process (same boot), or of the host.
    #[test]
    fn open_tells_how_the_journal_was_last_closed() {
        use crate::env::mem::MemFs;
        let fs = MemFs::new();
        let j = open(mem_opts(&fs, "b1"));
        assert_eq!(j.last_stop(), LastStop::Fresh);
        write(&j, 1);
        j.close().unwrap();
        drop(j);
        let j = open(mem_opts(&fs, "b1"));
        assert_eq!(j.last_stop(), LastStop::Clean);
        write(&j, 2);
        drop(j);
        fs.restart();
        let j = open(mem_opts(&fs, "b1"));
        assert_eq!(j.last_stop(), LastStop::ProcessCrash);
        assert_eq!(shipped(&j, 0).len(), 2, "kill -9 loses nothing");
        drop(j);
        fs.restart();
        let j = open(mem_opts(&fs, "b2"));
        assert_eq!(j.last_stop(), LastStop::HostCrash);
        assert!(j.begin(0, 1, true).is_ok());
        j.close().unwrap();
        assert!(
            j.begin(0, 1, true).is_err(),
            "nothing is appended after close"
        );
    }

    /// Power cuts at random moments: every record written before a `sync` returned survives,
    /// in order, whatever else the cut keeps (new segments' names included); reopening never
    /// fails and numbering never goes backwards past a synced record.
    #[test]
    fn synced_records_survive_any_power_cut() {
        use crate::env::mem::MemFs;
        use crate::sim::rng::Prng;
        for seed in 0..150u64 {
            let mut rng = Prng::new(seed);
            let fs = MemFs::new();
            let mut synced: Vec<(u64, u8)> = Vec::new();
            for round in 0..3 {
                let j = open(mem_opts(&fs, &format!("boot-{seed}-{round}")));
                assert!(
                    j.last_seq() >= synced.last().map_or(0, |s| s.0),
                    "seed {seed}"
                );
                let recovered = shipped(&j, 0);
                assert!(
                    recovered.starts_with(&synced),
                    "seed {seed} round {round}: synced records lost: {synced:?} vs {recovered:?}"
                );
                let mut all = recovered;
                for _ in 0..rng.range(1, 30) {
                    let b = rng.below(250) as u8;
                    all.push((write(&j, b), b));
                    if rng.chance(1, 4) {
                        j.sync().unwrap();
                        synced = all.clone();
                    }
                }
                drop(j);
                fs.crash(&mut rng);
            }
        }
    }

    /// A journal whose every record is acknowledged takes the next write, even when its tail
    /// segment overshot the segment size with a large write and fills most of the cap: the
    /// tail is rotated out (the last segment is never trimmed, and nothing is left to
    /// acknowledge, so waiting would hang the client for good). Before, a 32 MiB write into a
    /// 128 MiB journal could hang this way.
    #[test]
    fn an_acknowledged_tail_never_blocks_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.max_disk_bytes = 128 << 10;
        o.segment_bytes = 64 << 10;
        let j = open(o.clone());
        let write = |len: u32| {
            let it = j.begin(0, len, true).unwrap().expect("the write fits");
            j.complete(it, 0, data(1, len as usize)).unwrap();
        };
        // A tail just under the segment size, then a large write that still goes into it.
        fill_tail_to_just_under(&j, 64 << 10);
        write(32 << 10);
        let tail = j.stats().disk_bytes;
        assert!(
            tail + (32 << 10) + 2 * HEADER_LEN as u64 > 128 << 10,
            "{tail}"
        );
        j.ack(j.last_seq()).unwrap();
        let last = j.last_seq();
        write(32 << 10);
        assert!(j.stats().disk_bytes < 40 << 10, "the old tail was trimmed");
        assert_eq!(j.last_seq(), last + 2, "numbering goes on");
        drop(j);
        // After a crash the numbering resumes from the new segment.
        let j = open(o);
        assert_eq!(j.last_seq(), last + 2);
    }

    /// A writer parked while the tail segment is still unacknowledged is woken when the
    /// acknowledgement covers the tail, although no segment is freed by it, and then fits.
    #[test]
    fn a_writer_parked_on_the_tail_is_woken_when_it_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let j = small_journal(dir.path(), 128 << 10, 64 << 10);
        let write = |len: u32| {
            let it = j.begin(0, len, true).unwrap().expect("the write fits");
            j.complete(it, 0, data(1, len as usize)).unwrap()
        };
        fill_tail_to_just_under(&j, 64 << 10);
        let last = write(32 << 10);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker: Arc<dyn Wake> = flag.clone();
        assert!(
            j.begin_or_wait(0, 32 << 10, true, Some(&waker))
                .unwrap()
                .is_none(),
            "unacknowledged, the tail leaves no room"
        );
        j.ack(last).unwrap();
        assert!(flag.0.load(Ordering::SeqCst), "the parked writer was woken");
        assert!(j.begin_or_wait(0, 32 << 10, true, None).unwrap().is_some());
    }

    /// A segment that a large write made much longer than a segment is cut back to a segment
    /// when it becomes a spare: reused, its length would stay on disk beyond the journal's cap.
    #[test]
    fn an_oversized_segment_is_cut_back_as_a_spare() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.max_disk_bytes = 1 << 20;
        o.segment_bytes = 64 << 10;
        let j = open(o);
        let spare_lengths = || {
            let mut v: Vec<u64> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".spare"))
                .map(|e| e.metadata().unwrap().len())
                .collect();
            v.sort();
            v
        };
        // Segment 1: a small record, then one that overshoots the segment size by far.
        write(&j, 1);
        let it = j.begin(0, 200 << 10, true).unwrap().unwrap();
        let last = j.complete(it, 0, data(2, 200 << 10)).unwrap();
        // Segment 2 starts; acknowledging segment 1 retires it.
        write(&j, 3);
        j.ack(last).unwrap();
        assert_eq!(spare_lengths(), vec![64 << 10], "cut back to one segment");
    }

    /// A large write parks while the (only, unacknowledged) tail and another large write in
    /// flight leave no room; a small write then fits and goes into the same tail, which
    /// clears "waiting for space" although the large one still waits. When the mirror
    /// acknowledges everything, nothing is freed (the tail is the last segment), and the
    /// parked writer must still be woken: it can now rotate the tail out. Otherwise it waits
    /// until some other write arrives and is acknowledged: for good with an idle client (a
    /// 64 MiB journal: a 32 MiB write parked behind another, a 4 KiB write beside them).
    #[test]
    fn a_parked_writer_is_woken_by_the_tail_ack_even_after_a_small_write_fitted() {
        let dir = tempfile::tempdir().unwrap();
        let j = small_journal(dir.path(), 128 << 10, 32 << 10);
        // One small segment, acknowledged: the tail, alone.
        let it = j.begin(0, 8 << 10, true).unwrap().unwrap();
        j.complete(it, 0, data(1, 8 << 10)).unwrap();
        j.ack(j.last_seq()).unwrap();
        // A: a large write in flight.
        let a = j.begin(1 << 20, 60 << 10, true).unwrap().expect("A fits");
        // B: a second large write does not fit beside A; it parks.
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker: Arc<dyn Wake> = flag.clone();
        assert!(j
            .begin_or_wait(2 << 20, 60 << 10, true, Some(&waker))
            .unwrap()
            .is_none());
        assert!(j.stats().full, "B waits: the journal is full");
        // C: a small write fits and lands in the same tail.
        let c = j.begin(3 << 20, 4 << 10, true).unwrap().expect("C fits");
        j.complete(c, 3 << 20, data(3, 4 << 10)).unwrap();
        j.complete(a, 1 << 20, data(2, 60 << 10)).unwrap();
        // The mirror acknowledges everything: only the tail is left, wholly acknowledged.
        j.ack(j.last_seq()).unwrap();
        assert!(
            flag.0.load(Ordering::SeqCst),
            "the parked writer was never woken: it waits for good"
        );
        assert!(j
            .begin_or_wait(2 << 20, 60 << 10, true, None)
            .unwrap()
            .is_some());
    }

    /// An acknowledged segment that was the tail when the mirror went away is not trimmed
    /// when a later write rotates past it (only an acknowledgement trims, and the mirror is
    /// away): it keeps holding its bytes against the cap. In a 64 MiB journal whose tail
    /// ended with a 32 MiB write, half the journal is then taken by data the mirror already
    /// has, and a write waits for the mirror though the journal holds almost nothing
    /// unacknowledged.
    #[test]
    fn an_acknowledged_segment_behind_the_tail_does_not_keep_a_write_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let j = small_journal(dir.path(), 128 << 10, 32 << 10);
        let write = |off: u64, len: u32| {
            let it = j.begin(off, len, true).unwrap().expect("the write fits");
            j.complete(it, off, data(1, len as usize)).unwrap()
        };
        // A tail that ends with a large write, all acknowledged; then the mirror goes away.
        write(0, 8 << 10);
        write(1 << 20, 60 << 10);
        j.ack(j.last_seq()).unwrap();
        // A small write rotates (the tail is past the segment size): the acknowledged segment
        // is no longer the tail, and is still on disk.
        write(2 << 20, 4 << 10);
        assert!(j.stats().lag_bytes == 4 << 10);
        // 4 KiB unacknowledged in a 128 KiB journal: a 60 KiB write must fit.
        assert!(
            j.begin(3 << 20, 60 << 10, true).unwrap().is_some(),
            "a 60 KiB write waits with 4 KiB unacknowledged in a 128 KiB journal (disk_bytes {})",
            j.stats().disk_bytes
        );
    }
}
