//! The data path: per direction, a reader thread (TUN read → shaper → hand-off) and a writer
//! thread (timer-sorted queue → other TUN at the due time).
//!
//! - No lock between the two: packets go to the writer through a bounded lock-free channel
//!   (std's `sync_channel`, preallocated) and buffers come back through another, so the steady
//!   state allocates nothing per packet and a descheduled reader can never hold up the writer.
//! - The writer keeps its own heap, sleeps until the earliest due time (park with a timeout, with
//!   1 ns timer slack and a learned correction for wake-up lateness) and is unparked by the
//!   reader only when a new packet is due before that. Under load it wakes at most every
//!   `TICK_NS` and sends everything due by then: one wake-up per packet cost a core.
//! - When nothing is queued and a packet is already due (zero delay), the reader writes it
//!   itself: no hand-off at all, which is what sets the emulator's ceiling.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, Thread};
use std::time::Duration;

use serde_json::{json, Value};

use crate::link::{DropReason, Params, Shaper, Verdict};
use crate::sys::{now_ns, tight_timer_slack};

/// A packet may leave up to this much before its due time: when the writer wakes it sends what
/// is due within this window, and the reader writes a packet itself when it is due within it.
const EARLY_NS: u64 = 50_000;
/// Timed wake-ups of a writer are at least this far apart. Together with EARLY_NS, packets leave
/// within about ± 50 µs of their due time (plus scheduling delays).
const TICK_NS: u64 = 100_000;
/// Cap on the wake-up lateness the writer compensates for.
const MAX_OVERSLEEP_NS: u64 = 500_000;

/// What the control socket changes while the data path runs.
pub(crate) struct Control {
    pub params: Mutex<Params>,
    /// Bumped on every `set`; readers reload their shaper when it moves.
    pub generation: AtomicU64,
    /// Monotonic ns until which every packet is dropped (`cut`).
    pub cut_until: AtomicU64,
}

impl Control {
    pub(crate) fn new(params: Params) -> Control {
        Control {
            params: Mutex::new(params),
            generation: AtomicU64::new(0),
            cut_until: AtomicU64::new(0),
        }
    }

    pub(crate) fn params(&self) -> Params {
        lock(&self.params).clone()
    }

    pub(crate) fn set_params(&self, p: Params) {
        *lock(&self.params) = p;
        self.generation.fetch_add(1, Ordering::Release);
    }

    #[inline]
    fn cut_active(&self, now: u64) -> bool {
        now < self.cut_until.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of one direction (read by `stats`).
#[derive(Default)]
struct DirStats {
    received_packets: AtomicU64,
    received_bytes: AtomicU64,
    passed_packets: AtomicU64,
    passed_bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_cut: AtomicU64,
    dropped_limit: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    write_errors: AtomicU64,
    /// Lateness of delayed packets (write time - due time), to show the timing precision.
    late_sum_ns: AtomicU64,
    late_count: AtomicU64,
    late_max_ns: AtomicU64,
    late_over_1ms: AtomicU64,
}

#[inline]
fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// A packet waiting for its due time. Ordered so that `BinaryHeap` pops the earliest first
/// (ties: in arrival order).
struct Pending {
    due: u64,
    seq: u64,
    len: usize,
    buf: Box<[u8]>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        self.due == o.due && self.seq == o.seq
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        o.due.cmp(&self.due).then(o.seq.cmp(&self.seq))
    }
}

/// One direction of the link: packets read from `input` are written to `output`.
pub(crate) struct Direction {
    pub name: &'static str,
    input: File,
    output: File,
    stats: DirStats,
    /// Packets handed to the writer and not yet written (or dropped by a cut).
    queued: AtomicU64,
    /// When the parked writer wakes by itself (ns); 0 while it is awake.
    writer_wake_at: AtomicU64,
    writer: OnceLock<Thread>,
    /// 1 + highest sequence number written so far (to count packets that arrive out of order).
    written_hwm: AtomicU64,
    buf_size: usize,
    max_inflight: usize,
}

impl Direction {
    pub(crate) fn new(
        name: &'static str,
        input: File,
        output: File,
        buf_size: usize,
        max_inflight: usize,
    ) -> Direction {
        Direction {
            name,
            input,
            output,
            stats: DirStats::default(),
            queued: AtomicU64::new(0),
            writer_wake_at: AtomicU64::new(0),
            writer: OnceLock::new(),
            written_hwm: AtomicU64::new(0),
            buf_size,
            max_inflight,
        }
    }

    fn new_buf(&self) -> Box<[u8]> {
        vec![0u8; self.buf_size].into_boxed_slice()
    }

