//! One NBD connection in transmission phase, driven by a single io_uring.
//!
//! The socket reads, the disk operations and the socket writes of a connection all go through
//! one ring on one thread, as qemu-nbd does with its coroutines: many requests in flight, replies
//! in completion order, no thread hand-offs on the hot path.
//!
//! Memory is bounded per connection: once `MAX_INFLIGHT_BYTES` of buffers are in flight, no new
//! request is parsed until completions free some.

use super::handshake::Agreed;
use super::server::Export;
use super::transmission::{self as tx, Command, NbdErrno, Rejection, RequestHeader, Session};
use super::wire::*;
use crate::disk::buf::{AlignedBuf, PooledBuf, SharedPool};
use crate::disk::ranges::aligned_span;
use crate::disk::{DiskOp, Prepared, Storage};
use crate::extent::Payload;
use crate::volume::{Change, Ended, Volume};
use crate::wake::Wake;
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

const RING_ENTRIES: u32 = 512;
const MAX_OPS: usize = 256;
const MAX_INFLIGHT_BYTES: usize = 64 << 20;
const RX_BUF: usize = 256 << 10;
const MAX_IOV: usize = 64;
const TOKEN_SOCK_READ: u64 = u64::MAX;
const TOKEN_SOCK_WRITE: u64 = u64::MAX - 1;
/// The read of the connection's eventfd: a parked op may go now.
const TOKEN_WAKE: u64 = u64::MAX - 2;
/// Reads are scanned for zero runs of this size, answered with OFFSET_HOLE.
const HOLE_GRANULE: usize = 4096;

/// Written buffers at least this long are handed to the journal rather than copied.
const HAND_OVER_MIN: usize = 64 << 10;

/// What a finished connection reports.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub requests: u64,
    pub rejected: u64,
}

enum Stage {
    Main,
    /// WRITE_ZEROES on storage that cannot zero in place: write zeroes up to `end`.
    ZeroFill {
        pos: u64,
        end: u64,
    },
    /// A FUA TRIM/WRITE_ZEROES done; now the sync that makes it durable.
    SyncAfter,
    /// Unaligned write on direct I/O: reading the first block of its span...
    RmwHead,
    /// ...and the last one, before the whole span is written from the bounce buffer.
    RmwTail,
}

struct Op {
    cookie: u64,
    cmd: Command,
    buf: Option<PooledBuf>,
    /// Bytes transferred so far (reads and writes may complete short).
    done: u32,
    stage: Stage,
    /// The change admitted to the volume (blocks locked, journal intent recorded).
    change: Option<Change>,
    /// A TRIM the disk could not perform: the range kept its old content.
    trim_noop: bool,
    /// The request's range widened to whole blocks of the storage's alignment: what is read
    /// from disk, written to disk, and locked.
    span: (u64, u64),
    /// An unaligned write's span: old edge blocks with the new bytes copied in between.
    bounce: Option<PooledBuf>,
    /// A write held back by the journal's pacing (`--pace-above`) until then; set once, so a
    /// write is paced at most once.
    paced_until: Option<std::time::Instant>,
}

enum Rx {
    Header,
    /// Receiving the payload of a WRITE into its op's buffer.
    Payload {
        slot: usize,
    },
    /// Throwing away the payload of a refused WRITE.
    Skip {
        remaining: u64,
        reply: Option<(u64, u16, NbdErrno, String)>,
    },
}

/// A piece of reply on its way to the socket. Every variant keeps its bytes on the heap: a
/// `writev` in flight points into them while the queue itself may grow and move.
enum Seg {
    Bytes(Vec<u8>),
    Data {
        buf: Rc<PooledBuf>,
        start: usize,
        end: usize,
    },
}

impl Seg {
    fn small(b: &[u8]) -> Seg {
        Seg::Bytes(b.to_vec())
    }
    fn slice(&self) -> &[u8] {
        match self {
            Seg::Bytes(v) => v,
            Seg::Data { buf, start, end } => &buf[*start..*end],
        }
    }
}

/// Wakes a connection's ring from any thread: an eventfd whose read the ring has in flight
/// while ops are parked.
struct EventWaker {
    fd: OwnedFd,
}

impl EventWaker {
    fn new() -> io::Result<EventWaker> {
        let efd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )?;
        Ok(EventWaker { fd: efd.into() })
    }
}

impl Wake for EventWaker {
    fn wake(&self) {
        // A full counter (never, in practice) still leaves the ring woken.
        let _ = nix::unistd::write(&self.fd, &1u64.to_ne_bytes());
    }
}

