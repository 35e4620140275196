//! The primary's shipper: one per volume. It connects to the mirror, learns what the mirror
//! already holds, sends the full copy when the mirror is new, then cuts the journal into delta
//! sets and keeps many of them in flight. Acknowledgements trim the journal. Any failure ends
//! the session; the next one resumes from the mirror's last durable set.

use super::fold::Folder;
use super::frame::{DeltaSet, KnownCrcs, Message, SetKind, PROTOCOL_VERSION};
use super::stream::{read_message, write_message};
use crate::disk::buf::{SharedPool, VecPool};
use crate::disk::Storage;
use crate::extent::{Extent, Payload};
use crate::journal::Journal;
use crate::transport::{self, Identity};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Raw bytes per delta set, at most.
pub const SET_MAX_BYTES: u64 = 8 << 20;
/// Delta sets in flight (sent, not yet acknowledged), at most.
pub const WINDOW_SETS: usize = 32;
/// A set smaller than this waits up to [`SET_LINGER`] for more records while earlier sets are
/// in flight: a set costs both sides the same fixed work (encode task, redo write, ack, apply
/// batch) whatever its size. 4 KiB random writes made ~8-record sets, 2,000 a second.
const SET_TARGET_BYTES: u64 = 1 << 20;
const SET_LINGER: Duration = Duration::from_millis(4);
const COPY_CHUNK: u64 = 1 << 20;

/// What status shows of a shipper. Counters only grow.
#[derive(Default)]
pub struct ShipStats {
    pub link_up: AtomicBool,
    pub sent_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
    pub sent_set: AtomicU64,
    pub acked_set: AtomicU64,
    pub applied_set: AtomicU64,
    pub reconnects: AtomicU64,
    pub copy_total: AtomicU64,
    pub copy_done: AtomicU64,
    pub copying: AtomicBool,
    pub last_error: Mutex<String>,
    /// Test hook: corrupt the next data set after its CRC is computed.
    pub corrupt_next: AtomicBool,
    /// QUIC path counters, summed over sessions (see `QuicCounters`).
    pub quic: Mutex<QuicCounters>,
}

/// What the transport reports of the path: packets sent and lost (lost or retransmitted are
/// what a flooded queue shows), congestion window and round-trip time now.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct QuicCounters {
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
    pub congestion_events: u64,
    pub cwnd: u64,
    pub rtt_ms: f64,
    pub min_rtt_ms: f64,
    /// UDP payload size now in use (MTU discovery raises it to what the path carries).
    pub mtu: u16,
    /// Counters of sessions that ended (the current one is added on top).
    #[serde(skip)]
    done: (u64, u64, u64, u64),
}

impl QuicCounters {
    fn update(&mut self, conn: &quinn::Connection) {
        let p = conn.stats().path;
        self.sent_packets = self.done.0 + p.sent_packets;
        self.lost_packets = self.done.1 + p.lost_packets;
        self.lost_bytes = self.done.2 + p.lost_bytes;
        self.congestion_events = self.done.3 + p.congestion_events;
        self.cwnd = p.cwnd;
        self.rtt_ms = p.rtt.as_secs_f64() * 1e3;
        self.min_rtt_ms = p.min_rtt.as_secs_f64() * 1e3;
        self.mtu = p.current_mtu;
    }

    fn end_session(&mut self) {
        self.done = (
            self.sent_packets,
            self.lost_packets,
            self.lost_bytes,
            self.congestion_events,
        );
    }
}

pub struct Shipper {
    pub volume: String,
    pub journal: Arc<Journal>,
    pub storage: Arc<dyn Storage>,
    pub endpoint: quinn::Endpoint,
    pub mirror: SocketAddr,
    pub identity: Arc<Identity>,
    pub stats: Arc<ShipStats>,
    /// lz4-compress data that shrinks (off for links faster than lz4 itself).
    pub compress: bool,
    /// Buffers for encoded sets, reused once quinn is done with them ([`ENCODE_POOL_BYTES`]).
    pub encode_pool: Arc<VecPool>,
    /// Woken by the journal when records or dirty ranges arrive.
    pub records: Arc<tokio::sync::Notify>,
}