    /// Writes one packet to the far side. Only one thread writes at a time: the reader writes
    /// only when nothing is queued, i.e. when the writer has nothing to write.
    #[inline]
    fn emit(&self, seq: u64, pkt: &[u8]) {
        match (&self.output).write(pkt) {
            Ok(_) => {
                inc(&self.stats.passed_packets, 1);
                inc(&self.stats.passed_bytes, pkt.len() as u64);
            }
            Err(_) => inc(&self.stats.write_errors, 1),
        }
        let hwm = self.written_hwm.load(Ordering::Relaxed);
        if seq < hwm {
            inc(&self.stats.reordered, 1);
        } else {
            self.written_hwm.store(seq + 1, Ordering::Relaxed);
        }
    }

    pub(crate) fn stats_json(&self) -> Value {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "received_packets": g(&s.received_packets),
            "received_bytes": g(&s.received_bytes),
            "passed_packets": g(&s.passed_packets),
            "passed_bytes": g(&s.passed_bytes),
            "dropped_loss": g(&s.dropped_loss),
            "dropped_queue_full": g(&s.dropped_queue_full),
            "dropped_cut": g(&s.dropped_cut),
            "dropped_limit": g(&s.dropped_limit),
            "duplicated": g(&s.duplicated),
            "reordered": g(&s.reordered),
            "write_errors": g(&s.write_errors),
            "in_flight": g(&self.queued),
            "late_avg_us": g(&s.late_sum_ns) as f64 / g(&s.late_count).max(1) as f64 / 1e3,
            "late_max_us": g(&s.late_max_ns) as f64 / 1e3,
            "late_over_1ms": g(&s.late_over_1ms),
        })
    }

    /// Hands a packet to the writer; wakes it if the packet is due before it would wake.
    #[inline]
    fn hand_off(&self, tx: &SyncSender<Pending>, p: Pending) -> Result<(), Pending> {
        let due = p.due;
        self.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = tx.try_send(p) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(match e {
                std::sync::mpsc::TrySendError::Full(p)
                | std::sync::mpsc::TrySendError::Disconnected(p) => p,
            });
        }
        // Pairs with the fence in the writer between publishing its wake time and looking at the
        // channel a last time: either it sees this packet or we see its wake time.
        fence(Ordering::SeqCst);
        if due < self.writer_wake_at.load(Ordering::SeqCst) {
            if let Some(w) = self.writer.get() {
                w.unpark();
            }
        }
        Ok(())
    }

    /// Reader thread body: returns only if the writer is gone.
    fn run_reader(
        &self,
        ctl: &Control,
        seed: u64,
        tx: SyncSender<Pending>,
        free_rx: Receiver<Box<[u8]>>,
    ) {
        let mut generation = ctl.generation.load(Ordering::Acquire);
        let mut shaper = Shaper::new(&ctl.params(), seed);
        let mut buf = self.new_buf();
        let mut allocated = 1usize;
        let take_buf = |allocated: &mut usize| -> Option<Box<[u8]>> {
            match free_rx.try_recv() {
                Ok(b) => Some(b),
                Err(_) if *allocated < self.max_inflight => {
                    *allocated += 1;
                    Some(self.new_buf())
                }
                Err(_) => None,
            }
        };
        let mut seq: u64 = 0;
        let st = &self.stats;
        loop {
            let n = match (&self.input).read(&mut buf) {
                Ok(n) if n > 0 => n,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(dir = self.name, "read from TUN failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let now = now_ns();
            inc(&st.received_packets, 1);
            inc(&st.received_bytes, n as u64);
            let g = ctl.generation.load(Ordering::Acquire);
            if g != generation {
                generation = g;
                shaper.set_params(&ctl.params());
            }
            if ctl.cut_active(now) {
                inc(&st.dropped_cut, 1);
                continue;
            }
            let (due, dup_due) = match shaper.on_packet(now, n) {
                Verdict::Drop(DropReason::Loss) => {
                    inc(&st.dropped_loss, 1);
                    continue;
                }
                Verdict::Drop(DropReason::QueueFull) => {
                    inc(&st.dropped_queue_full, 1);
                    continue;
                }
                Verdict::Deliver { due, dup_due, .. } => (due, dup_due),
            };
            if dup_due.is_none()
                && self.queued.load(Ordering::Acquire) == 0
                && due <= now_ns() + EARLY_NS
            {
                // Nothing ahead of it and already due: write it from here.
                self.emit(seq, &buf[..n]);
                seq += 1;
                continue;
            }
            let mut copy = match dup_due {
                Some(_) => take_buf(&mut allocated).map(|mut c| {
                    c[..n].copy_from_slice(&buf[..n]);
                    c
                }),
                None => None,
            };
            // A buffer to read the next packet into; at the in-flight limit, the copy's buffer
            // (no duplicate then) or else the packet itself is given up.
            let Some(next) = take_buf(&mut allocated).or_else(|| copy.take()) else {
                inc(&st.dropped_limit, 1);
                continue;
            };
            let full = std::mem::replace(&mut buf, next);
            let p = Pending {
                due,
                seq,
                len: n,
                buf: full,
            };
            seq += 1;
            if self.hand_off(&tx, p).is_err() {
                return;
            }
            if let (Some(c), Some(d2)) = (copy, dup_due) {
                let p = Pending {
                    due: d2,
                    seq,
                    len: n,
                    buf: c,
                };
                seq += 1;
                inc(&st.duplicated, 1);
                if self.hand_off(&tx, p).is_err() {
                    return;
                }
            }
        }
    }

    /// Writer thread body: returns only if the reader is gone.
    fn run_writer(&self, ctl: &Control, rx: Receiver<Pending>, free_tx: SyncSender<Box<[u8]>>) {
        tight_timer_slack();
        let mut heap: BinaryHeap<Pending> = BinaryHeap::with_capacity(4096);
        // Running average of how late timed waits wake up.
        let mut oversleep_ns: u64 = 0;
        let mut last_wake: u64 = 0;
        let st = &self.stats;
        loop {
            loop {
                match rx.try_recv() {
                    Ok(p) => heap.push(p),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            let now = now_ns();
            let cut = ctl.cut_active(now);
            let (mut sent, mut late_sum, mut late_max, mut over_1ms) = (0u64, 0, 0, 0);
            while heap.peek().is_some_and(|p| p.due <= now + EARLY_NS) {
                let p = heap.pop().expect("peeked");
                if cut {
                    inc(&st.dropped_cut, 1);
                } else {
                    let late = now.saturating_sub(p.due);
                    late_sum += late;
                    late_max = late_max.max(late);
                    over_1ms += (late > 1_000_000) as u64;
                    self.emit(p.seq, &p.buf[..p.len]);
                }
                // Capacity covers every buffer that exists: this never fails.
                let _ = free_tx.try_send(p.buf);
                self.queued.fetch_sub(1, Ordering::AcqRel);
                sent += 1;
            }
            if sent > 0 {
                inc(&st.late_sum_ns, late_sum);
                inc(&st.late_count, sent);
                inc(&st.late_over_1ms, over_1ms);
                st.late_max_ns.fetch_max(late_max, Ordering::Relaxed);
                continue;
            }
            let wake_at = match heap.peek() {
                Some(p) => p.due.max(last_wake + TICK_NS),
                None => u64::MAX,
            };
            self.writer_wake_at.store(wake_at, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            match rx.try_recv() {
                Ok(p) => {
                    heap.push(p);
                    self.writer_wake_at.store(0, Ordering::SeqCst);
                    continue;
                }
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {}
            }
            if wake_at == u64::MAX {
                thread::park();
            } else {
                // Timed waits wake a few tens of µs late: aim earlier by the lateness seen so far.
                let sleep = wake_at.saturating_sub(now + oversleep_ns).max(1_000);
                thread::park_timeout(Duration::from_nanos(sleep));
                let woke = now_ns();
                if woke >= now + sleep {
                    // Timed out (not unparked early): learn how late the wake-up was.
                    let over = (woke - now - sleep).min(MAX_OVERSLEEP_NS);
                    oversleep_ns = (oversleep_ns * 7 + over) / 8;
                    last_wake = woke;
                }
            }
            self.writer_wake_at.store(0, Ordering::SeqCst);
        }
    }
}

/// Starts the four data-path threads.
pub(crate) fn spawn(dirs: &[Arc<Direction>], ctl: &Arc<Control>, seed: u64) -> std::io::Result<()> {
    for (i, d) in dirs.iter().enumerate() {
        // Every buffer that exists fits in either channel, so no send ever fails for lack of room.
        let cap = d.max_inflight + 2;
        let (tx, rx) = sync_channel::<Pending>(cap);
        let (free_tx, free_rx) = sync_channel::<Box<[u8]>>(cap);
        let (dw, cw) = (d.clone(), ctl.clone());
        let writer = thread::Builder::new()
            .name(format!("{} wr", d.name))
            .spawn(move || dw.run_writer(&cw, rx, free_tx))?;
        let _ = d.writer.set(writer.thread().clone());
        let (dr, cr) = (d.clone(), ctl.clone());
        let dir_seed = seed ^ (0x5157_0000 + i as u64);
        thread::Builder::new()
            .name(format!("{} rd", d.name))
            .spawn(move || dr.run_reader(&cr, dir_seed, tx, free_rx))?;
    }
    Ok(())
}