pub struct Conn {
    id: u64,
    export: String,
    storage: Arc<dyn Storage>,
    /// The write path: range locks and the journal, shared with the volume's other connections.
    volume: Arc<Volume>,
    align: u64,
    session: Session,
    sock: OwnedFd,
    ring: IoUring,
    ops: Vec<Option<Op>>,
    free_slots: Vec<usize>,
    live_ops: usize,
    inflight_bytes: usize,
    /// Shared: a write's buffer goes to the journal, which gives it back from another thread.
    pool: Arc<SharedPool>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    rx_state: Rx,
    read_inflight: bool,
    /// The socket read in flight lands in this write's payload buffer, not in `rx`. Decided at
    /// submission: parsing may change `rx_state` while the read is in flight.
    read_into_payload: Option<usize>,
    /// No more requests will be read (client said DISC, hung up, or broke the protocol).
    rx_closed: bool,
    out: VecDeque<Seg>,
    /// Bytes of the front segment already written.
    out_front_done: usize,
    iov: Vec<libc::iovec>,
    write_inflight: bool,
    /// The socket failed: stop talking, just wait for the disk.
    dead: bool,
    zeroes: Rc<PooledBuf>,
    cqes: Vec<(u64, i32)>,
    /// Ops the volume told to wait (a busy range, a full journal), retried when woken.
    parked: VecDeque<usize>,
    /// Woken (an eventfd) by whoever frees what a parked op waits for.
    waker: Arc<EventWaker>,
    /// A read of the eventfd is in flight, into this buffer.
    wake_armed: bool,
    wake_buf: Box<[u8; 8]>,
    stats: ConnStats,
}

impl Conn {
    pub fn new(
        id: u64,
        export: &Export,
        agreed: &Agreed,
        sock: OwnedFd,
        leftover: &[u8],
    ) -> io::Result<Conn> {
        let storage = export.volume.storage.clone();
        let session = Session {
            size: storage.size(),
            read_only: storage.read_only(),
            structured: agreed.structured,
            base_allocation: agreed.base_allocation,
        };
        let mut rx = vec![0u8; RX_BUF];
        rx[..leftover.len()].copy_from_slice(leftover);
        Ok(Conn {
            id,
            export: export.info.name.clone(),
            align: storage.alignment(),
            storage,
            volume: export.volume.clone(),
            session,
            sock,
            ring: IoUring::new(RING_ENTRIES)?,
            ops: (0..MAX_OPS).map(|_| None).collect(),
            free_slots: (0..MAX_OPS).rev().collect(),
            live_ops: 0,
            inflight_bytes: 0,
            // Enough to recycle a queue of 1 MiB buffers; beyond, buffers go back to the allocator.
            pool: SharedPool::new(16 << 20),
            rx,
            rx_start: 0,
            rx_end: leftover.len(),
            rx_state: Rx::Header,
            read_inflight: false,
            read_into_payload: None,
            rx_closed: false,
            out: VecDeque::new(),
            out_front_done: 0,
            iov: Vec::with_capacity(MAX_IOV),
            write_inflight: false,
            dead: false,
            zeroes: Rc::new(AlignedBuf::zeroed(1 << 20).into()),
            cqes: Vec::with_capacity(RING_ENTRIES as usize),
            parked: VecDeque::new(),
            waker: Arc::new(EventWaker::new()?),
            wake_armed: false,
            wake_buf: Box::new([0; 8]),
            stats: ConnStats::default(),
        })
    }