/// Free encode buffers kept for reuse: a few sets' worth.
pub const ENCODE_POOL_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Transport(#[from] transport::TransportError),
    #[error("{0}")]
    Stream(#[from] super::stream::StreamError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("mirror refused: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Shipper {
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            if !first {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            let result = self.session().await;
            self.stats.link_up.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(volume = %self.volume, "replication link down: {e}");
                    *self.stats.last_error.lock().unwrap() = e.to_string();
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn session(self: &Arc<Self>) -> Result<(), SessionError> {
        let conn = transport::connect(&self.endpoint, self.mirror, &self.identity).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            volume: self.volume.clone(),
            size: self.storage.size(),
        };
        write_message(&mut send, &hello).await?;
        // The mirror's answers are small: a few pages each.
        let pool = SharedPool::new(1 << 20);
        let ack = tokio::time::timeout(Duration::from_secs(10), read_message(&mut recv, &pool))
            .await
            .map_err(|_| SessionError::Protocol("no answer to hello within 10 s".into()))??;
        let (durable_set, durable_seq, needs_full_copy) = match ack {
            Some((
                Message::HelloAck {
                    durable_set,
                    durable_seq,
                    needs_full_copy,
                },
                _,
            )) => (durable_set, durable_seq, needs_full_copy),
            Some((Message::Refuse { reason, .. }, _)) => return Err(SessionError::Refused(reason)),
            other => {
                return Err(SessionError::Protocol(format!(
                    "expected HelloAck, got {other:?}"
                )))
            }
        };
        tracing::info!(volume = %self.volume, durable_set, durable_seq, needs_full_copy, "replication link up");
        self.stats.link_up.store(true, Ordering::Relaxed);
        self.stats.acked_set.store(durable_set, Ordering::Relaxed);
        self.journal
            .ack(durable_seq)
            .map_err(|e| SessionError::Protocol(format!("HelloAck: {e}")))?;
        let window = Arc::new(Semaphore::new(WINDOW_SETS));
        let acks = tokio::spawn(read_acks(self.clone(), recv, window.clone(), pool));
        let sampler = {
            let (stats, conn) = (self.stats.clone(), conn.clone());
            tokio::spawn(async move {
                loop {
                    stats.quic.lock().unwrap().update(&conn);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let sending = self.send_loop(
            &mut send,
            &window,
            durable_set + 1,
            durable_seq,
            needs_full_copy,
        );
        let result = tokio::select! {
            r = sending => r,
            r = acks => match r {
                Ok(r) => r,
                Err(e) => Err(SessionError::Protocol(format!("ack reader: {e}"))),
            },
        };
        sampler.abort();
        // A peer that closed on us usually said why (a refusal): that is the error to show.
        let result = match (result, conn.close_reason()) {
            (Err(e), Some(reason)) => Err(SessionError::Protocol(format!("{e}; {reason}"))),
            (r, _) => r,
        };
        {
            let mut q = self.stats.quic.lock().unwrap();
            q.update(&conn);
            q.end_session();
        }
        conn.close(0u32.into(), b"session over");
        result
    }

    async fn send_loop(
        &self,
        send: &mut quinn::SendStream,
        window: &Semaphore,
        mut next_set: u64,
        mut shipped_seq: u64,
        needs_full_copy: bool,
    ) -> Result<(), SessionError> {
        let mut copy = if needs_full_copy {
            // The copy carries everything journaled so far.
            let seq = self.journal.last_seq();
            self.journal
                .ack(seq)
                .map_err(|e| SessionError::Protocol(e.to_string()))?;
            shipped_seq = shipped_seq.max(seq);
            self.stats
                .copy_total
                .store(self.storage.size(), Ordering::Relaxed);
            self.stats.copy_done.store(0, Ordering::Relaxed);
            self.stats.copying.store(true, Ordering::Relaxed);
            tracing::info!(volume = %self.volume, bytes = self.storage.size(), "mirror is new: full copy starts");
            Some(0u64)
        } else {
            None
        };
        let mut linger_until: Option<tokio::time::Instant> = None;
        loop {
            self.resync_dirty()?;
            // Journal first: a copy chunk must land after every set cut before it was read.
            let notified = self.records.notified();
            let (records, covered) = self.journal.collect(shipped_seq, SET_MAX_BYTES)?;
            let mut sent = false;
            if covered > shipped_seq && copy.is_none() {
                let bytes: u64 = records.iter().map(|r| r.extent.len()).sum();
                let in_flight = window.available_permits() < WINDOW_SETS;
                if in_flight && bytes < SET_TARGET_BYTES {
                    let until = *linger_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + SET_LINGER);
                    if tokio::time::Instant::now() < until {
                        tokio::time::sleep_until(until).await;
                        continue;
                    }
                }
            }
            linger_until = None;
            if covered > shipped_seq {
                // The journal's CRCs of the records, for the pieces folding leaves whole.
                let mut known = KnownCrcs::default();
                for r in &records {
                    if let (Payload::Data(data), Some(crc)) = (&r.extent.payload, r.crc) {
                        known.insert(data, crc);
                    }
                }
                let mut folder = Folder::new();
                for r in records {
                    folder.add(r.extent);
                }
                let set = DeltaSet {
                    set: next_set,
                    first_seq: shipped_seq + 1,
                    last_seq: covered,
                    newest_write_ms: 0,
                    kind: SetKind::Journal,
                    extents: folder.into_extents(),
                };
                self.send_set(send, window, set, known).await?;
                next_set += 1;
                shipped_seq = covered;
                sent = true;
            }
            // One copy set per journal set: neither starves the other.
            if let Some(pos) = copy {
                let (set, next) = self.copy_set(next_set, pos)?;
                self.send_set(send, window, set, KnownCrcs::default())
                    .await?;
                next_set += 1;
                self.stats.copy_done.store(next, Ordering::Relaxed);
                if next >= self.storage.size() {
                    tracing::info!(volume = %self.volume, "full copy sent");
                    self.stats.copying.store(false, Ordering::Relaxed);
                    copy = None;
                } else {
                    copy = Some(next);
                }
                continue;
            }
            if sent {
                continue;
            }
            // Nothing to send: sleep until the journal grows (or re-check now and then).
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
        }
    }

    async fn send_set(
        &self,
        send: &mut quinn::SendStream,
        window: &Semaphore,
        set: DeltaSet,
        known: KnownCrcs,
    ) -> Result<(), SessionError> {
        window
            .acquire()
            .await
            .expect("window semaphore never closes")
            .forget();
        let number = set.set;
        let compress = self.compress;
        let pool = self.encode_pool.clone();
        // Folding, CRCs and lz4 take milliseconds per set: off the network threads.
        let (mut chunks, stats) = tokio::task::spawn_blocking(move || {
            if compress {
                // Sized once: growing an 8 MiB buffer by doubling copies it again and again.
                let mut buf = pool.take(
                    usize::try_from(set.max_body_len()).unwrap_or(0) + super::frame::PREFIX_LEN,
                );
                let stats =
                    super::frame::encode_with_crcs(&Message::Set(set), &mut buf, true, &known);
                (vec![pool.lend(buf)], stats)
            } else {
                // Uncompressed, the data is sent from the journal's own buffers.
                super::frame::encode_set_chunks(&set, &known)
            }
        })
        .await
        .map_err(|e| SessionError::Protocol(format!("encoder task: {e}")))?;
        if self.stats.corrupt_next.load(Ordering::Relaxed) {
            let mut flat = chunks.concat();
            if super::frame::corrupt_first_data_byte(&mut flat) {
                chunks = vec![Bytes::from(flat)];
                self.stats.corrupt_next.store(false, Ordering::Relaxed);
                tracing::warn!(volume = %self.volume, set = number, "test hook: corrupted a byte of this set after its CRC");
            }
        }
        // Handed over, not copied: quinn keeps the chunks until the mirror acknowledges them.
        send.write_all_chunks(&mut chunks)
            .await
            .map_err(super::stream::StreamError::from)?;
        self.stats
            .sent_bytes
            .fetch_add(stats.raw_bytes, Ordering::Relaxed);
        self.stats
            .wire_bytes
            .fetch_add(stats.wire_bytes, Ordering::Relaxed);
        self.stats.sent_set.store(number, Ordering::Relaxed);
        Ok(())
    }

    /// The next piece of the full copy from `pos`: data where the volume has data, zero
    /// extents where it reads as zeroes (holes cost nothing on the wire).
    fn copy_set(&self, set: u64, pos: u64) -> std::io::Result<(DeltaSet, u64)> {
        let size = self.storage.size();
        let mut folder = Folder::new();
        let mut at = pos;
        while at < size && folder.data_bytes() < SET_MAX_BYTES {
            let len = COPY_CHUNK.min(size - at);
            let holes = self.storage.allocation(at, len)?;
            if holes.len() == 1 && holes[0].1 {
                folder.add(Extent {
                    offset: at,
                    payload: Payload::Zero(len as u32),
                });
            } else {
                let mut buf = vec![0u8; len as usize];
                self.storage.read_sync(at, &mut buf)?;
                let payload = if buf.iter().all(|&b| b == 0) {
                    Payload::Zero(len as u32)
                } else {
                    Payload::Data(Bytes::from(buf))
                };
                folder.add(Extent {
                    offset: at,
                    payload,
                });
            }
            at += len;
        }
        // Blocks read now may be newer than the sets sent so far: the mirror is consistent
        // only once sets up to the journal's current end have been applied.
        let seq = self.journal.last_seq();
        let kind = SetKind::Copy { done: at >= size };
        Ok((
            DeltaSet {
                set,
                first_seq: seq,
                last_seq: seq,
                newest_write_ms: 0,
                kind,
                extents: folder.into_extents(),
            },
            at,
        ))
    }

    /// Re-read ranges whose content the journal could not vouch for and journal them.
    fn resync_dirty(&self) -> std::io::Result<()> {
        for (offset, len) in self.journal.take_dirty() {
            tracing::info!(volume = %self.volume, offset, len, "re-reading a range the journal could not vouch for");
            let end = (offset + len).min(self.storage.size());
            let mut at = offset;
            while at < end {
                let n = COPY_CHUNK.min(end - at);
                let mut buf = vec![0u8; n as usize];
                self.storage.read_sync(at, &mut buf)?;
                self.journal.resync(at, Bytes::from(buf))?;
                at += n;
            }
        }
        Ok(())
    }
}

async fn read_acks(
    shipper: Arc<Shipper>,
    mut recv: quinn::RecvStream,
    window: Arc<Semaphore>,
    pool: Arc<SharedPool>,
) -> Result<(), SessionError> {
    loop {
        match read_message(&mut recv, &pool).await? {
            Some((
                Message::Ack {
                    set,
                    last_seq,
                    applied_set,
                },
                _,
            )) => {
                shipper
                    .journal
                    .ack(last_seq)
                    .map_err(|e| SessionError::Protocol(format!("Ack of set {set}: {e}")))?;
                shipper.stats.acked_set.store(set, Ordering::Relaxed);
                shipper
                    .stats
                    .applied_set
                    .store(applied_set, Ordering::Relaxed);
                window.add_permits(1);
            }
            Some((Message::Refuse { reason, .. }, _)) => return Err(SessionError::Refused(reason)),
            Some((other, _)) => {
                return Err(SessionError::Protocol(format!("unexpected {other:?}")))
            }
            None => return Err(SessionError::Protocol("mirror closed the stream".into())),
        }
    }
}