    pub fn run(mut self) -> io::Result<ConnStats> {
        loop {
            // Parked ops first: what they lead to (a disk op, or at once a reply: refused, or
            // the daemon stopping) is submitted below, before the ring is waited on. Retried
            // after the wait instead, a reply could sit unsent with nothing in flight to end
            // the wait, and the connection hung for good.
            for _ in 0..self.parked.len() {
                let slot = self.parked.pop_front().expect("counted");
                self.start_disk(slot);
            }
            // A dead socket never delivers the rest of a write's payload: drop that write
            // (nothing of it reached the disk), or its slot keeps the connection for good.
            // Not while a read still lands in its buffer: that read ends first (`die`).
            if self.dead && !self.read_inflight {
                if let Rx::Payload { slot } = self.rx_state {
                    tracing::warn!(conn = self.id, export = %self.export,
                        "client gone mid-payload of a write; nothing written");
                    self.free_op(slot);
                    self.rx_state = Rx::Header;
                }
            }
            if !self.dead {
                // Slots or memory freed by the last completions may let buffered requests go.
                self.process_rx();
                if !self.read_inflight && !self.rx_closed && self.may_read() {
                    self.submit_sock_read();
                }
                if !self.write_inflight && !self.out.is_empty() {
                    self.submit_sock_write();
                }
            }
            let talking =
                !self.dead && (self.read_inflight || self.write_inflight || !self.out.is_empty());
            if self.live_ops == 0 && !talking && !self.read_inflight && !self.write_inflight {
                if self.wake_armed {
                    // The ring must be quiet before it goes: end the eventfd read.
                    self.waker.wake();
                    let _ = self.ring.submit_and_wait(1);
                    self.ring.completion().for_each(drop);
                }
                break;
            }
            // Parked ops wait for another connection or the mirror: the eventfd wakes the ring.
            if !self.parked.is_empty() && !self.wake_armed {
                self.submit_wake_read();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.cqes.clear();
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for i in 0..self.cqes.len() {
                let (token, res) = self.cqes[i];
                match token {
                    TOKEN_SOCK_READ => self.on_sock_read(res),
                    TOKEN_SOCK_WRITE => self.on_sock_write(res),
                    TOKEN_WAKE => self.wake_armed = false,
                    slot => self.on_disk_done(slot as usize, res),
                }
            }
        }
        Ok(self.stats)
    }

    fn may_read(&self) -> bool {
        match self.rx_state {
            Rx::Payload { .. } | Rx::Skip { .. } => true,
            Rx::Header => self.can_start_request(),
        }
    }

    fn can_start_request(&self) -> bool {
        !self.free_slots.is_empty() && self.inflight_bytes < MAX_INFLIGHT_BYTES
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        // SAFETY: every buffer named by an entry lives in `self` (rx, iov, op buffers) and stays
        // put until its completion is reaped; run() never returns with operations in flight.
        unsafe {
            while self.ring.submission().push(&entry).is_err() {
                self.ring.submit().expect("io_uring submit");
            }
        }
    }

    fn submit_sock_read(&mut self) {
        let fd = types::Fd(self.sock.as_raw_fd());
        self.read_into_payload = None;
        let entry = match self.rx_state {
            Rx::Payload { slot } if self.rx_start == self.rx_end => {
                self.read_into_payload = Some(slot);
                // Large payloads land straight in the op's buffer.
                let op = self.ops[slot].as_mut().expect("payload slot");
                let buf = op.buf.as_mut().expect("write buffer");
                let done = op.done as usize;
                let ptr = buf[done..].as_mut_ptr();
                opcode::Read::new(fd, ptr, (buf.len() - done) as u32).build()
            }
            _ => {
                if self.rx_start == self.rx_end {
                    self.rx_start = 0;
                    self.rx_end = 0;
                } else if self.rx_end == self.rx.len() {
                    self.rx.copy_within(self.rx_start..self.rx_end, 0);
                    self.rx_end -= self.rx_start;
                    self.rx_start = 0;
                }
                let ptr = self.rx[self.rx_end..].as_mut_ptr();
                opcode::Read::new(fd, ptr, (self.rx.len() - self.rx_end) as u32).build()
            }
        };
        self.push(entry.user_data(TOKEN_SOCK_READ));
        self.read_inflight = true;
    }

    fn on_sock_read(&mut self, res: i32) {
        self.read_inflight = false;
        let target = self.read_into_payload.take();
        if res <= 0 {
            let why = if res == 0 {
                "closed the connection".to_string()
            } else {
                io::Error::from_raw_os_error(-res).to_string()
            };
            match self.rx_state {
                Rx::Payload { slot } => {
                    let op = self.ops[slot].as_ref().expect("payload slot");
                    tracing::warn!(conn = self.id, export = %self.export,
                        "client gone mid-payload ({why}) after {} of {} bytes of a write; nothing written", op.done, op.buf.as_ref().map_or(0, |b| b.len()));
                    self.free_op(slot);
                }
                _ if res == 0 && self.rx_start == self.rx_end => {
                    tracing::info!(conn = self.id, export = %self.export, "client closed the connection");
                }
                _ => {
                    tracing::warn!(conn = self.id, export = %self.export, "client gone mid-request: {why}")
                }
            }
            self.rx_closed = true;
            self.rx_state = Rx::Header;
            return;
        }
        let n = res as usize;
        match target {
            Some(slot) => {
                let op = self.ops[slot].as_mut().expect("payload slot");
                op.done += n as u32;
                if op.done as usize == op.buf.as_ref().expect("write buffer").len() {
                    self.payload_received(slot);
                }
            }
            None => self.rx_end += n,
        }
        self.process_rx();
    }

    /// Consume whatever the receive buffer holds: headers, payloads, skipped bytes.
    fn process_rx(&mut self) {
        loop {
            let avail = self.rx_end - self.rx_start;
            match self.rx_state {
                Rx::Header => {
                    if self.rx_closed || avail < REQUEST_HEADER_LEN || !self.can_start_request() {
                        return;
                    }
                    let mut h = [0u8; REQUEST_HEADER_LEN];
                    h.copy_from_slice(&self.rx[self.rx_start..self.rx_start + REQUEST_HEADER_LEN]);
                    self.rx_start += REQUEST_HEADER_LEN;
                    self.start_request(&h);
                }
                Rx::Payload { slot } => {
                    if avail == 0 {
                        return;
                    }
                    let op = self.ops[slot].as_mut().expect("payload slot");
                    let buf = op.buf.as_mut().expect("write buffer");
                    let take = avail.min(buf.len() - op.done as usize);
                    buf[op.done as usize..op.done as usize + take]
                        .copy_from_slice(&self.rx[self.rx_start..self.rx_start + take]);
                    op.done += take as u32;
                    self.rx_start += take;
                    if op.done as usize == buf.len() {
                        self.payload_received(slot);
                    }
                }
                Rx::Skip {
                    remaining,
                    ref mut reply,
                } => {
                    if avail == 0 {
                        return;
                    }
                    let take = (avail as u64).min(remaining);
                    self.rx_start += take as usize;
                    if take == remaining {
                        let r = reply.take();
                        self.rx_state = Rx::Header;
                        if let Some((c, k, e, w)) = r {
                            self.reply_error(c, k, e, &w);
                        }
                    } else {
                        self.rx_state = Rx::Skip {
                            remaining: remaining - take,
                            reply: reply.take(),
                        };
                    }
                }
            }
        }
    }

    fn payload_received(&mut self, slot: usize) {
        self.rx_state = Rx::Header;
        // From here on `done` counts bytes written to disk, not bytes received.
        self.ops[slot].as_mut().expect("payload slot").done = 0;
        self.start_disk(slot);
    }

    fn start_request(&mut self, raw: &[u8; REQUEST_HEADER_LEN]) {
        self.stats.requests += 1;
        let h = match tx::parse_request(raw) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(conn = self.id, export = %self.export, "{e}; disconnecting (the stream cannot be resynchronised)");
                self.rx_closed = true;
                return;
            }
        };
        let cmd = match tx::validate(&h, &self.session) {
            Ok(c) => c,
            Err(rej) => return self.reject(&h, rej),
        };
        let len = match cmd {
            Command::Disconnect => {
                tracing::debug!(conn = self.id, export = %self.export, "client sent NBD_CMD_DISC");
                self.rx_closed = true;
                return;
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => return self.block_status(h.cookie, offset, len, req_one),
            Command::Read { len, .. } | Command::Write { len, .. } => len as usize,
            _ => 0,
        };
        let span = match cmd {
            Command::Read { offset, len }
            | Command::Write { offset, len, .. }
            | Command::Trim { offset, len, .. }
            | Command::WriteZeroes { offset, len, .. } => {
                aligned_span(offset, len as u64, self.align)
            }
            _ => (0, 0),
        };
        // A read is done over its whole span and answered from the middle of it.
        let len = match cmd {
            Command::Read { .. } => (span.1 - span.0) as usize,
            _ => len,
        };
        let slot = self.free_slots.pop().expect("checked by can_start_request");
        let buf = (len > 0).then(|| self.pool.get(len));
        self.inflight_bytes += len;
        self.live_ops += 1;
        self.ops[slot] = Some(Op {
            cookie: h.cookie,
            cmd,
            buf,
            done: 0,
            stage: Stage::Main,
            change: None,
            trim_noop: false,
            span,
            bounce: None,
            paced_until: None,
        });
        if let Command::Write { .. } = cmd {
            self.rx_state = Rx::Payload { slot };
        } else {
            self.start_disk(slot);
        }
    }

    fn reject(&mut self, h: &RequestHeader, rej: Rejection) {
        self.stats.rejected += 1;
        tracing::warn!(conn = self.id, export = %self.export, cookie = h.cookie,
            "refused request: {} -> {:?}", rej.why, rej.errno);
        if rej.payload > tx::MAX_SKIPPABLE_PAYLOAD {
            tracing::error!(conn = self.id, export = %self.export,
                "write payload of {} bytes is too large to skip; disconnecting", rej.payload);
            self.rx_closed = true;
            return;
        }
        if rej.payload > 0 {
            self.rx_state = Rx::Skip {
                remaining: rej.payload as u64,
                reply: Some((h.cookie, h.kind, rej.errno, rej.why.clone())),
            };
        } else {
            self.reply_error(h.cookie, h.kind, rej.errno, &rej.why);
        }
    }

    fn reply_error(&mut self, cookie: u64, kind: u16, errno: NbdErrno, why: &str) {
        if self.session.structured && matches!(kind, CMD_READ | CMD_BLOCK_STATUS) {
            let mut v = Vec::with_capacity(32 + why.len());
            tx::error_chunk(&mut v, cookie, errno, why);
            self.out.push_back(Seg::Bytes(v));
        } else {
            self.out
                .push_back(Seg::small(&tx::simple_reply(cookie, errno as u32)));
        }
    }

    fn block_status(&mut self, cookie: u64, offset: u64, len: u32, req_one: bool) {
        let mut extents: Vec<tx::Extent> = Vec::new();
        match self.storage.allocation(offset, len as u64) {
            Ok(runs) => {
                for (n, hole) in runs {
                    let flags = if hole { STATE_HOLE | STATE_ZERO } else { 0 };
                    match extents.last_mut() {
                        Some(e) if e.flags == flags => e.len += n as u32,
                        _ => extents.push(tx::Extent {
                            len: n as u32,
                            flags,
                        }),
                    }
                }
                if req_one {
                    extents.truncate(1);
                }
                extents.truncate(1 << 16);
                let mut v = Vec::with_capacity(24 + 8 * extents.len());
                tx::block_status_chunk(&mut v, cookie, META_ID_BASE_ALLOCATION, &extents);
                self.out.push_back(Seg::Bytes(v));
            }
            Err(e) => {
                tracing::warn!(conn = self.id, export = %self.export, "block status at {offset}: {e}");
                self.reply_error(
                    cookie,
                    CMD_BLOCK_STATUS,
                    NbdErrno::Io,
                    "cannot read allocation map",
                );
            }
        }
    }

    /// Submit (or resubmit after a short transfer) the disk side of an op.
    fn start_disk(&mut self, slot: usize) {
        let op = self.ops[slot].as_mut().expect("live op");
        let changes = matches!(
            op.cmd,
            Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
        );
        if let (
            true,
            None,
            Command::Write { offset, len, .. }
            | Command::Trim { offset, len, .. }
            | Command::WriteZeroes { offset, len, .. },
        ) = (changes, &op.change, op.cmd)
        {
            // Locked and announced before the disk sees it (`volume`); "not now" parks the
            // op, never blocks the thread, and the eventfd says when to try again.
            let waker: Arc<dyn Wake> = self.waker.clone();
            let holder = (self.id << 16) | slot as u64;
            let data = matches!(op.cmd, Command::Write { .. });
            if data {
                // Paced: parked until its time (the timer wakes the ring), then admitted.
                let now = std::time::Instant::now();
                let until = *op.paced_until.get_or_insert_with(|| {
                    let d = self.volume.pace_delay();
                    if !d.is_zero() {
                        crate::wake::wake_at(now + d, &waker);
                    }
                    now + d
                });
                if now < until {
                    self.parked.push_back(slot);
                    return;
                }
            }
            match self
                .volume
                .admit(offset, len, data, op.span, holder, &waker)
            {
                Ok(Some(c)) => op.change = Some(c),
                Ok(None) => {
                    self.parked.push_back(slot);
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::ESHUTDOWN) => {
                    // The daemon stops: the write never started, the client may retry it
                    // elsewhere or later.
                    tracing::info!(conn = self.id, export = %self.export, "write refused: the daemon is stopping");
                    return self.finish(
                        slot,
                        Err((NbdErrno::Shutdown, "the server is shutting down".into())),
                    );
                }
                Err(e) => {
                    tracing::error!(conn = self.id, export = %self.export, "journal: cannot record a write: {e}");
                    return self.finish(slot, Err((NbdErrno::Io, format!("journal: {e}"))));
                }
            }
        }
        if let (Command::Write { offset, len, .. }, None, Stage::Main, 0) =
            (op.cmd, &op.bounce, &op.stage, op.done)
        {
            if (offset, offset + len as u64) != op.span {
                // Unaligned on direct I/O: read the edge blocks, then write the whole span.
                op.bounce = Some(self.pool.get((op.span.1 - op.span.0) as usize));
                self.inflight_bytes += (op.span.1 - op.span.0) as usize;
                op.stage = if offset != op.span.0 {
                    Stage::RmwHead
                } else {
                    Stage::RmwTail
                };
            }
        }
        let align = self.align as u32;
        let done = op.done;
        let disk_op = match (&op.stage, op.cmd) {
            (Stage::RmwHead, _) => {
                let b = op.bounce.as_mut().expect("bounce buffer");
                DiskOp::Read {
                    offset: op.span.0 + done as u64,
                    buf: b[done as usize..].as_mut_ptr(),
                    len: align - done,
                }
            }
            (Stage::RmwTail, _) => {
                let b = op.bounce.as_mut().expect("bounce buffer");
                let at = b.len() - align as usize + done as usize;
                DiskOp::Read {
                    offset: op.span.1 - align as u64 + done as u64,
                    buf: b[at..].as_mut_ptr(),
                    len: align - done,
                }
            }
            (Stage::SyncAfter, _) | (Stage::Main, Command::Flush) => DiskOp::Sync,
            (Stage::ZeroFill { pos, end }, _) => {
                let len = (end - pos).min(self.zeroes.len() as u64) as u32;
                DiskOp::Write {
                    offset: *pos,
                    buf: self.zeroes.as_ptr(),
                    len,
                    fua: false,
                }
            }
            (Stage::Main, Command::Read { .. }) => {
                let buf = op.buf.as_mut().expect("read buffer");
                DiskOp::Read {
                    offset: op.span.0 + done as u64,
                    buf: buf[done as usize..].as_mut_ptr(),
                    len: buf.len() as u32 - done,
                }
            }
            (Stage::Main, Command::Write { offset, fua, .. }) => {
                let (buf, at) = match &op.bounce {
                    Some(b) => (b, op.span.0),
                    None => (op.buf.as_ref().expect("write buffer"), offset),
                };
                DiskOp::Write {
                    offset: at + done as u64,
                    buf: buf[done as usize..].as_ptr(),
                    len: buf.len() as u32 - done,
                    fua,
                }
            }
            (Stage::Main, Command::Trim { offset, len, .. }) => DiskOp::Discard { offset, len },
            (
                Stage::Main,
                Command::WriteZeroes {
                    offset,
                    len,
                    no_hole,
                    ..
                },
            ) => DiskOp::Zero {
                offset,
                len,
                punch: !no_hole,
            },
            (Stage::Main, Command::BlockStatus { .. } | Command::Disconnect) => {
                unreachable!("not disk operations")
            }
        };
        match self.storage.prepare(disk_op) {
            Prepared::Submit(entry) => self.push(entry.user_data(slot as u64)),
            Prepared::Done(res) => self.on_disk_done(slot, res),
        }
    }

    fn on_disk_done(&mut self, slot: usize, res: i32) {
        let op = self.ops[slot].as_mut().expect("completion for a live op");
        let cmd = op.cmd;
        if res < 0 {
            let errno = -res;
            let unsupported = errno == libc::EOPNOTSUPP || errno == libc::EINVAL;
            match (&op.stage, cmd) {
                // TRIM is advisory: a disk that cannot deallocate has still done its job.
                (Stage::Main, Command::Trim { fua, .. }) if unsupported => {
                    op.trim_noop = true;
                    return self.after_main(slot, fua);
                }
                (Stage::Main, Command::WriteZeroes { offset, len, .. }) if unsupported => {
                    op.stage = Stage::ZeroFill {
                        pos: offset,
                        end: offset + len as u64,
                    };
                    return self.start_disk(slot);
                }
                _ => {}
            }
            let e = io::Error::from_raw_os_error(errno);
            tracing::warn!(conn = self.id, export = %self.export, ?cmd, "disk error: {e}");
            return self.finish(slot, Err((NbdErrno::from_os(errno), e.to_string())));
        }
        let n = res as u32;
        match (&mut op.stage, cmd) {
            (Stage::SyncAfter, _) | (Stage::Main, Command::Flush) => self.finish(slot, Ok(())),
            (Stage::ZeroFill { pos, end }, Command::WriteZeroes { fua, .. }) => {
                if n == 0 {
                    return self.finish(
                        slot,
                        Err((NbdErrno::Io, "zero fill made no progress".into())),
                    );
                }
                *pos += n as u64;
                if *pos < *end {
                    self.start_disk(slot)
                } else {
                    self.after_main(slot, fua)
                }
            }
            (Stage::RmwHead | Stage::RmwTail, Command::Write { offset, .. }) => {
                let bounce = op.bounce.as_mut().expect("bounce buffer");
                let edge = if matches!(op.stage, Stage::RmwHead) {
                    0
                } else {
                    bounce.len() - self.align as usize
                };
                if n == 0 {
                    // Past the end of the file: those bytes read as zeroes.
                    bounce[edge + op.done as usize..edge + self.align as usize].fill(0);
                    op.done = self.align as u32;
                } else {
                    op.done += n;
                }
                if op.done < self.align as u32 {
                    return self.start_disk(slot);
                }
                op.done = 0;
                let tail_needed =
                    offset + op.buf.as_ref().map_or(0, |b| b.len()) as u64 != op.span.1;
                if matches!(op.stage, Stage::RmwHead)
                    && tail_needed
                    && bounce.len() > self.align as usize
                {
                    op.stage = Stage::RmwTail;
                } else {
                    let payload = op.buf.as_ref().expect("write payload");
                    let at = (offset - op.span.0) as usize;
                    bounce[at..at + payload.len()].copy_from_slice(payload);
                    op.stage = Stage::Main;
                }
                self.start_disk(slot)
            }
            (Stage::Main, Command::Read { .. }) => {
                let len = op.buf.as_ref().expect("read buffer").len() as u32;
                if n == 0 {
                    // Past the file's end (a file shrunk under us): the rest reads as zeroes.
                    let buf = op.buf.as_mut().expect("read buffer");
                    buf[op.done as usize..].fill(0);
                    op.done = len;
                } else {
                    op.done += n;
                }
                if op.done < len {
                    self.start_disk(slot)
                } else {
                    self.finish(slot, Ok(()))
                }
            }
            (Stage::Main, Command::Write { .. }) => {
                if n == 0 {
                    return self.finish(slot, Err((NbdErrno::Io, "disk accepted no bytes".into())));
                }
                op.done += n;
                let total = op
                    .bounce
                    .as_ref()
                    .or(op.buf.as_ref())
                    .expect("write buffer")
                    .len() as u32;
                if op.done < total {
                    self.start_disk(slot)
                } else {
                    // The local write completed, the reply has not gone out yet: the
                    // volume records it now, so journal order is completion order.
                    self.finish(slot, Ok(()))
                }
            }
            (Stage::Main, Command::Trim { fua, .. } | Command::WriteZeroes { fua, .. }) => {
                self.after_main(slot, fua)
            }
            _ => unreachable!("stage and command do not match"),
        }
    }

    fn after_main(&mut self, slot: usize, fua: bool) {
        if fua {
            self.ops[slot].as_mut().expect("live op").stage = Stage::SyncAfter;
            self.start_disk(slot);
        } else {
            self.finish(slot, Ok(()));
        }
    }

    /// Tell the volume how the op ended (after the local disk completed, before the reply:
    /// journal order is completion order): a change's outcome, or a FLUSH's journal sync.
    /// `written` is a successful write's data.
    fn record_outcome(
        &self,
        op: &mut Op,
        ok: bool,
        written: Option<bytes::Bytes>,
    ) -> Result<(), (NbdErrno, String)> {
        if let (Command::Flush, true) = (op.cmd, ok) {
            return self
                .volume
                .flush()
                .map_err(|e| (NbdErrno::Io, format!("journal sync: {e}")));
        }
        let Some(change) = op.change.take() else {
            return Ok(());
        };
        let (ended, fua) = match op.cmd {
            Command::Write { fua, .. } => (written.map(Payload::Data).map(Ended::Done), fua),
            Command::WriteZeroes { len, fua, .. } => (Some(Ended::Done(Payload::Zero(len))), fua),
            Command::Trim { len, fua, .. } => {
                (Some(self.volume.discard_ended(len, !op.trim_noop)), fua)
            }
            _ => (None, false),
        };
        let ended = match ended {
            Some(e) if ok => e,
            _ => Ended::Unknown,
        };
        self.volume.finish(change, ended, ok && fua).map_err(|e| {
            tracing::error!(conn = self.id, export = %self.export, "journal: cannot record a completed write: {e}");
            (NbdErrno::Io, format!("journal: {e}"))
        })
    }

    /// Queue the reply for a finished op and free its slot.
    fn finish(&mut self, slot: usize, result: Result<(), (NbdErrno, String)>) {
        // A large written buffer goes to the journal as it is, no copy: its RAM ring keeps it
        // for the shipper, and the pool gets it back when the journal lets go. Small ones are
        // copied: a page-aligned 4 KiB allocation takes 8 KiB of heap, and the ring would hold
        // twice what it counts.
        let written = {
            let op = self.ops[slot].as_mut().expect("live op");
            match (&op.cmd, &op.buf) {
                (Command::Write { .. }, Some(b))
                    if result.is_ok() && self.volume.journal.is_some() =>
                {
                    if b.len() >= HAND_OVER_MIN {
                        let b = op.buf.take().expect("just seen");
                        self.inflight_bytes -= b.len();
                        Some(bytes::Bytes::from_owner(b))
                    } else {
                        Some(bytes::Bytes::copy_from_slice(b))
                    }
                }
                _ => None,
            }
        };
        let mut op = self.ops[slot].take().expect("live op");
        let recorded = self.record_outcome(&mut op, result.is_ok(), written);
        let result = result.and(recorded);
        self.free_slots.push(slot);
        self.live_ops -= 1;
        if let Some(b) = op.bounce.take() {
            self.release(b);
        }
        let buf = op.buf.take();
        let kind = match op.cmd {
            Command::Read { .. } => CMD_READ,
            _ => CMD_WRITE,
        };
        match (result, op.cmd, buf) {
            // Read data stays counted in flight until the socket has taken it.
            (Ok(()), Command::Read { offset, len }, Some(buf)) => {
                let skip = (offset - op.span.0) as usize;
                self.reply_read(op.cookie, offset, buf, skip, len as usize)
            }
            (result, _, buf) => {
                if let Some(b) = buf {
                    self.release(b);
                }
                match result {
                    Ok(()) => self
                        .out
                        .push_back(Seg::small(&tx::simple_reply(op.cookie, 0))),
                    Err((errno, why)) => self.reply_error(op.cookie, kind, errno, &why),
                }
            }
        }
    }

    /// Done with `buf`: it goes back to the pool as it drops.
    fn release(&mut self, buf: PooledBuf) {
        self.inflight_bytes -= buf.len();
    }

    /// Answer a read with `buf[skip..skip + len]` (the request inside its aligned span).
    fn reply_read(&mut self, cookie: u64, offset: u64, buf: PooledBuf, skip: usize, len: usize) {
        let buf = Rc::new(buf);
        if !self.session.structured {
            self.out.push_back(Seg::small(&tx::simple_reply(cookie, 0)));
            self.out.push_back(Seg::Data {
                buf,
                start: skip,
                end: skip + len,
            });
            return;
        }
        let runs = tx::zero_runs(&buf[skip..skip + len], HOLE_GRANULE);
        let last = runs.len() - 1;
        for (i, (start, n, zero)) in runs.into_iter().enumerate() {
            let mut h = Vec::with_capacity(32);
            if zero {
                tx::offset_hole(&mut h, cookie, i == last, offset + start as u64, n as u32);
                self.out.push_back(Seg::small(&h));
            } else {
                tx::offset_data_header(&mut h, cookie, i == last, offset + start as u64, n as u32);
                self.out.push_back(Seg::small(&h));
                self.out.push_back(Seg::Data {
                    buf: buf.clone(),
                    start: skip + start,
                    end: skip + start + n,
                });
            }
        }
        if let Ok(b) = Rc::try_unwrap(buf) {
            self.release(b);
        }
    }

    fn free_op(&mut self, slot: usize) {
        let op = self.ops[slot].take().expect("live op");
        self.free_slots.push(slot);
        self.live_ops -= 1;
        if let Some(b) = op.buf {
            self.release(b);
        }
    }

    fn submit_wake_read(&mut self) {
        let fd = types::Fd(self.waker.fd.as_raw_fd());
        let ptr = self.wake_buf.as_mut_ptr();
        self.push(opcode::Read::new(fd, ptr, 8).build().user_data(TOKEN_WAKE));
        self.wake_armed = true;
    }

    fn submit_sock_write(&mut self) {
        self.iov.clear();
        for (i, seg) in self.out.iter().take(MAX_IOV).enumerate() {
            let s = seg.slice();
            let skip = if i == 0 { self.out_front_done } else { 0 };
            self.iov.push(libc::iovec {
                iov_base: s[skip..].as_ptr() as *mut _,
                iov_len: s.len() - skip,
            });
        }
        let entry = opcode::Writev::new(
            types::Fd(self.sock.as_raw_fd()),
            self.iov.as_ptr(),
            self.iov.len() as u32,
        )
        .build();
        self.push(entry.user_data(TOKEN_SOCK_WRITE));
        self.write_inflight = true;
    }

    fn on_sock_write(&mut self, res: i32) {
        self.write_inflight = false;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            tracing::warn!(conn = self.id, export = %self.export, "cannot send replies ({e}); dropping the connection");
            self.die();
            return;
        }
        let mut n = res as usize;
        while n > 0 {
            let front_left = self
                .out
                .front()
                .expect("written bytes belong to queued segments")
                .slice()
                .len()
                - self.out_front_done;
            if n < front_left {
                self.out_front_done += n;
                break;
            }
            n -= front_left;
            self.out_front_done = 0;
            if let Some(Seg::Data { buf, .. }) = self.out.pop_front() {
                if let Ok(b) = Rc::try_unwrap(buf) {
                    self.release(b);
                }
            }
        }
        // Parsing may have paused on memory held by replies that are now gone.
        self.process_rx();
    }

    fn die(&mut self) {
        self.dead = true;
        self.rx_closed = true;
        self.out.clear();
        // Wake a pending receive so the loop can end once the disk is quiet.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}
