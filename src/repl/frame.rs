//! Replication frames on the wire.
//!
//! One QUIC stream carries the messages of one volume, in both directions. This module is pure
//! code: [`encode`] appends a message to a buffer, [`Decoder`] (stream) and [`decode_one`]
//! (redo log reader) turn bytes back into messages, verifying everything before returning a
//! message. Decoding never panics, whatever the input, and memory is bounded by
//! [`MAX_MESSAGE`] (buffered frame) plus [`MAX_MESSAGE`] (decompressed data of one set).
//!
//! All integers are big-endian. All CRCs are CRC-32/IEEE (`crc32fast`).
//!
//! # Framing (every message)
//!
//! | bytes      | field      | meaning                                                         |
//! |------------|------------|-----------------------------------------------------------------|
//! | 4          | `body_len` | u32, length of `body` (its trailing `check` included); `> MAX_MESSAGE` → [`FrameError::TooLarge`] |
//! | 1          | `type`     | 1 Hello, 2 HelloAck, 3 Set, 4 Ack, 5 Refuse, 6 to 13 (versions 3 to 8, below); anything else → [`FrameError::UnknownType`] |
//! | `body_len` | `body`     | per-type layout below, always ending with `check`               |
//!
//! `check` (u32, the last 4 body bytes) is the CRC32 of the `type` byte followed by every body
//! byte before `check` **except the stored bytes of Set extents** (those are covered, after
//! decompression, by each extent's own `crc`). So every field — offsets, lengths, sequence
//! numbers, zero extents, strings — is verified, not only the data blocks. `body_len` itself is
//! not hashed: every layout's length is fixed by its own fields and must end exactly at `check`,
//! so a changed `body_len` is caught as [`FrameError::Malformed`] (or waits for bytes that
//! complete nothing valid).
//!
//! Check order on decode: framing → structure (`Malformed`) → `check` (`BadChecksum`) → field
//! rules (`Malformed`, i.e. a sender bug rather than corruption) → per-extent data
//! (`Decompress`, `BadCrc`).
//!
//! # Versioning
//!
//! The stream starts with the primary's Hello, whose `version` is [`PROTOCOL_VERSION`] (8; a
//! mirror holds sessions with versions from [`OLDEST_SESSION_VERSION`], see the history
//! below, and decodes sets of every version, which its redo log may keep). The
//! Hello layout is frozen for all versions, so any peer can read it and answer with a Refuse if
//! it does not speak that version: decoding does **not** reject a Hello whose version differs;
//! the receiver compares and refuses. Every other layout below is version 1, plus the raw
//! aligned encoding of version 2.
//!
//! # Bodies (version 1)
//!
//! Hello (type 1), primary → mirror, first on the stream:
//!
//! | bytes | field        | meaning                               |
//! |-------|--------------|---------------------------------------|
//! | 2     | `version`    | u16, [`PROTOCOL_VERSION`]             |
//! | 8     | `size`       | u64, volume size in bytes             |
//! | 2     | `volume_len` | u16, ≤ [`MAX_STRING`]                 |
//! | n     | `volume`     | UTF-8 volume name                     |
//! | 4     | `check`      |                                       |
//!
//! HelloAck (type 2), mirror → primary:
//!
//! | bytes | field             | meaning                                  |
//! |-------|-------------------|------------------------------------------|
//! | 8     | `durable_set`     | u64, last set durable in the redo log    |
//! | 8     | `durable_seq`     | u64, last journal seq of that set        |
//! | 1     | `needs_full_copy` | 0 or 1 (anything else is malformed)      |
//! | 4     | `check`           |                                          |
//!
//! Set (type 3), primary → mirror:
//!
//! | bytes | field       | meaning                                                     |
//! |-------|-------------|-------------------------------------------------------------|
//! | 8     | `set`       | u64, set number                                             |
//! | 8     | `first_seq` | u64, first journal seq folded into the set                  |
//! | 8     | `last_seq`  | u64, last journal seq folded into the set                   |
//! | 1     | `kind`      | 0 Journal, 1 Copy, 2 Copy (last one, `done = true`), 3 Repair (version 4) |
//! | 4     | `count`     | u32, number of extents that follow                          |
//! | …     | extents     | `count` times the extent layout below                       |
//! | 4     | `check`     |                                                             |
//!
//! Extent (22 bytes + stored bytes):
//!
//! | bytes        | field        | meaning                                                           |
//! |--------------|--------------|-------------------------------------------------------------------|
//! | 8            | `offset`     | u64, byte offset in the volume                                    |
//! | 4            | `len`        | u32, logical length (> 0; data: ≤ [`MAX_CHUNK`])                  |
//! | 1            | `kind`       | 0 data, 1 zero (the range reads as zeroes)                        |
//! | 1            | `encoding`   | 0 raw, 1 lz4 block (`lz4_flex::block`), 2 raw aligned (version 2); zero extents: 0 |
//! | 4            | `crc`        | CRC32 of the uncompressed data; zero extents: 0                   |
//! | 4            | `stored_len` | raw: `== len`; lz4: `0 < stored_len < len`; raw aligned: `pad + len`; zero: 0 |
//! | `stored_len` | stored bytes | raw data, lz4 block (must decompress to exactly `len` bytes), or `pad` zero bytes then raw data |
//!
//! Raw aligned (version 2): `pad` is what brings the frame offset (counted from the first byte
//! of `body_len`) to the next multiple of [`DATA_ALIGN`] (512), so `pad < 512` and the data
//! starts at an aligned offset of the frame. The padding is not covered by `check`; the
//! decoder requires it to be zero. A mirror receives frames into page-aligned memory, so it
//! can write such data to its volume with direct I/O from where it arrived, without a copy.
//! Encoders send raw pieces of at least [`ALIGN_MIN`] (64 KiB) this way (≤ 0.8 % more bytes,
//! ≤ 0.05 % for 1 MiB pieces), smaller ones plainly.
//!
//! Set rules checked on decode (and by [`DeltaSet::validate`]):
//! - sequence range: `first_seq <= last_seq` (journal writes `first_seq..=last_seq`), or
//!   `first_seq == last_seq + 1` for an **empty range** (no journal write; a Journal set with an
//!   empty range carries no extent). Anything else is malformed.
//! - extents are sorted by offset and never overlap (`offset >= previous end`), so the mirror may
//!   apply them in any order, in parallel; `offset + len` never overflows `u64`.
//! - the data extents of one set hold at most [`MAX_MESSAGE`] bytes once decompressed, which
//!   bounds what one frame can expand to. (A set whose uncompressed encoding fits in
//!   `MAX_MESSAGE`, see [`DeltaSet::max_body_len`], always satisfies this.)
//! - the volume size is not known here: the receiver checks extents against Hello's `size`.
//!
//! Ack (type 4), mirror → primary, set `set` (ending at `last_seq`) is durable at the mirror,
//! and sets up to `applied_set` are applied in place (status only):
//! `set u64 | last_seq u64 | applied_set u64 | check u32`.
//!
//! Refuse (type 5), either way, before closing: `code u16 | reason_len u16 (≤ 4096) |
//! reason (UTF-8) | check u32`. Codes: [`RefuseCode`] (which also says which are permanent).
//!
//! # Version 3: identities, comparisons, write times
//!
//! A version-3 session starts with Hello then **Identify** (type 6, primary → mirror): `flags
//! u8 (bit 0: a UUID follows) | uuid [16] | forgotten_below u64 | count u16 (≤ 64) | count ×
//! (gen u64 ≠ 0, first_seq u64, flags u8: 1 continuous, 2 a break where an admin accepted
//! another disk, 5 continuous where a mirror was promoted (version 6); only a break may start
//! lower than the span before) | journal_acked u64 |
//! journal_last u64 (≥ journal_acked) | fingerprint (string: the disk fingerprint as JSON) |
//! check u32` (see `repl::identity`). The mirror answers **Decision** (type 7) instead of
//! HelloAck: `uuid [16] | mode u8 (0 resume, 1 full copy, 2 compare) | durable_set u64 |
//! durable_seq u64 | reason (string) | check u32`, or a Refuse.
//!
//! Version 5 adds to Identify the primary's open resync (`journal::dirty::Fold`): flags bit 1,
//! then `resync_from u64` right after `journal_last`. A mirror with a staged resync finishes
//! it only for a primary that still has one (`identity::staged_resync_continues`); a version-3
//! or 4 primary never sends it and is compared instead.
//!
//! Version 6 adds roles that change (`repl::role`): a span may carry flags 5, a continuous
//! generation that starts where a mirror was promoted; **Pull** (type 11, secondary → peer,
//! first on a stream the secondary opened, when the secondary is the side that dials):
//! `version u16 | size u64 | has u8 (0/1) | gen u64 | seq u64 | volume (string) | check u32`
//! (gen, seq: the consistent state the secondary holds, when `has`); a primary answers with
//! Hello on the same stream and becomes the session's sending side, a secondary with Refuse
//! (13, no primary). A Hello that reaches a primary is refused (14, both primaries).
//!
//! During a comparison the primary sends **Sums** (type 8): `offset u64 | chunk u32 (> 0) |
//! count u16 (≤ 1024) | count × SHA-256 [32] | check u32`, in stream order with the sets; the
//! mirror answers **SumsReply** (type 9): `offset u64 | chunk u32 | count u16 | bitmap
//! (ceil(count / 8) bytes, most significant bit first, bits past count zero; 1 = differs) |
//! check u32`.
//!
//! A set whose newest write's time is known goes as **type 10**: the Set layout with
//! `newest_write_ms u64` (≠ 0, Unix milliseconds by the primary's clock) after `last_seq`. A
//! set without one goes as type 3, so sets of every version decode (the redo log keeps them).
//!
//! Version 7 adds **Takeover** (type 12, secondary → primary, before a Decision that
//! resumes): `count u32 (≤ 65536) | count × (offset u64, len u64 > 0; offset + len fits a
//! u64) | check u32`, the byte ranges where the secondary's volume holds writes of its own
//! that it gave up.
//!
//! Version 8 ([`SUMS_AFTER_SET_VERSION`]) makes checksums name their place in the stream: a
//! primary sends Sums as **type 13**, the type-8 layout with `after_set u64` in front: the
//! last set it sent in this session before them (the Decision's `durable_set` while it sent
//! none). The mirror compares it with the last set it took and refuses checksums that
//! overtook a set, or that a later set overtook (`BadMessage`: the session starts again),
//! instead of answering them against another state than the primary's. Type 8 still decodes
//! (`after_set` None), from older primaries.
//!
//! # Encoding choices
//!
//! - Data extents longer than [`MAX_CHUNK`] (1 MiB) are sent as consecutive ≤ 1 MiB extents,
//!   each with its own CRC ("CRC32 per block"); empty extents are not sent. The decoded set
//!   therefore equals the encoded one when its data extents are ≤ 1 MiB and none is empty, and
//!   is equivalent (same bytes written) otherwise.
//! - Compression, per chunk: if the chunk is longer than [`PROBE_LEN`] (4 KiB), its first 4 KiB
//!   are compressed first as a probe; if the probe does not shrink, the chunk goes raw without
//!   compressing the rest (incompressible data — encrypted, already compressed — costs one 4 KiB
//!   probe per MiB). Otherwise (or for chunks ≤ 4 KiB) the chunk is compressed and sent lz4 only
//!   if strictly smaller than raw. The probe can miss a chunk whose first 4 KiB are
//!   incompressible but whose rest compresses well: such a chunk goes raw (correct, just bigger).
//! - Strings longer than [`MAX_STRING`] bytes are cut at a char boundary on encode, so that
//!   every encoded message decodes.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::disk::fingerprint::Fingerprint;
use crate::extent::{Extent, Payload};
use crate::repl::identity::{GenId, Lineage, PrimaryClaim, Span, VolumeUuid, MAX_SPANS};

/// Version spoken by this code (Hello's `version`).
pub const PROTOCOL_VERSION: u16 = 8;
/// Oldest version whose messages still decode (a mirror's redo log may hold sets of versions
/// 1 to 3).
pub const OLDEST_PROTOCOL_VERSION: u16 = 1;
/// Oldest version a mirror holds a session with: volume identities (docs/IDENTITY.md) came
/// with 3. A version-3 primary never sends a Repair set (version 4) nor its open resync
/// (version 5), so it is served as is: a mirror can be upgraded before its primaries.
pub const OLDEST_SESSION_VERSION: u16 = 3;
/// The first version whose Identify says whether the primary has an open resync
/// (`PrimaryClaim::resync_from`).
pub const RESYNC_IN_IDENTIFY_VERSION: u16 = 5;
/// The first version whose lineages may hold a promoted mirror's generation (span flags 5).
pub const ROLES_VERSION: u16 = 6;
/// The first version with Takeover (a secondary that gave up data of its own names its
/// regions) and an Identify before a BothPrimary refusal.
pub const TAKEOVER_VERSION: u16 = 7;
/// The first version whose Sums name the last set sent before them (type 13), so a mirror
/// notices checksums out of stream order.
pub const SUMS_AFTER_SET_VERSION: u16 = 8;
/// Most ranges in one Takeover message (16 bytes each: 1 MiB).
pub const MAX_TAKEOVER_RANGES: usize = 65536;
/// Most checksums in one Sums message.
pub const MAX_SUMS: usize = 1024;
/// Bytes of one chunk checksum (SHA-256).
pub const SUM_LEN: usize = 32;
/// Largest accepted `body_len`; bigger frames are refused as malformed ([`FrameError::TooLarge`]).
pub const MAX_MESSAGE: u32 = 72 << 20;
/// Data extents are sent in pieces of at most this many bytes, each with its own CRC.
pub const MAX_CHUNK: u32 = 1 << 20;
/// Longest string (volume name, refuse reason) in bytes.
pub const MAX_STRING: usize = 4096;
/// Bytes of the compressibility probe (see the module doc).
pub const PROBE_LEN: usize = 4096;
/// `body_len` + `type`.
pub const PREFIX_LEN: usize = 5;

const CHECK_LEN: usize = 4;
const SET_HEADER_LEN: usize = 8 + 8 + 8 + 1 + 4;
/// A version-3 set's header: the version-1 fields with the newest write's time after
/// `last_seq`.
const SET3_HEADER_LEN: usize = SET_HEADER_LEN + 8;
const EXTENT_DESC_LEN: usize = 8 + 4 + 1 + 1 + 4 + 4;

const TYPE_HELLO: u8 = 1;
const TYPE_HELLO_ACK: u8 = 2;
const TYPE_SET: u8 = 3;
const TYPE_ACK: u8 = 4;
const TYPE_REFUSE: u8 = 5;
const TYPE_IDENTIFY: u8 = 6;
const TYPE_DECISION: u8 = 7;
const TYPE_SUMS: u8 = 8;
const TYPE_SUMS_REPLY: u8 = 9;
const TYPE_SET3: u8 = 10;
const TYPE_PULL: u8 = 11;
const TYPE_TAKEOVER: u8 = 12;
/// Sums with the set they follow (version 8).
const TYPE_SUMS_AFTER: u8 = 13;
/// The highest type byte in use.
const TYPE_LAST: u8 = TYPE_SUMS_AFTER;

const SET_JOURNAL: u8 = 0;
const SET_COPY: u8 = 1;
const SET_COPY_DONE: u8 = 2;
const SET_REPAIR: u8 = 3;

const EXT_DATA: u8 = 0;
const EXT_ZERO: u8 = 1;
const ENC_RAW: u8 = 0;
const ENC_LZ4: u8 = 1;
const ENC_RAW_ALIGNED: u8 = 2;

/// Raw data extents at least this long are sent aligned (encoding 2): at most
/// `DATA_ALIGN - 1` zero bytes, a tiny share of such an extent, buy a copy less at the mirror.
pub const ALIGN_MIN: usize = 64 << 10;
/// Aligned extents' data starts at a multiple of this in the frame: the memory alignment
/// direct I/O needs on nearly every block device (the mirror checks, and copies if not).
pub const DATA_ALIGN: usize = 512;

/// Zero bytes that bring frame offset `at` to the next multiple of [`DATA_ALIGN`].
fn pad_to_align(at: usize) -> usize {
    at.next_multiple_of(DATA_ALIGN) - at
}

/// How a raw piece of `len` bytes whose stored bytes start at frame offset `at` is sent:
/// (encoding, padding before the data).
fn raw_layout(len: usize, at: usize) -> (u8, usize) {
    if len >= ALIGN_MIN {
        (ENC_RAW_ALIGNED, pad_to_align(at))
    } else {
        (ENC_RAW, 0)
    }
}

/// What a delta set carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetKind {
    /// Folded journal writes `first_seq..=last_seq`.
    Journal,
    /// Part of the initial full copy; `done` on the last one.
    Copy { done: bool },
    /// Chunks an online verify found different at the mirror, as the primary's volume holds
    /// them at `last_seq` (every write up to it is in the sets before; none after it touches
    /// them yet): applied in place, they change no position (version 4).
    Repair,
}

/// One delta set: applied atomically at the mirror. No volume field: one stream = one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaSet {
    pub set: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// When the newest write of the set completed on the primary, in milliseconds since the
    /// Unix epoch by the primary's clock (0: not known). A set with a time goes as type 10.
    pub newest_write_ms: u64,
    pub kind: SetKind,
    /// Sorted by offset, non-overlapping (see the module doc).
    pub extents: Vec<Extent>,
}

impl DeltaSet {
    /// Checks the rules the decoder enforces on a set (sequence range, extent order and
    /// overlap, data size), so a sender can catch a set the mirror would refuse. Empty extents
    /// are ignored (they are not sent); data extents may be longer than [`MAX_CHUNK`] (they are
    /// split).
    pub fn validate(&self) -> Result<(), FrameError> {
        check_set_shape(
            self.kind == SetKind::Journal,
            self.first_seq,
            self.last_seq,
            self.extents.iter().filter(|e| !e.is_empty()).map(|e| {
                let is_data = matches!(e.payload, Payload::Data(_));
                (e.offset, e.len(), is_data)
            }),
        )
    }

    /// Body length of this set if nothing compresses and every aligned piece needs the most
    /// padding: an upper bound of the encoded body length. A shipper keeps it `<= MAX_MESSAGE` when cutting sets.
    pub fn max_body_len(&self) -> u64 {
        let desc = EXTENT_DESC_LEN as u64;
        let extents: u64 = self
            .extents
            .iter()
            .map(|e| match &e.payload {
                Payload::Zero(0) => 0,
                Payload::Zero(_) => desc,
                Payload::Data(b) => {
                    let len = b.len() as u64;
                    let chunk = u64::from(MAX_CHUNK);
                    // Pieces sent aligned may be preceded by padding.
                    let aligned = len / chunk + u64::from(len % chunk >= ALIGN_MIN as u64);
                    len.div_ceil(chunk) * desc + len + aligned * (DATA_ALIGN as u64 - 1)
                }
            })
            .sum();
        (SET3_HEADER_LEN + CHECK_LEN) as u64 + extents
    }

    /// The frame type this set is sent as.
    fn frame_type(&self) -> u8 {
        if self.newest_write_ms == 0 {
            TYPE_SET
        } else {
            TYPE_SET3
        }
    }
}

/// A message of the replication stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// primary → mirror, first on the stream.
    Hello {
        version: u16,
        volume: String,
        size: u64,
    },
    /// mirror → primary, answer to Hello.
    HelloAck {
        durable_set: u64,
        durable_seq: u64,
        needs_full_copy: bool,
    },
    /// primary → mirror.
    Set(DeltaSet),
    /// mirror → primary: set `set` (journal up to `last_seq`) is durable; sets up to
    /// `applied_set` are applied in place (reported in status; not validated against `set`).
    Ack {
        set: u64,
        last_seq: u64,
        applied_set: u64,
    },
    /// Either way, before closing.
    Refuse { code: u16, reason: String },
    /// primary → mirror, right after Hello (version 3): what the primary knows of its data.
    Identify(Box<PrimaryClaim>),
    /// mirror → primary, the answer to Hello + Identify (version 3; replaces HelloAck): the
    /// pair's UUID, how the session proceeds, and the mirror's durable set.
    Decision {
        uuid: VolumeUuid,
        mode: Mode,
        durable_set: u64,
        durable_seq: u64,
        reason: String,
    },
    /// primary → mirror during a comparison: SHA-256 of `sums.len()` chunks of `chunk` bytes
    /// from `offset` (the last may be short: the volume's end), as the primary read them.
    /// `after_set`: the last set the primary sent in this session before them (version 8;
    /// None from older primaries), which the mirror must have taken, and no later one.
    Sums {
        offset: u64,
        chunk: u32,
        after_set: Option<u64>,
        sums: Vec<[u8; SUM_LEN]>,
    },
    /// mirror → primary: which of those chunks differ at the mirror, after every set sent
    /// before the Sums was applied.
    SumsReply {
        offset: u64,
        chunk: u32,
        differ: Vec<bool>,
    },
    /// secondary → its peer, first on a stream the secondary opened (version 6): "ship volume
    /// `volume` to me on this stream" (the secondary is the side that dials). `holds`: the
    /// data it holds as a consistent state (generation, seq), if it is one: a secondary peer
    /// holding the same may be promoted without `--force`. A primary answers with Hello and
    /// the session goes on as usual; a secondary with Refuse (NoPrimary).
    Pull {
        version: u16,
        volume: String,
        size: u64,
        holds: Option<(GenId, u64)>,
    },
    /// mirror → primary, before its Decision (version 7): byte ranges `(offset, len)` where
    /// this side's volume holds writes of its own that the primary never had (a divergent
    /// tail it gave up, saved first: docs/FAILOVER.md). The primary resyncs them with its
    /// own changes since the common point, staged. Several messages when there are many.
    Takeover { regions: Vec<(u64, u64)> },
}

/// How a session proceeds after the decision on connect (`repl::identity::decide`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Ship the journal after `durable_seq`.
    Resume,
    /// Copy the whole volume, then the journal.
    FullCopy,
    /// Compare every chunk by checksum, send those that differ, then the journal.
    Compare,
}

/// Why a session was refused (`Refuse.code`), and whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseCode {
    /// The protocol version is not spoken here (permanent).
    Version = 1,
    /// The mirror has no volume by that name (permanent).
    UnknownVolume = 2,
    /// The volumes' sizes differ (permanent).
    SizeMismatch = 3,
    /// A set out of order or outside the volume: resend from the durable set.
    BadSet = 4,
    /// A message that could not be read, or not the one expected there (checksums out of
    /// stream order): resend from the durable set.
    BadMessage = 5,
    /// The mirror's volume failed (I/O error): retried until it works again.
    VolumeFailed = 6,
    /// The mirror's redo log failed (its file system full, an I/O error): retried.
    RedoFailed = 7,
    /// Another volume pair: another disk or another primary (permanent).
    Unrelated = 10,
    /// Both sides wrote since their last common state (permanent).
    SplitBrain = 11,
    /// The mirror is stopping: retry.
    Stopping = 12,
    /// Neither side is a primary (a switchover between its demotion and its promotion):
    /// retried until one is promoted.
    NoPrimary = 13,
    /// Both sides are primaries (permanent: no data flows until an admin demotes one).
    BothPrimary = 14,
}

impl RefuseCode {
    pub fn from_u16(code: u16) -> Option<RefuseCode> {
        use RefuseCode::*;
        Some(match code {
            1 => Version,
            2 => UnknownVolume,
            3 => SizeMismatch,
            4 => BadSet,
            5 => BadMessage,
            6 => VolumeFailed,
            7 => RedoFailed,
            10 => Unrelated,
            11 => SplitBrain,
            12 => Stopping,
            13 => NoPrimary,
            14 => BothPrimary,
            _ => return None,
        })
    }

    /// Retrying cannot help until an admin acts.
    pub fn permanent(self) -> bool {
        matches!(
            self,
            RefuseCode::Version
                | RefuseCode::UnknownVolume
                | RefuseCode::SizeMismatch
                | RefuseCode::Unrelated
                | RefuseCode::SplitBrain
                | RefuseCode::BothPrimary
        )
    }
}

/// Data bytes of an encoded message before and after compression (0 for messages without data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub raw_bytes: u64,
    pub wire_bytes: u64,
}

/// Why bytes were refused. After any error a [`Decoder`] is poisoned: the stream must be closed
/// (Refuse) and the primary re-sends from the mirror's `HelloAck.durable_set` on a new one.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("message body of {0} bytes exceeds the limit of {MAX_MESSAGE} bytes")]
    TooLarge(u32),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("message check (CRC32 of its header fields) does not match")]
    BadChecksum,
    #[error("CRC32 mismatch in the extent at volume offset {offset}")]
    BadCrc { offset: u64 },
    #[error("lz4 data of the extent at volume offset {offset} does not decompress to its length")]
    Decompress { offset: u64 },
}

/// Appends `msg`, framed, to `out` (existing content is kept).
///
/// The message must be valid for the decoder to accept it: a set must pass
/// [`DeltaSet::validate`] and its encoded body must not exceed [`MAX_MESSAGE`] (bounded by
/// [`DeltaSet::max_body_len`]); both are `debug_assert`ed.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> EncodeStats {
    encode_opts(msg, out, true)
}

/// [`encode`], choosing whether data may be lz4-compressed. Off when the link is faster than
/// lz4 (a local or 10 Gbit/s mirror): compressing would then cost throughput, not save it.
pub fn encode_opts(msg: &Message, out: &mut Vec<u8>, compress: bool) -> EncodeStats {
    encode_with_crcs(msg, out, compress, &KnownCrcs::default())
}

/// [`encode_opts`], where pieces of a set's data found in `known` are not hashed again.
pub fn encode_with_crcs(
    msg: &Message,
    out: &mut Vec<u8>,
    compress: bool,
    known: &KnownCrcs,
) -> EncodeStats {
    let start = out.len();
    out.extend_from_slice(&[0; PREFIX_LEN]);
    let ty = match msg {
        Message::Hello { .. } => TYPE_HELLO,
        Message::HelloAck { .. } => TYPE_HELLO_ACK,
        Message::Set(s) => s.frame_type(),
        Message::Ack { .. } => TYPE_ACK,
        Message::Refuse { .. } => TYPE_REFUSE,
        Message::Identify(_) => TYPE_IDENTIFY,
        Message::Decision { .. } => TYPE_DECISION,
        Message::Sums {
            after_set: None, ..
        } => TYPE_SUMS,
        Message::Sums {
            after_set: Some(_), ..
        } => TYPE_SUMS_AFTER,
        Message::SumsReply { .. } => TYPE_SUMS_REPLY,
        Message::Pull { .. } => TYPE_PULL,
        Message::Takeover { .. } => TYPE_TAKEOVER,
    };
    let mut check = crc32fast::Hasher::new();
    check.update(&[ty]);
    let mut stats = EncodeStats::default();
    let body = out.len();
    match msg {
        Message::Hello {
            version,
            volume,
            size,
        } => {
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            put_str(out, volume);
        }
        Message::HelloAck {
            durable_set,
            durable_seq,
            needs_full_copy,
        } => {
            out.extend_from_slice(&durable_set.to_be_bytes());
            out.extend_from_slice(&durable_seq.to_be_bytes());
            out.push(u8::from(*needs_full_copy));
        }
        Message::Set(set) => {
            debug_assert_eq!(set.validate(), Ok(()), "encoding an invalid delta set");
            encode_set(set, out, start, &mut check, &mut stats, compress, known);
        }
        Message::Ack {
            set,
            last_seq,
            applied_set,
        } => {
            out.extend_from_slice(&set.to_be_bytes());
            out.extend_from_slice(&last_seq.to_be_bytes());
            out.extend_from_slice(&applied_set.to_be_bytes());
        }
        Message::Refuse { code, reason } => {
            out.extend_from_slice(&code.to_be_bytes());
            put_str(out, reason);
        }
        Message::Identify(c) => put_identify(c, out),
        Message::Decision {
            uuid,
            mode,
            durable_set,
            durable_seq,
            reason,
        } => {
            out.extend_from_slice(&uuid.0);
            out.push(match mode {
                Mode::Resume => 0,
                Mode::FullCopy => 1,
                Mode::Compare => 2,
            });
            out.extend_from_slice(&durable_set.to_be_bytes());
            out.extend_from_slice(&durable_seq.to_be_bytes());
            put_str(out, reason);
        }
        Message::Sums {
            offset,
            chunk,
            after_set,
            sums,
        } => {
            debug_assert!(sums.len() <= MAX_SUMS);
            if let Some(a) = after_set {
                out.extend_from_slice(&a.to_be_bytes());
            }
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&chunk.to_be_bytes());
            out.extend_from_slice(&(sums.len() as u16).to_be_bytes());
            for sum in sums {
                out.extend_from_slice(sum);
            }
        }
        Message::SumsReply {
            offset,
            chunk,
            differ,
        } => {
            debug_assert!(differ.len() <= MAX_SUMS);
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&chunk.to_be_bytes());
            out.extend_from_slice(&(differ.len() as u16).to_be_bytes());
            let mut bits = vec![0u8; differ.len().div_ceil(8)];
            for (i, d) in differ.iter().enumerate() {
                if *d {
                    bits[i / 8] |= 0x80 >> (i % 8);
                }
            }
            out.extend_from_slice(&bits);
        }
        Message::Pull {
            version,
            volume,
            size,
            holds,
        } => {
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            out.push(u8::from(holds.is_some()));
            let (gen, seq) = holds.unwrap_or((GenId(0), 0));
            out.extend_from_slice(&gen.0.to_be_bytes());
            out.extend_from_slice(&seq.to_be_bytes());
            put_str(out, volume);
        }
        Message::Takeover { regions } => {
            debug_assert!(regions.len() <= MAX_TAKEOVER_RANGES);
            out.extend_from_slice(&(regions.len() as u32).to_be_bytes());
            for &(offset, len) in regions {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
    }
    if !matches!(msg, Message::Set(_)) {
        check.update(&out[body..]);
    }
    out.extend_from_slice(&check.finalize().to_be_bytes());
    let body_len = out.len() - body;
    debug_assert!(
        body_len <= MAX_MESSAGE as usize,
        "encoded body of {body_len} bytes exceeds MAX_MESSAGE"
    );
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_be_bytes());
    out[start + 4] = ty;
    stats
}

/// Identify's body: flags (bit 0: a UUID follows; bit 1: an open resync), UUID,
/// forgotten_below, span count, spans (gen, first_seq, continuous), journal_acked,
/// journal_last, the open resync's `resync_from` (bit 1), the fingerprint as JSON text.
fn put_identify(c: &PrimaryClaim, out: &mut Vec<u8>) {
    out.push(u8::from(c.uuid.is_some()) | (u8::from(c.resync_from.is_some()) << 1));
    out.extend_from_slice(&c.uuid.map_or([0; 16], |u| u.0));
    out.extend_from_slice(&c.lineage.forgotten_below.to_be_bytes());
    let spans = &c.lineage.spans[c.lineage.spans.len().saturating_sub(MAX_SPANS)..];
    out.extend_from_slice(&(spans.len() as u16).to_be_bytes());
    for s in spans {
        out.extend_from_slice(&s.gen.0.to_be_bytes());
        out.extend_from_slice(&s.first_seq.to_be_bytes());
        out.push(
            u8::from(s.continuous) | (u8::from(s.accepted) << 1) | (u8::from(s.promoted) << 2),
        );
    }
    out.extend_from_slice(&c.journal_acked.to_be_bytes());
    out.extend_from_slice(&c.journal_last.to_be_bytes());
    if let Some(covers) = c.resync_from {
        out.extend_from_slice(&covers.to_be_bytes());
    }
    put_str(
        out,
        &serde_json::to_string(&c.fingerprint).expect("a fingerprint serialises"),
    );
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(MAX_STRING);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

#[allow(clippy::too_many_arguments)]
fn put_desc(out: &mut Vec<u8>, offset: u64, len: u32, kind: u8, enc: u8, crc: u32, stored: u32) {
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind);
    out.push(enc);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&stored.to_be_bytes());
}

/// Pieces a set is sent as: one per zero extent, one per ≤ MAX_CHUNK of data.
fn piece_count(s: &DeltaSet) -> u64 {
    let chunk = MAX_CHUNK as usize;
    s.extents
        .iter()
        .map(|e| match &e.payload {
            Payload::Zero(0) => 0,
            Payload::Zero(_) => 1,
            Payload::Data(b) => b.len().div_ceil(chunk) as u64,
        })
        .sum()
}

fn put_set_header(s: &DeltaSet, out: &mut Vec<u8>, check: &mut crc32fast::Hasher) {
    let header = out.len();
    out.extend_from_slice(&s.set.to_be_bytes());
    out.extend_from_slice(&s.first_seq.to_be_bytes());
    out.extend_from_slice(&s.last_seq.to_be_bytes());
    if s.frame_type() == TYPE_SET3 {
        out.extend_from_slice(&s.newest_write_ms.to_be_bytes());
    }
    out.push(match s.kind {
        SetKind::Journal => SET_JOURNAL,
        SetKind::Copy { done: false } => SET_COPY,
        SetKind::Copy { done: true } => SET_COPY_DONE,
        SetKind::Repair => SET_REPAIR,
    });
    // More than u32::MAX extents cannot fit in MAX_MESSAGE anyway (debug_assert in encode).
    out.extend_from_slice(&(piece_count(s) as u32).to_be_bytes());
    check.update(&out[header..]);
}

fn encode_set(
    s: &DeltaSet,
    out: &mut Vec<u8>,
    frame_start: usize,
    check: &mut crc32fast::Hasher,
    stats: &mut EncodeStats,
    compress: bool,
    known: &KnownCrcs,
) {
    let chunk = MAX_CHUNK as usize;
    put_set_header(s, out, check);

    for ext in &s.extents {
        match &ext.payload {
            Payload::Zero(0) => {}
            Payload::Zero(len) => {
                let desc = out.len();
                put_desc(out, ext.offset, *len, EXT_ZERO, ENC_RAW, 0, 0);
                check.update(&out[desc..]);
            }
            Payload::Data(bytes) => {
                for (i, piece) in bytes.chunks(chunk).enumerate() {
                    let offset = ext.offset.wrapping_add((i * chunk) as u64);
                    let desc = out.len();
                    let crc = known.crc(piece);
                    put_desc(out, offset, piece.len() as u32, EXT_DATA, ENC_RAW, crc, 0);
                    let (enc, stored) = if compress {
                        put_stored(piece, out, frame_start)
                    } else {
                        put_raw(piece, out, frame_start)
                    };
                    out[desc + 13] = enc;
                    out[desc + 18..desc + 22].copy_from_slice(&(stored as u32).to_be_bytes());
                    check.update(&out[desc..desc + EXTENT_DESC_LEN]);
                    stats.raw_bytes += piece.len() as u64;
                    stats.wire_bytes += stored as u64;
                }
            }
        }
    }
}

/// CRC32s already computed for data buffers, by where the buffer is and how long. The journal
/// hashes every write once when it records it; a piece that is exactly such a record's data
/// (an NBD write of up to [`MAX_CHUNK`] that no later write in its set overwrote) reuses that
/// CRC instead of hashing the bytes again (a pass over every byte the primary sends). The CRC
/// covers the raw piece, so compressed and raw encodings use it alike. The
/// caller fills it from buffers that were all alive at the same time and are immutable
/// (`Bytes`), so no two entries describe the same memory, and a piece of a set built from
/// them matches an entry only if it is that very buffer.
#[derive(Debug, Default)]
pub struct KnownCrcs(std::collections::HashMap<(usize, usize), u32>);

impl KnownCrcs {
    pub fn insert(&mut self, data: &[u8], crc: u32) {
        self.0.insert((data.as_ptr() as usize, data.len()), crc);
    }

    /// The CRC of `data`: the known one if `data` is a buffer given to `insert`.
    fn crc(&self, data: &[u8]) -> u32 {
        match self.0.get(&(data.as_ptr() as usize, data.len())) {
            Some(&crc) => {
                debug_assert_eq!(crc, crc32fast::hash(data), "a known CRC is wrong");
                crc
            }
            None => crc32fast::hash(data),
        }
    }
}

/// A set message exactly as `encode_opts(.., compress = false)` writes it, as chunks for
/// quinn's `write_chunks`: data goes out as slices of the set's own buffers, not copied.
/// Pieces found in `known` are not hashed again.
pub fn encode_set_chunks(s: &DeltaSet, known: &KnownCrcs) -> (Vec<Bytes>, EncodeStats) {
    debug_assert_eq!(s.validate(), Ok(()), "encoding an invalid delta set");
    let chunk = MAX_CHUNK as usize;
    let mut check = crc32fast::Hasher::new();
    check.update(&[s.frame_type()]);
    let mut stats = EncodeStats::default();
    // Slot 0 is the prefix, written last: it holds the body length.
    let mut chunks = vec![Bytes::new()];
    let mut body_len = 0usize;
    let mut cur = Vec::with_capacity(64);
    put_set_header(s, &mut cur, &mut check);
    for ext in &s.extents {
        match &ext.payload {
            Payload::Zero(0) => {}
            Payload::Zero(len) => {
                let desc = cur.len();
                put_desc(&mut cur, ext.offset, *len, EXT_ZERO, ENC_RAW, 0, 0);
                check.update(&cur[desc..]);
            }
            Payload::Data(bytes) => {
                for start in (0..bytes.len()).step_by(chunk) {
                    let piece = bytes.slice(start..(start + chunk).min(bytes.len()));
                    let offset = ext.offset.wrapping_add(start as u64);
                    let desc = cur.len();
                    let len = piece.len() as u32;
                    let (enc, pad) =
                        raw_layout(piece.len(), PREFIX_LEN + body_len + desc + EXTENT_DESC_LEN);
                    put_desc(
                        &mut cur,
                        offset,
                        len,
                        EXT_DATA,
                        enc,
                        known.crc(&piece),
                        len + pad as u32,
                    );
                    check.update(&cur[desc..]);
                    cur.resize(cur.len() + pad, 0);
                    body_len += cur.len() + piece.len();
                    chunks.push(Bytes::from(std::mem::replace(
                        &mut cur,
                        Vec::with_capacity(64),
                    )));
                    chunks.push(piece);
                    stats.raw_bytes += len as u64;
                    stats.wire_bytes += (len as usize + pad) as u64;
                }
            }
        }
    }
    cur.extend_from_slice(&check.finalize().to_be_bytes());
    body_len += cur.len();
    chunks.push(Bytes::from(cur));
    debug_assert!(body_len <= MAX_MESSAGE as usize);
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[..4].copy_from_slice(&(body_len as u32).to_be_bytes());
    prefix[4] = s.frame_type();
    chunks[0] = Bytes::copy_from_slice(&prefix);
    (chunks, stats)
}

/// Appends `data` raw: aligned in the frame starting at `out[frame_start]` when it is at
/// least [`ALIGN_MIN`] long; returns (encoding, stored length).
fn put_raw(data: &[u8], out: &mut Vec<u8>, frame_start: usize) -> (u8, usize) {
    let (enc, pad) = raw_layout(data.len(), out.len() - frame_start);
    out.resize(out.len() + pad, 0);
    out.extend_from_slice(data);
    (enc, pad + data.len())
}

/// Appends `data` raw or lz4-compressed (see the module doc); returns (encoding, stored length).
fn put_stored(data: &[u8], out: &mut Vec<u8>, frame_start: usize) -> (u8, usize) {
    let pos = out.len();
    if data.len() > PROBE_LEN {
        let probe = &data[..PROBE_LEN];
        let shrinks = matches!(compress_at(probe, out, pos), Some(n) if n < probe.len());
        out.truncate(pos);
        if !shrinks {
            return put_raw(data, out, frame_start);
        }
    }
    match compress_at(data, out, pos) {
        Some(n) if n < data.len() => {
            out.truncate(pos + n);
            (ENC_LZ4, n)
        }
        _ => {
            out.truncate(pos);
            put_raw(data, out, frame_start)
        }
    }
}

/// Compresses `data` into `out[pos..]` (growing `out` as needed); returns the compressed length.
fn compress_at(data: &[u8], out: &mut Vec<u8>, pos: usize) -> Option<usize> {
    out.resize(
        pos + lz4_flex::block::get_maximum_output_size(data.len()),
        0,
    );
    lz4_flex::block::compress_into(data, &mut out[pos..]).ok()
}

/// Accumulates stream bytes and returns verified messages.
///
/// Feed what the stream delivers and call [`Decoder::next`] until it returns `Ok(None)` before
/// feeding more: the decoder then holds at most one frame (≤ `PREFIX_LEN + MAX_MESSAGE` bytes)
/// plus one read. Raw data extents of returned sets share the frame's buffer (no copy).
///
/// After an error the decoder is poisoned: it drops its buffer, ignores further input and
/// returns the same error from every `next` (a stream whose framing may be lost cannot be
/// trusted again; see [`FrameError`]).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
    failed: Option<FrameError>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends stream bytes (ignored once the decoder failed).
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// `Ok(None)` = need more bytes. Every extent is decompressed and its CRC verified before a
    /// Set is returned. `TooLarge` / `UnknownType` are reported as soon as the 5-byte prefix is
    /// in, without waiting for the body.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Message>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let res = match frame_len(&self.buf) {
            Ok(Some(total)) if total <= self.buf.len() => {
                let frame = self.buf.split_to(total).freeze();
                parse_frame(&frame, Some(&frame)).map(Some)
            }
            Ok(_) => return Ok(None),
            Err(e) => Err(e),
        };
        if let Err(e) = &res {
            self.failed = Some(e.clone());
            self.buf = BytesMut::new();
        }
        res
    }

    /// Bytes fed but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The error that poisoned this decoder, if any.
    pub fn failed(&self) -> Option<&FrameError> {
        self.failed.as_ref()
    }
}

/// Decodes exactly one complete message from the start of `buf` (used by the redo log reader).
/// Returns the message and the bytes it used, `Ok(None)` if `buf` holds only part of a message
/// (e.g. a torn log tail), or the error. Same verification as [`Decoder::next`].
pub fn decode_one(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    match frame_len(buf)? {
        Some(total) if total <= buf.len() => Ok(Some((parse_frame(&buf[..total], None)?, total))),
        _ => Ok(None),
    }
}

/// Decodes one complete message that is all of `frame` (as [`read_message`] reads it). Data
/// extents stored raw are slices of `frame`, not copies.
///
/// [`read_message`]: super::stream::read_message
pub fn decode_frame(frame: &Bytes) -> Result<Message, FrameError> {
    match frame_len(frame)? {
        Some(total) if total == frame.len() => parse_frame(frame, Some(frame)),
        _ => Err(FrameError::Malformed(
            "message length disagrees with its body",
        )),
    }
}

#[cfg(any(test, feature = "test-hooks"))]
/// Test-only fault hook: flips (bitwise NOT) the last stored byte of the first data extent of an
/// encoded Set message, so that the CRC check must catch it (for lz4 extents the last byte is a
/// literal, so the block still decompresses — to wrong data). Returns false if `encoded` does not
/// start with a complete Set holding a data byte.
pub fn corrupt_first_data_byte(encoded: &mut [u8]) -> bool {
    let Some(at) = first_data_byte(encoded) else {
        return false;
    };
    encoded[at] = !encoded[at];
    true
}

#[cfg(any(test, feature = "test-hooks"))]
fn first_data_byte(encoded: &[u8]) -> Option<usize> {
    let total = frame_len(encoded).ok()??;
    let header_len = match *encoded.get(4)? {
        TYPE_SET => SET_HEADER_LEN,
        TYPE_SET3 => SET3_HEADER_LEN,
        _ => return None,
    };
    if total > encoded.len() {
        return None;
    }
    let content = encoded.get(PREFIX_LEN..total.checked_sub(CHECK_LEN)?)?;
    let mut r = Reader::new(content);
    let header = r.take(header_len).ok()?;
    let count = u32::from_be_bytes(header[header_len - 4..].try_into().ok()?);
    for _ in 0..count {
        let desc = r.take(EXTENT_DESC_LEN).ok()?;
        let stored_len = u32::from_be_bytes(desc[18..22].try_into().ok()?) as usize;
        let stored = r.pos..r.pos.checked_add(stored_len)?;
        r.take(stored_len).ok()?;
        if desc[12] == EXT_DATA && stored_len > 0 {
            return Some(PREFIX_LEN + stored.end - 1);
        }
    }
    None
}

/// Total frame length (prefix + body) once the prefix is in; errors found in the prefix.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let body_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    if body_len > MAX_MESSAGE {
        return Err(FrameError::TooLarge(body_len));
    }
    let Some(&ty) = buf.get(4) else {
        return Ok(None);
    };
    if !(TYPE_HELLO..=TYPE_LAST).contains(&ty) {
        return Err(FrameError::UnknownType(ty));
    }
    Ok(Some(PREFIX_LEN + body_len as usize))
}

/// Bounds-checked big-endian reader over a body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if n > self.remaining() {
            return Err(FrameError::Malformed("field runs past the end of the body"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, FrameError> {
        let len = usize::from(self.u16()?);
        if len > MAX_STRING {
            return Err(FrameError::Malformed("string longer than 4096 bytes"));
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| FrameError::Malformed("string is not UTF-8"))
    }

    fn finish(&self) -> Result<(), FrameError> {
        if self.remaining() != 0 {
            return Err(FrameError::Malformed("trailing bytes in body"));
        }
        Ok(())
    }
}

/// Parses and verifies one whole frame (prefix included, length already checked by
/// `frame_len`). `owner`, if given, holds the same bytes as `frame`: raw data is sliced from it.
fn parse_frame(frame: &[u8], owner: Option<&Bytes>) -> Result<Message, FrameError> {
    let ty = *frame
        .get(4)
        .ok_or(FrameError::Malformed("frame shorter than its prefix"))?;
    let body = &frame[PREFIX_LEN..];
    let Some(content_len) = body.len().checked_sub(CHECK_LEN) else {
        return Err(FrameError::Malformed("body shorter than its check"));
    };
    let (content, tail) = body.split_at(content_len);
    let expected = u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let mut check = crc32fast::Hasher::new();
    check.update(&[ty]);
    if ty == TYPE_SET || ty == TYPE_SET3 {
        return parse_set(content, expected, check, owner, ty == TYPE_SET3).map(Message::Set);
    }
    check.update(content);
    if check.finalize() != expected {
        return Err(FrameError::BadChecksum);
    }
    let mut r = Reader::new(content);
    let msg = match ty {
        TYPE_HELLO => {
            let version = r.u16()?;
            let size = r.u64()?;
            let volume = r.string()?;
            Message::Hello {
                version,
                volume,
                size,
            }
        }
        TYPE_HELLO_ACK => Message::HelloAck {
            durable_set: r.u64()?,
            durable_seq: r.u64()?,
            needs_full_copy: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(FrameError::Malformed("needs_full_copy is neither 0 nor 1")),
            },
        },
        TYPE_ACK => Message::Ack {
            set: r.u64()?,
            last_seq: r.u64()?,
            applied_set: r.u64()?,
        },
        TYPE_REFUSE => {
            let code = r.u16()?;
            let reason = r.string()?;
            Message::Refuse { code, reason }
        }
        TYPE_IDENTIFY => Message::Identify(Box::new(parse_identify(&mut r)?)),
        TYPE_DECISION => Message::Decision {
            uuid: VolumeUuid(r.array()?),
            mode: match r.u8()? {
                0 => Mode::Resume,
                1 => Mode::FullCopy,
                2 => Mode::Compare,
                _ => return Err(FrameError::Malformed("unknown decision mode")),
            },
            durable_set: r.u64()?,
            durable_seq: r.u64()?,
            reason: r.string()?,
        },
        TYPE_SUMS | TYPE_SUMS_AFTER => {
            let after_set = if ty == TYPE_SUMS_AFTER {
                Some(r.u64()?)
            } else {
                None
            };
            let offset = r.u64()?;
            let chunk = r.u32()?;
            let n = usize::from(r.u16()?);
            if n > MAX_SUMS || chunk == 0 {
                return Err(FrameError::Malformed("sums: no chunk or too many"));
            }
            let mut sums = Vec::with_capacity(n);
            for _ in 0..n {
                sums.push(r.array()?);
            }
            Message::Sums {
                offset,
                chunk,
                after_set,
                sums,
            }
        }
        TYPE_SUMS_REPLY => {
            let offset = r.u64()?;
            let chunk = r.u32()?;
            let n = usize::from(r.u16()?);
            if n > MAX_SUMS || chunk == 0 {
                return Err(FrameError::Malformed("sums reply: no chunk or too many"));
            }
            let bits = r.take(n.div_ceil(8))?;
            let differ: Vec<bool> = (0..n)
                .map(|i| bits[i / 8] & (0x80 >> (i % 8)) != 0)
                .collect();
            if n % 8 != 0 && bits[n / 8] & (0xff >> (n % 8)) != 0 {
                return Err(FrameError::Malformed("sums reply: bits past the count"));
            }
            Message::SumsReply {
                offset,
                chunk,
                differ,
            }
        }
        TYPE_PULL => {
            let version = r.u16()?;
            let size = r.u64()?;
            let has = r.u8()?;
            let (gen, seq) = (r.u64()?, r.u64()?);
            let holds = match has {
                0 => None,
                1 if gen != 0 => Some((GenId(gen), seq)),
                _ => return Err(FrameError::Malformed("pull: bad position")),
            };
            let volume = r.string()?;
            Message::Pull {
                version,
                volume,
                size,
                holds,
            }
        }
        TYPE_TAKEOVER => {
            let n = r.u32()? as usize;
            if n > MAX_TAKEOVER_RANGES {
                return Err(FrameError::Malformed("takeover: too many ranges"));
            }
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                let (offset, len) = (r.u64()?, r.u64()?);
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err(FrameError::Malformed("takeover: bad range"));
                }
                regions.push((offset, len));
            }
            Message::Takeover { regions }
        }
        other => return Err(FrameError::UnknownType(other)),
    };
    r.finish()?;
    Ok(msg)
}

fn parse_identify(r: &mut Reader<'_>) -> Result<PrimaryClaim, FrameError> {
    let flags = r.u8()?;
    if flags > 3 {
        return Err(FrameError::Malformed("identify: unknown flags"));
    }
    let uuid: [u8; 16] = r.array()?;
    let forgotten_below = r.u64()?;
    let n = usize::from(r.u16()?);
    if n > MAX_SPANS {
        return Err(FrameError::Malformed("identify: too many generations"));
    }
    let mut spans: Vec<Span> = Vec::with_capacity(n);
    for _ in 0..n {
        let span = Span {
            gen: GenId(r.u64()?),
            first_seq: r.u64()?,
            continuous: false,
            accepted: false,
            promoted: false,
        };
        let span = match r.u8()? {
            0 => span,
            1 => Span {
                continuous: true,
                ..span
            },
            2 => Span {
                accepted: true,
                ..span
            },
            5 => Span {
                continuous: true,
                promoted: true,
                ..span
            },
            _ => return Err(FrameError::Malformed("identify: unknown span flags")),
        };
        // Only a generation starting with a break may start lower (a crash lost records).
        if span.gen.0 == 0
            || (span.continuous && spans.last().is_some_and(|p| p.first_seq > span.first_seq))
        {
            return Err(FrameError::Malformed("identify: generations out of order"));
        }
        spans.push(span);
    }
    let journal_acked = r.u64()?;
    let journal_last = r.u64()?;
    if journal_acked > journal_last {
        return Err(FrameError::Malformed(
            "identify: acknowledged past the journal's end",
        ));
    }
    let resync_from = if flags & 2 != 0 { Some(r.u64()?) } else { None };
    let fingerprint: Fingerprint = serde_json::from_str(&r.string()?)
        .map_err(|_| FrameError::Malformed("identify: unreadable disk fingerprint"))?;
    Ok(PrimaryClaim {
        uuid: (flags & 1 != 0).then_some(VolumeUuid(uuid)),
        lineage: Lineage {
            spans,
            forgotten_below,
        },
        journal_acked,
        journal_last,
        fingerprint,
        resync_from,
    })
}

/// An extent descriptor as read, before its data is verified.
struct RawExtent {
    offset: u64,
    len: u32,
    kind: u8,
    encoding: u8,
    crc: u32,
    /// Range of the stored bytes in the body.
    stored: Range<usize>,
}

fn parse_set(
    content: &[u8],
    expected: u32,
    mut check: crc32fast::Hasher,
    owner: Option<&Bytes>,
    timed: bool,
) -> Result<DeltaSet, FrameError> {
    // Structure: walk the descriptors, hashing everything but the stored bytes.
    let mut r = Reader::new(content);
    let header = r.take(if timed {
        SET3_HEADER_LEN
    } else {
        SET_HEADER_LEN
    })?;
    check.update(header);
    let mut h = Reader::new(header);
    let (set, first_seq, last_seq) = (h.u64()?, h.u64()?, h.u64()?);
    let newest_write_ms = if timed { h.u64()? } else { 0 };
    if timed && newest_write_ms == 0 {
        return Err(FrameError::Malformed("a timed set without a time"));
    }
    let (kind, count) = (h.u8()?, h.u32()?);
    let count = count as usize;
    if count > r.remaining() / EXTENT_DESC_LEN {
        return Err(FrameError::Malformed(
            "extent count does not fit in the body",
        ));
    }
    let mut raws = Vec::with_capacity(count);
    for _ in 0..count {
        let desc = r.take(EXTENT_DESC_LEN)?;
        check.update(desc);
        let mut d = Reader::new(desc);
        let (offset, len, kind, encoding, crc, stored_len) =
            (d.u64()?, d.u32()?, d.u8()?, d.u8()?, d.u32()?, d.u32()?);
        let start = r.pos;
        r.take(stored_len as usize)?;
        raws.push(RawExtent {
            offset,
            len,
            kind,
            encoding,
            crc,
            stored: start..r.pos,
        });
    }
    r.finish()?;
    if check.finalize() != expected {
        return Err(FrameError::BadChecksum);
    }

    // Field rules, all before any data work.
    let kind = match kind {
        SET_JOURNAL => SetKind::Journal,
        SET_COPY => SetKind::Copy { done: false },
        SET_COPY_DONE => SetKind::Copy { done: true },
        SET_REPAIR => SetKind::Repair,
        _ => return Err(FrameError::Malformed("unknown set kind")),
    };
    for e in &raws {
        let stored_len = e.stored.len();
        if e.len == 0 {
            return Err(FrameError::Malformed("empty extent"));
        }
        match (e.kind, e.encoding) {
            (EXT_ZERO, _) => {
                if e.encoding != ENC_RAW || e.crc != 0 || stored_len != 0 {
                    return Err(FrameError::Malformed(
                        "zero extent with an encoding, a crc or stored bytes",
                    ));
                }
            }
            (EXT_DATA, _) if e.len > MAX_CHUNK => {
                return Err(FrameError::Malformed("data extent longer than MAX_CHUNK"));
            }
            (EXT_DATA, ENC_RAW) => {
                if stored_len != e.len as usize {
                    return Err(FrameError::Malformed("raw extent with stored_len != len"));
                }
            }
            (EXT_DATA, ENC_RAW_ALIGNED) => {
                let pad = pad_to_align(PREFIX_LEN + e.stored.start);
                if stored_len != pad + e.len as usize {
                    return Err(FrameError::Malformed(
                        "aligned extent whose data does not start at the next boundary",
                    ));
                }
                if content[e.stored.start..e.stored.start + pad]
                    .iter()
                    .any(|&b| b != 0)
                {
                    return Err(FrameError::Malformed(
                        "aligned extent with non-zero padding",
                    ));
                }
            }
            (EXT_DATA, ENC_LZ4) => {
                if stored_len == 0 || stored_len >= e.len as usize {
                    return Err(FrameError::Malformed(
                        "lz4 extent with stored_len not in 1..len",
                    ));
                }
            }
            (EXT_DATA, _) => return Err(FrameError::Malformed("unknown extent encoding")),
            _ => return Err(FrameError::Malformed("unknown extent kind")),
        }
    }
    check_set_shape(
        kind == SetKind::Journal,
        first_seq,
        last_seq,
        raws.iter()
            .map(|e| (e.offset, u64::from(e.len), e.kind == EXT_DATA)),
    )?;

    // Data: decompress and verify every CRC.
    let mut extents = Vec::with_capacity(raws.len());
    for e in raws {
        let stored = &content[e.stored.clone()];
        let bad_crc = FrameError::BadCrc { offset: e.offset };
        let payload = match (e.kind, e.encoding) {
            (EXT_ZERO, _) => Payload::Zero(e.len),
            (_, ENC_RAW | ENC_RAW_ALIGNED) => {
                // Checked above: an aligned extent's padding is what its data follows.
                let skip = stored.len() - e.len as usize;
                let (stored, start) = (&stored[skip..], e.stored.start + skip);
                if crc32fast::hash(stored) != e.crc {
                    return Err(bad_crc);
                }
                Payload::Data(match owner {
                    Some(frame) => frame.slice(PREFIX_LEN + start..PREFIX_LEN + e.stored.end),
                    None => Bytes::copy_from_slice(stored),
                })
            }
            _ => {
                let mut data = vec![0; e.len as usize];
                match lz4_flex::block::decompress_into(stored, &mut data) {
                    Ok(n) if n == data.len() => {}
                    _ => return Err(FrameError::Decompress { offset: e.offset }),
                }
                if crc32fast::hash(&data) != e.crc {
                    return Err(bad_crc);
                }
                Payload::Data(Bytes::from(data))
            }
        };
        extents.push(Extent {
            offset: e.offset,
            payload,
        });
    }
    Ok(DeltaSet {
        set,
        first_seq,
        last_seq,
        newest_write_ms,
        kind,
        extents,
    })
}

/// Set rules shared by the decoder and [`DeltaSet::validate`]; `extents` yields
/// `(offset, len, is_data)` of the non-empty extents in order.
fn check_set_shape(
    journal: bool,
    first_seq: u64,
    last_seq: u64,
    extents: impl Iterator<Item = (u64, u64, bool)>,
) -> Result<(), FrameError> {
    let empty_range = if first_seq <= last_seq {
        false
    } else if last_seq.checked_add(1) == Some(first_seq) {
        true
    } else {
        return Err(FrameError::Malformed("first_seq > last_seq + 1"));
    };
    let mut prev_end: Option<u64> = None;
    let mut data = 0u64;
    let mut count = 0usize;
    for (offset, len, is_data) in extents {
        count += 1;
        let end = offset
            .checked_add(len)
            .ok_or(FrameError::Malformed("extent end overflows u64"))?;
        if prev_end.is_some_and(|p| offset < p) {
            return Err(FrameError::Malformed("extents overlap or are out of order"));
        }
        prev_end = Some(end);
        if is_data {
            data = data.saturating_add(len);
            if data > u64::from(MAX_MESSAGE) {
                return Err(FrameError::Malformed("set data exceeds MAX_MESSAGE"));
            }
        }
    }
    if journal && empty_range && count > 0 {
        return Err(FrameError::Malformed(
            "journal set with an empty sequence range carries extents",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn enc(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out);
        out
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn text(n: usize) -> Vec<u8> {
        b"blkmirror ships delta sets from Monaco to Luxembourg; "
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect()
    }

    fn data(offset: u64, bytes: Vec<u8>) -> Extent {
        Extent {
            offset,
            payload: Payload::Data(Bytes::from(bytes)),
        }
    }

    fn zero(offset: u64, len: u32) -> Extent {
        Extent {
            offset,
            payload: Payload::Zero(len),
        }
    }

    fn journal(extents: Vec<Extent>) -> Message {
        Message::Set(DeltaSet {
            set: 7,
            first_seq: 10,
            last_seq: 12,
            newest_write_ms: 0,
            kind: SetKind::Journal,
            extents,
        })
    }

    fn tiny_set() -> Message {
        journal(vec![data(4096, b"abcd".to_vec()), zero(8192, 512)])
    }

    /// (encoding byte, stored_len) of every extent of an encoded Set.
    fn encodings(frame: &[u8]) -> Vec<(u8, usize)> {
        let mut pos = PREFIX_LEN + SET_HEADER_LEN;
        let count = u32::from_be_bytes(frame[pos - 4..pos].try_into().unwrap());
        (0..count)
            .map(|_| {
                let d = &frame[pos..pos + EXTENT_DESC_LEN];
                let stored = u32::from_be_bytes(d[18..22].try_into().unwrap()) as usize;
                pos += EXTENT_DESC_LEN + stored;
                (d[13], stored)
            })
            .collect()
    }

    /// A frame of type `ty` around `content`, with a correct check (not for Sets).
    fn small_frame(ty: u8, content: &[u8]) -> Vec<u8> {
        let mut h = crc32fast::Hasher::new();
        h.update(&[ty]);
        h.update(content);
        let mut f = ((content.len() + 4) as u32).to_be_bytes().to_vec();
        f.push(ty);
        f.extend_from_slice(content);
        f.extend_from_slice(&h.finalize().to_be_bytes());
        f
    }

    /// Hand-built extent for [`set_frame`].
    #[derive(Clone, Debug)]
    struct Ext {
        offset: u64,
        len: u32,
        kind: u8,
        enc: u8,
        crc: u32,
        stored: Vec<u8>,
    }

    fn raw(offset: u64, bytes: &[u8]) -> Ext {
        Ext {
            offset,
            len: bytes.len() as u32,
            kind: EXT_DATA,
            enc: ENC_RAW,
            crc: crc32fast::hash(bytes),
            stored: bytes.to_vec(),
        }
    }

    /// A Set frame built field by field, with a correct check.
    fn set_frame(first: u64, last: u64, kind: u8, exts: &[Ext]) -> Vec<u8> {
        let mut hashed = vec![TYPE_SET];
        let mut body = Vec::new();
        let mut header = Vec::new();
        header.extend_from_slice(&1u64.to_be_bytes());
        header.extend_from_slice(&first.to_be_bytes());
        header.extend_from_slice(&last.to_be_bytes());
        header.push(kind);
        header.extend_from_slice(&(exts.len() as u32).to_be_bytes());
        hashed.extend_from_slice(&header);
        body.extend_from_slice(&header);
        for e in exts {
            let mut d = Vec::new();
            put_desc(
                &mut d,
                e.offset,
                e.len,
                e.kind,
                e.enc,
                e.crc,
                e.stored.len() as u32,
            );
            hashed.extend_from_slice(&d);
            body.extend_from_slice(&d);
            body.extend_from_slice(&e.stored);
        }
        body.extend_from_slice(&crc32fast::hash(&hashed).to_be_bytes());
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.push(TYPE_SET);
        f.extend_from_slice(&body);
        f
    }

    fn decode(frame: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
        decode_one(frame)
    }

    fn malformed(frame: &[u8]) -> &'static str {
        match decode(frame) {
            Err(FrameError::Malformed(what)) => what,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn golden_hello() {
        let msg = Message::Hello {
            version: 1,
            volume: "v0".into(),
            size: 4096,
        };
        let bytes = enc(&msg);
        assert_eq!(
            hex(&bytes),
            // body_len=18 type=1 | version=1 | size=4096 | len=2 "v0" | check
            "00000012 01 0001 0000000000001000 0002 7630 ec5039a3".replace(' ', "")
        );
        assert_eq!(decode(&bytes), Ok(Some((msg, bytes.len()))));
    }

    #[test]
    fn golden_set() {
        let msg = tiny_set();
        let bytes = enc(&msg);
        let expected = [
            "00000051 03",                                        // body_len=81, Set
            "0000000000000007 000000000000000a 000000000000000c", // set, first_seq, last_seq
            "00 00000002",                                        // Journal, 2 extents
            "0000000000001000 00000004 00 00 ed82cd11 00000004",  // data @4096, raw, crc
            "61626364",                                           // "abcd"
            "0000000000002000 00000200 01 00 00000000 00000000",  // zero @8192 len 512
            "151e7b59",                                           // check
        ]
        .concat()
        .replace(' ', "");
        assert_eq!(hex(&bytes), expected);
        assert_eq!(decode(&bytes), Ok(Some((msg, bytes.len()))));
    }

    #[test]
    fn every_type_round_trips_byte_for_byte() {
        let msgs = [
            Message::Hello {
                version: 9,
                volume: "Dépôt-α".into(),
                size: u64::MAX,
            },
            Message::HelloAck {
                durable_set: 3,
                durable_seq: 99,
                needs_full_copy: true,
            },
            Message::HelloAck {
                durable_set: 0,
                durable_seq: 0,
                needs_full_copy: false,
            },
            tiny_set(),
            Message::Set(DeltaSet {
                set: 1,
                first_seq: 5,
                last_seq: 4,
                newest_write_ms: 0,
                kind: SetKind::Copy { done: true },
                extents: vec![
                    data(0, text(5000)),
                    zero(5000, 1),
                    data(1 << 40, noise(300, 1)),
                ],
            }),
            Message::Set(DeltaSet {
                set: 2,
                first_seq: 8,
                last_seq: 7,
                newest_write_ms: 0,
                kind: SetKind::Journal,
                extents: vec![],
            }),
            Message::Ack {
                set: 12,
                last_seq: 345,
                applied_set: 11,
            },
            Message::Refuse {
                code: 2,
                reason: "unknown volume".into(),
            },
            Message::Pull {
                version: 6,
                volume: "v".into(),
                size: 1 << 30,
                holds: Some((GenId(7), 99)),
            },
            Message::Pull {
                version: 6,
                volume: "w".into(),
                size: 4096,
                holds: None,
            },
        ];
        let mut stream = Vec::new();
        for msg in &msgs {
            let bytes = enc(msg);
            let (back, used) = decode(&bytes).unwrap().unwrap();
            assert_eq!(&back, msg);
            assert_eq!(used, bytes.len());
            assert_eq!(enc(&back), bytes, "re-encoding is byte-for-byte stable");
            stream.extend_from_slice(&bytes);
        }
        // All in one feed.
        let mut d = Decoder::new();
        d.feed(&stream);
        for msg in &msgs {
            assert_eq!(d.next().unwrap().as_ref(), Some(msg));
        }
        assert_eq!(d.next(), Ok(None));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn compressible_data_goes_lz4_and_smaller() {
        let msg = journal(vec![data(0, text(64 << 10))]);
        let mut bytes = Vec::new();
        let stats = encode(&msg, &mut bytes);
        assert_eq!(stats.raw_bytes, 64 << 10);
        assert!(stats.wire_bytes < stats.raw_bytes / 4, "{stats:?}");
        assert_eq!(
            encodings(&bytes),
            vec![(ENC_LZ4, stats.wire_bytes as usize)]
        );
        assert!(bytes.len() < 64 << 10);
        assert_eq!(decode(&bytes).unwrap().unwrap().0, msg);
    }

    #[test]
    fn random_data_goes_raw() {
        for n in [1, 100, 4096, 4097, ALIGN_MIN - 1] {
            let msg = journal(vec![data(0, noise(n, n as u64))]);
            let mut bytes = Vec::new();
            let stats = encode(&msg, &mut bytes);
            assert_eq!(stats.raw_bytes, n as u64);
            assert_eq!(stats.wire_bytes, n as u64);
            assert_eq!(encodings(&bytes), vec![(ENC_RAW, n)]);
            assert_eq!(decode(&bytes).unwrap().unwrap().0, msg);
        }
    }

    /// Where each aligned extent's data starts in `frame`.
    fn aligned_data_offsets(frame: &[u8]) -> Vec<usize> {
        let mut pos = PREFIX_LEN + SET_HEADER_LEN;
        let mut out = Vec::new();
        for (enc, stored) in encodings(frame) {
            let len = u32::from_be_bytes(frame[pos + 8..pos + 12].try_into().unwrap()) as usize;
            pos += EXTENT_DESC_LEN;
            if enc == ENC_RAW_ALIGNED {
                out.push(pos + stored - len);
            }
            pos += stored;
        }
        out
    }

    #[test]
    fn large_raw_extents_start_at_an_aligned_frame_offset() {
        // A small extent first, so the large ones need padding; a 2.5 MiB extent goes as
        // pieces of 1 MiB, 1 MiB, 0.5 MiB, each aligned.
        let small = data(0, noise(100, 1));
        let large = data(1 << 20, noise(5 << 19, 2));
        let msg = journal(vec![small, large]);
        let Message::Set(set) = &msg else {
            unreachable!()
        };
        for compress in [false, true] {
            let mut bytes = Vec::new();
            let stats = encode_opts(&msg, &mut bytes, compress);
            let encs: Vec<u8> = encodings(&bytes).iter().map(|e| e.0).collect();
            assert_eq!(
                encs,
                vec![ENC_RAW, ENC_RAW_ALIGNED, ENC_RAW_ALIGNED, ENC_RAW_ALIGNED]
            );
            let offsets = aligned_data_offsets(&bytes);
            assert_eq!(offsets.len(), 3);
            assert!(offsets.iter().all(|o| o % DATA_ALIGN == 0), "{offsets:?}");
            assert!(stats.wire_bytes < stats.raw_bytes + 3 * DATA_ALIGN as u64);
            assert!((bytes.len() - PREFIX_LEN) as u64 <= set.max_body_len());
            // Decoded from a shared frame, the data is a slice of it at those offsets.
            let frame = Bytes::from(bytes.clone());
            let Message::Set(d) = decode_frame(&frame).unwrap() else {
                panic!("not a set")
            };
            let Payload::Data(piece) = &d.extents[1].payload else {
                panic!("not data")
            };
            assert_eq!(
                piece.as_ptr() as usize - frame.as_ptr() as usize,
                offsets[0]
            );
            // The large extent comes back as its three pieces, bytes unchanged.
            let back: Vec<u8> = d.extents[1..]
                .iter()
                .flat_map(|e| match &e.payload {
                    Payload::Data(b) => b.to_vec(),
                    Payload::Zero(_) => panic!("not data"),
                })
                .collect();
            let Payload::Data(original) = &set.extents[1].payload else {
                unreachable!()
            };
            assert_eq!(back, original.to_vec());
            assert_eq!(d.extents[0], set.extents[0]);
        }
        // The chunk encoder sends the same bytes, and counts them the same.
        let (chunks, chunk_stats) = encode_set_chunks(set, &KnownCrcs::default());
        let mut flat = Vec::new();
        let flat_stats = encode_opts(&msg, &mut flat, false);
        assert_eq!(chunks.concat(), flat);
        assert_eq!(
            (chunk_stats.raw_bytes, chunk_stats.wire_bytes),
            (flat_stats.raw_bytes, flat_stats.wire_bytes)
        );
    }

    /// The journal's CRCs are used for pieces that are exactly a known buffer: the frame is
    /// the same as when every piece is hashed; pieces of a buffer longer than a chunk, or
    /// slices of a known buffer, are hashed as usual.
    #[test]
    fn known_crcs_give_the_same_frame() {
        let whole = Bytes::from(noise(300_000, 3));
        let long = Bytes::from(noise(MAX_CHUNK as usize + 5000, 4));
        let small = Bytes::from(noise(4096, 5));
        let mut known = KnownCrcs::default();
        for b in [&whole, &long, &small] {
            known.insert(b, crc32fast::hash(b));
        }
        let Message::Set(set) = journal(vec![
            Extent {
                offset: 0,
                payload: Payload::Data(whole),
            },
            Extent {
                offset: 1 << 20,
                payload: Payload::Data(long),
            },
            Extent {
                offset: 8 << 20,
                payload: Payload::Data(small.slice(100..)),
            },
        ]) else {
            unreachable!()
        };
        let with = encode_set_chunks(&set, &known);
        let without = encode_set_chunks(&set, &KnownCrcs::default());
        assert_eq!(with.0.concat(), without.0.concat());
        assert_eq!(with.1, without.1);
        let decoded = decode_frame(&Bytes::from(with.0.concat()));
        assert!(matches!(decoded, Ok(Message::Set(_))), "every CRC verifies");
        // The compressing encoder too (the CRC covers the raw piece).
        let msg = Message::Set(set);
        let (mut with, mut without) = (Vec::new(), Vec::new());
        encode_with_crcs(&msg, &mut with, true, &known);
        encode_opts(&msg, &mut without, true);
        assert_eq!(with, without);
        assert!(matches!(
            decode_frame(&Bytes::from(with)),
            Ok(Message::Set(_))
        ));
    }

    /// The encoder takes a known CRC rather than hashing (debug builds check it against the
    /// bytes, which is how a wrong one shows).
    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "a known CRC is wrong")]
    fn a_known_crc_is_used_for_its_buffer() {
        let b = Bytes::from(noise(70_000, 6));
        let mut known = KnownCrcs::default();
        known.insert(&b, crc32fast::hash(&b) ^ 1);
        let Message::Set(set) = journal(vec![data(0, b.to_vec())]) else {
            unreachable!()
        };
        // Same bytes, other memory: hashed, no panic.
        encode_set_chunks(&set, &known);
        let Message::Set(set) = journal(vec![Extent {
            offset: 0,
            payload: Payload::Data(b),
        }]) else {
            unreachable!()
        };
        encode_set_chunks(&set, &known);
    }

    /// The same through the compressing encoder.
    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "a known CRC is wrong")]
    fn a_known_crc_is_used_when_compressing() {
        let b = Bytes::from(vec![7u8; 70_000]);
        let mut known = KnownCrcs::default();
        known.insert(&b, crc32fast::hash(&b) ^ 1);
        let msg = journal(vec![Extent {
            offset: 0,
            payload: Payload::Data(b),
        }]);
        encode_with_crcs(&msg, &mut Vec::new(), true, &known);
    }

    #[test]
    fn bad_padding_of_an_aligned_extent_is_malformed() {
        let msg = journal(vec![
            data(0, noise(100, 1)),
            data(4096, noise(ALIGN_MIN, 2)),
        ]);
        let bytes = enc(&msg);
        let data_at = aligned_data_offsets(&bytes)[0];
        // A non-zero padding byte (the check does not cover padding: the decoder looks).
        let mut b = bytes.clone();
        b[data_at - 1] = 1;
        assert_eq!(malformed(&b), "aligned extent with non-zero padding");
        // Padding that does not end at the boundary: one byte fewer stored.
        let mut b = bytes.clone();
        let desc = PREFIX_LEN + SET_HEADER_LEN + EXTENT_DESC_LEN + 100;
        let stored = u32::from_be_bytes(b[desc + 18..desc + 22].try_into().unwrap());
        b[desc + 18..desc + 22].copy_from_slice(&(stored - 1).to_be_bytes());
        assert!(matches!(
            decode(&b),
            Err(FrameError::Malformed(_) | FrameError::BadChecksum)
        ));
    }

    #[test]
    fn probe_sends_raw_when_the_first_4k_do_not_shrink() {
        // Documented heuristic: incompressible first 4 KiB => raw, even if the rest is zeroes.
        let mut bytes = noise(PROBE_LEN, 5);
        bytes.resize(32 << 10, 0);
        let frame = enc(&journal(vec![data(0, bytes.clone())]));
        assert_eq!(encodings(&frame), vec![(ENC_RAW, bytes.len())]);
        // Compressible start => the whole chunk is compressed.
        bytes.rotate_right(PROBE_LEN);
        let frame = enc(&journal(vec![data(0, bytes.clone())]));
        assert_eq!(encodings(&frame)[0].0, ENC_LZ4);
    }

    #[test]
    fn big_extents_are_split_into_crc_checked_chunks() {
        let big = Bytes::from(noise((5 << 20) / 2, 3));
        let msg = journal(vec![
            Extent {
                offset: 1 << 30,
                payload: Payload::Data(big.clone()),
            },
            zero((1 << 30) + big.len() as u64, 4096),
            data(8 << 30, Vec::new()), // empty: dropped
        ]);
        let Message::Set(set) = &msg else { panic!() };
        let bytes = enc(&msg);
        assert!((bytes.len() - PREFIX_LEN) as u64 <= set.max_body_len());
        assert_eq!(encodings(&bytes).len(), 4);
        let Message::Set(back) = decode(&bytes).unwrap().unwrap().0 else {
            panic!()
        };
        let offsets: Vec<u64> = back.extents.iter().map(|e| e.offset).collect();
        let m = u64::from(MAX_CHUNK);
        assert_eq!(
            offsets,
            vec![
                1 << 30,
                (1 << 30) + m,
                (1 << 30) + 2 * m,
                (1 << 30) + big.len() as u64
            ]
        );
        let mut joined = Vec::new();
        for e in &back.extents[..3] {
            let Payload::Data(b) = &e.payload else {
                panic!()
            };
            joined.extend_from_slice(b);
        }
        assert_eq!(joined, big);
        assert_eq!(back.extents[3], zero((1 << 30) + big.len() as u64, 4096));
    }

    #[test]
    fn truncated_message_waits_until_complete() {
        let bytes = enc(&journal(vec![
            data(0, text(10_000)),
            data(20_000, noise(100, 9)),
        ]));
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let mut d = Decoder::new();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(d.next(), Ok(None));
            d.feed(std::slice::from_ref(b));
            assert_eq!(d.buffered(), i + 1);
        }
        assert!(d.next().unwrap().is_some());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_length_is_too_large_before_the_body_arrives() {
        let mut d = Decoder::new();
        d.feed(&(MAX_MESSAGE + 1).to_be_bytes());
        assert_eq!(d.next(), Err(FrameError::TooLarge(MAX_MESSAGE + 1)));
        // Poisoned: same error, input ignored.
        d.feed(&enc(&tiny_set()));
        assert_eq!(d.next(), Err(FrameError::TooLarge(MAX_MESSAGE + 1)));
        assert_eq!(d.buffered(), 0);
        assert!(d.failed().is_some());
        assert_eq!(
            decode(&u32::MAX.to_be_bytes()),
            Err(FrameError::TooLarge(u32::MAX))
        );
        // Exactly MAX_MESSAGE is allowed (waits for the body).
        let mut at_limit = MAX_MESSAGE.to_be_bytes().to_vec();
        at_limit.push(TYPE_SET);
        assert_eq!(decode(&at_limit), Ok(None));
    }

    /// A version-8 primary's Sums carry the set they follow (type 13); an older primary's
    /// (type 8) still decode, without one.
    #[test]
    fn sums_name_the_set_they_follow() {
        let sums = |after_set| Message::Sums {
            offset: 1 << 20,
            chunk: 4096,
            after_set,
            sums: vec![[7; SUM_LEN]],
        };
        let new = enc(&sums(Some(54)));
        assert_eq!(new[4], TYPE_SUMS_AFTER);
        assert_eq!(new[PREFIX_LEN..PREFIX_LEN + 8], 54u64.to_be_bytes());
        assert_eq!(decode(&new), Ok(Some((sums(Some(54)), new.len()))));
        let mut body = (1u64 << 20).to_be_bytes().to_vec();
        body.extend_from_slice(&4096u32.to_be_bytes());
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&[7; SUM_LEN]);
        let old = small_frame(TYPE_SUMS, &body);
        assert_eq!(decode(&old), Ok(Some((sums(None), old.len()))));
        assert_eq!(enc(&sums(None)), old);
    }

    #[test]
    fn unknown_type_is_refused() {
        for ty in [0u8, TYPE_LAST + 1, 255] {
            assert_eq!(decode(&[0, 0, 0, 4, ty]), Err(FrameError::UnknownType(ty)));
        }
    }

    #[test]
    fn corrupt_first_data_byte_is_bad_crc() {
        for payload in [noise(3000, 4), text(3000)] {
            let msg = journal(vec![
                zero(0, 512),
                data(4096, payload),
                data(9000, noise(5, 1)),
            ]);
            let mut bytes = enc(&msg);
            assert!(corrupt_first_data_byte(&mut bytes));
            assert_eq!(decode(&bytes), Err(FrameError::BadCrc { offset: 4096 }));
            let mut d = Decoder::new();
            d.feed(&bytes);
            assert_eq!(d.next(), Err(FrameError::BadCrc { offset: 4096 }));
            assert_eq!(d.next(), Err(FrameError::BadCrc { offset: 4096 }));
        }
        assert!(!corrupt_first_data_byte(&mut enc(&journal(vec![zero(
            0, 5
        )]))));
        assert!(!corrupt_first_data_byte(&mut enc(&Message::Ack {
            set: 1,
            last_seq: 1,
            applied_set: 0,
        })));
        assert!(!corrupt_first_data_byte(&mut []));
        let mut cut = enc(&tiny_set());
        cut.truncate(cut.len() - 1);
        assert!(!corrupt_first_data_byte(&mut cut));
    }

    #[test]
    fn header_fields_are_covered_by_the_check() {
        let bytes = enc(&tiny_set());
        // Flip a bit of the zero extent's offset, of the set number, of a data crc.
        let zero_offset = PREFIX_LEN + SET_HEADER_LEN + EXTENT_DESC_LEN + 4 + 6;
        for at in [
            zero_offset,
            PREFIX_LEN + 7,
            PREFIX_LEN + SET_HEADER_LEN + 15,
        ] {
            let mut b = bytes.clone();
            b[at] ^= 0x10;
            assert_eq!(decode(&b), Err(FrameError::BadChecksum), "byte {at}");
        }
        let mut ack = enc(&Message::Ack {
            set: 1,
            last_seq: 2,
            applied_set: 1,
        });
        ack[PREFIX_LEN] ^= 1;
        assert_eq!(decode(&ack), Err(FrameError::BadChecksum));
    }

    #[test]
    fn set_rules_are_enforced() {
        let j = SET_JOURNAL;
        let ok = set_frame(1, 1, j, &[raw(0, b"ab"), raw(2, b"cd")]);
        assert!(decode(&ok).unwrap().is_some());

        assert_eq!(
            malformed(&set_frame(5, 3, j, &[])),
            "first_seq > last_seq + 1"
        );
        assert!(decode(&set_frame(5, 4, j, &[])).unwrap().is_some());
        assert!(decode(&set_frame(0, u64::MAX, j, &[])).unwrap().is_some());
        assert_eq!(
            malformed(&set_frame(5, 4, j, &[raw(0, b"x")])),
            "journal set with an empty sequence range carries extents"
        );
        assert!(decode(&set_frame(5, 4, SET_COPY, &[raw(0, b"x")]))
            .unwrap()
            .is_some());
        assert_eq!(malformed(&set_frame(1, 1, 4, &[])), "unknown set kind");
        assert_eq!(
            malformed(&set_frame(1, 1, j, &[raw(0, b"ab"), raw(1, b"cd")])),
            "extents overlap or are out of order"
        );
        assert_eq!(
            malformed(&set_frame(1, 1, j, &[raw(10, b"ab"), raw(0, b"cd")])),
            "extents overlap or are out of order"
        );
        assert_eq!(
            malformed(&set_frame(1, 1, j, &[raw(u64::MAX - 1, b"ab")])),
            "extent end overflows u64"
        );
        assert!(decode(&set_frame(1, 1, j, &[raw(u64::MAX - 2, b"ab")]))
            .unwrap()
            .is_some());
        let empty = Ext {
            len: 0,
            ..raw(0, b"")
        };
        assert_eq!(malformed(&set_frame(1, 1, j, &[empty])), "empty extent");
        let z = Ext {
            offset: 0,
            len: 4,
            kind: EXT_ZERO,
            enc: ENC_RAW,
            crc: 0,
            stored: vec![],
        };
        assert!(decode(&set_frame(1, 1, j, std::slice::from_ref(&z)))
            .unwrap()
            .is_some());
        for bad in [
            Ext {
                stored: vec![0; 4],
                ..z.clone()
            },
            Ext {
                crc: 1,
                ..z.clone()
            },
            Ext {
                enc: ENC_LZ4,
                ..z.clone()
            },
        ] {
            assert_eq!(
                malformed(&set_frame(1, 1, j, &[bad])),
                "zero extent with an encoding, a crc or stored bytes"
            );
        }
        assert_eq!(
            malformed(&set_frame(1, 1, j, &[Ext { kind: 2, ..z }])),
            "unknown extent kind"
        );
        assert_eq!(
            malformed(&set_frame(
                1,
                1,
                j,
                &[Ext {
                    len: 3,
                    ..raw(0, b"ab")
                }]
            )),
            "raw extent with stored_len != len"
        );
        assert_eq!(
            malformed(&set_frame(
                1,
                1,
                j,
                &[Ext {
                    enc: 7,
                    ..raw(0, b"ab")
                }]
            )),
            "unknown extent encoding"
        );
        let big = vec![1u8; MAX_CHUNK as usize + 1];
        assert_eq!(
            malformed(&set_frame(1, 1, j, &[raw(0, &big)])),
            "data extent longer than MAX_CHUNK"
        );
        // lz4 stored_len must be in 1..len.
        let lz = |len: u32, stored: Vec<u8>, crc: u32| Ext {
            offset: 0,
            len,
            kind: EXT_DATA,
            enc: ENC_LZ4,
            crc,
            stored,
        };
        assert_eq!(
            malformed(&set_frame(1, 1, j, &[lz(4, vec![0; 4], 0)])),
            "lz4 extent with stored_len not in 1..len"
        );
        assert_eq!(
            malformed(&set_frame(1, 1, j, &[lz(4, vec![], 0)])),
            "lz4 extent with stored_len not in 1..len"
        );
        // lz4 that decompresses to fewer or more bytes than len, or is garbage.
        let plain = text(1000);
        let packed = lz4_flex::block::compress(&plain);
        let crc = crc32fast::hash(&plain);
        assert!(
            decode(&set_frame(1, 1, j, &[lz(1000, packed.clone(), crc)]))
                .unwrap()
                .is_some()
        );
        for (len, stored) in [
            (1001, packed.clone()),
            (999, packed.clone()),
            (1000, vec![0xff; 50]),
        ] {
            assert_eq!(
                decode(&set_frame(1, 1, j, &[lz(len, stored, crc)])),
                Err(FrameError::Decompress { offset: 0 })
            );
        }
        assert_eq!(
            decode(&set_frame(1, 1, j, &[lz(1000, packed, crc ^ 1)])),
            Err(FrameError::BadCrc { offset: 0 })
        );
        assert_eq!(
            decode(&set_frame(
                1,
                1,
                j,
                &[Ext {
                    crc: 5,
                    ..raw(77, b"ab")
                }]
            )),
            Err(FrameError::BadCrc { offset: 77 })
        );
    }

    #[test]
    fn set_data_is_capped() {
        // More than MAX_MESSAGE bytes of data in one set: refused by validate (a sender check)
        // and by the decoder, even when lz4 packs it into a small frame.
        let set = DeltaSet {
            set: 1,
            first_seq: 1,
            last_seq: 1,
            newest_write_ms: 0,
            kind: SetKind::Journal,
            extents: vec![zero(0, 1), data(1, vec![0; MAX_MESSAGE as usize + 1])],
        };
        assert_eq!(
            set.validate(),
            Err(FrameError::Malformed("set data exceeds MAX_MESSAGE"))
        );
        assert!(set.max_body_len() > u64::from(MAX_MESSAGE));
        // lz4 expansion: many tiny lz4 blocks each claiming 1 MiB of zeroes.
        let packed = lz4_flex::block::compress(&vec![0u8; MAX_CHUNK as usize]);
        let crc = crc32fast::hash(&vec![0u8; MAX_CHUNK as usize]);
        let exts: Vec<Ext> = (0..73u64)
            .map(|i| Ext {
                offset: i << 20,
                len: MAX_CHUNK,
                kind: EXT_DATA,
                enc: ENC_LZ4,
                crc,
                stored: packed.clone(),
            })
            .collect();
        let frame = set_frame(1, 1, SET_JOURNAL, &exts);
        assert!(frame.len() < 1 << 20);
        assert_eq!(malformed(&frame), "set data exceeds MAX_MESSAGE");
        assert!(decode(&set_frame(1, 1, SET_JOURNAL, &exts[..72]))
            .unwrap()
            .is_some());
    }

    #[test]
    fn small_message_rules_are_enforced() {
        let mut hello = 1u16.to_be_bytes().to_vec();
        hello.extend_from_slice(&0u64.to_be_bytes());
        let with_name = |name: &[u8]| {
            let mut c = hello.clone();
            c.extend_from_slice(&(name.len() as u16).to_be_bytes());
            c.extend_from_slice(name);
            small_frame(TYPE_HELLO, &c)
        };
        assert!(decode(&with_name(&[b'a'; MAX_STRING])).unwrap().is_some());
        assert_eq!(
            malformed(&with_name(&[b'a'; MAX_STRING + 1])),
            "string longer than 4096 bytes"
        );
        assert_eq!(malformed(&with_name(&[0xff, 0xfe])), "string is not UTF-8");
        let mut trailing = with_name(b"v").to_vec();
        trailing.truncate(trailing.len() - 4);
        let mut c = trailing[PREFIX_LEN..].to_vec();
        c.push(0);
        assert_eq!(
            malformed(&small_frame(TYPE_HELLO, &c)),
            "trailing bytes in body"
        );
        assert_eq!(
            malformed(&small_frame(TYPE_HELLO, &hello)),
            "field runs past the end of the body"
        );
        let mut ack = [0u8; 17];
        ack[16] = 2;
        assert_eq!(
            malformed(&small_frame(TYPE_HELLO_ACK, &ack)),
            "needs_full_copy is neither 0 nor 1"
        );
        assert_eq!(
            malformed(&[0, 0, 0, 3, TYPE_ACK, 0, 0, 0]),
            "body shorter than its check"
        );
        // Long strings are cut at a char boundary on encode, so they still decode.
        let long = "é".repeat(MAX_STRING);
        let bytes = enc(&Message::Refuse {
            code: 1,
            reason: long.clone(),
        });
        let Some((Message::Refuse { reason, .. }, _)) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(reason.len(), MAX_STRING);
        assert!(long.starts_with(&reason));
    }

    #[test]
    fn count_larger_than_body_is_refused_without_allocating() {
        let mut f = set_frame(1, 1, SET_JOURNAL, &[]);
        let at = PREFIX_LEN + SET_HEADER_LEN - 4;
        f[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(malformed(&f), "extent count does not fit in the body");
    }

    #[test]
    fn raw_extents_share_the_decoder_buffer() {
        let bytes = enc(&journal(vec![data(0, noise(1000, 2))]));
        let mut d = Decoder::new();
        d.feed(&bytes);
        let Some(Message::Set(set)) = d.next().unwrap() else {
            panic!()
        };
        let Payload::Data(b) = &set.extents[0].payload else {
            panic!()
        };
        assert_eq!(&b[..], &bytes[bytes.len() - 4 - 1000..bytes.len() - 4]);
    }

    // ---- property tests ----

    fn arb_payload() -> impl Strategy<Value = Payload> {
        prop_oneof![
            1 => (1u32..100_000).prop_map(Payload::Zero),
            3 => (1usize..6000, any::<u64>(), 0u8..3).prop_map(|(n, seed, style)| {
                Payload::Data(Bytes::from(match style {
                    0 => noise(n, seed),
                    1 => text(n),
                    _ => {
                        let mut v = noise(n / 2, seed);
                        v.resize(n, (seed & 0xff) as u8);
                        v
                    }
                }))
            }),
        ]
    }

    fn arb_set() -> impl Strategy<Value = DeltaSet> {
        (
            any::<u64>(),
            0u64..u64::MAX / 2,
            0u64..1000,
            0u8..4,
            prop::collection::vec((0u64..10_000, arb_payload()), 0..6),
            prop_oneof![Just(0u64), 1u64..u64::MAX],
        )
            .prop_map(|(set, first_seq, span, kind, parts, newest_write_ms)| {
                let mut offset = 0;
                let extents = parts
                    .into_iter()
                    .map(|(gap, payload)| {
                        offset += gap;
                        let e = Extent { offset, payload };
                        offset = e.end();
                        e
                    })
                    .collect();
                DeltaSet {
                    set,
                    first_seq,
                    last_seq: first_seq + span,
                    newest_write_ms,
                    kind: match kind {
                        0 => SetKind::Journal,
                        1 => SetKind::Copy { done: false },
                        2 => SetKind::Copy { done: true },
                        _ => SetKind::Repair,
                    },
                    extents,
                }
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            1 => (any::<u16>(), "\\PC{0,16}", any::<u64>()).prop_map(|(version, volume, size)| {
                Message::Hello {
                    version,
                    volume,
                    size,
                }
            }),
            1 => (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(s, q, f)| Message::HelloAck {
                durable_set: s,
                durable_seq: q,
                needs_full_copy: f,
            }),
            1 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(set, last_seq, applied_set)| {
                Message::Ack { set, last_seq, applied_set }
            }),
            1 => (any::<u16>(), "\\PC{0,32}").prop_map(|(code, reason)| Message::Refuse { code, reason }),
            4 => arb_set().prop_map(Message::Set),
            1 => arb_identify().prop_map(|c| Message::Identify(Box::new(c))),
            1 => (any::<[u8; 16]>(), 0u8..3, any::<u64>(), any::<u64>(), "\\PC{0,32}").prop_map(
                |(u, m, durable_set, durable_seq, reason)| Message::Decision {
                    uuid: VolumeUuid(u),
                    mode: [Mode::Resume, Mode::FullCopy, Mode::Compare][m as usize],
                    durable_set,
                    durable_seq,
                    reason,
                }
            ),
            1 => (any::<u64>(), 1u32.., prop::option::of(any::<u64>()), prop::collection::vec(any::<[u8; 32]>(), 0..20))
                .prop_map(|(offset, chunk, after_set, sums)| Message::Sums { offset, chunk, after_set, sums }),
            1 => (any::<u64>(), 1u32.., prop::collection::vec(any::<bool>(), 0..40))
                .prop_map(|(offset, chunk, differ)| Message::SumsReply { offset, chunk, differ }),
            1 => (any::<u16>(), "\\PC{0,32}", any::<u64>(), prop::option::of((1u64.., any::<u64>())))
                .prop_map(|(version, volume, size, holds)| Message::Pull {
                    version,
                    volume,
                    size,
                    holds: holds.map(|(g, s)| (GenId(g), s)),
                }),
            1 => prop::collection::vec((0u64..1 << 50, 1u64..1 << 30), 0..20)
                .prop_map(|regions| Message::Takeover { regions }),
        ]
    }

    fn arb_identify() -> impl Strategy<Value = PrimaryClaim> {
        (
            prop::option::of(any::<[u8; 16]>()),
            prop::collection::vec((1u64.., 0u64..100, any::<bool>()), 0..5),
            any::<u64>(),
            0u64..1000,
            0u64..1000,
            (any::<u64>(), prop::option::of(any::<u64>())),
        )
            .prop_map(|(uuid, raw, forgotten_below, a, b, (ino, resync_from))| {
                let mut lineage = Lineage {
                    spans: Vec::new(),
                    forgotten_below,
                };
                let mut first = 0;
                for (g, step, cont) in raw {
                    first += step;
                    if !cont && g % 3 == 0 {
                        lineage.mint_accepted(GenId(g), first);
                    } else {
                        lineage.mint(GenId(g), first, cont);
                    }
                }
                PrimaryClaim {
                    uuid: uuid.map(VolumeUuid),
                    lineage,
                    journal_acked: a.min(b),
                    journal_last: a.max(b),
                    fingerprint: Fingerprint {
                        kind: crate::disk::fingerprint::DiskKind::File,
                        dev: 3,
                        ino,
                        born: None,
                        serial: Some("s\"n".into()),
                        size: 1 << 30,
                        ctime: None,
                    },
                    resync_from,
                }
            })
    }

    /// Hand-built Set frames with random fields and a correct check: exercises the rules and
    /// the data path on inputs the encoder would never produce.
    fn arb_raw_set_frame() -> impl Strategy<Value = Vec<u8>> {
        let ext = (
            0u64..20_000,
            0u32..3000,
            0u8..3,
            0u8..3,
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
        )
            .prop_map(|(offset, len, kind, enc, crc, stored, fix)| {
                if fix && kind == EXT_DATA && enc == ENC_RAW {
                    raw(offset, &stored)
                } else {
                    Ext {
                        offset,
                        len,
                        kind,
                        enc,
                        crc,
                        stored,
                    }
                }
            });
        (0u64..4, 0u64..4, 0u8..4, prop::collection::vec(ext, 0..5))
            .prop_map(|(first, last, kind, exts)| set_frame(first, last, kind, &exts))
    }

    fn drain(d: &mut Decoder) -> Result<Vec<Message>, FrameError> {
        let mut out = Vec::new();
        while let Some(m) = d.next()? {
            out.push(m);
        }
        Ok(out)
    }

    proptest! {
        #[test]
        fn round_trip_through_any_chunking(
            a in arb_message(),
            b in arb_message(),
            cuts in prop::collection::vec(1usize..700, 0..40),
        ) {
            let mut stream = Vec::new();
            let sa = encode(&a, &mut stream);
            let len_a = stream.len();
            encode(&b, &mut stream);
            if let Message::Set(s) = &a {
                prop_assert!(sa.wire_bytes <= sa.raw_bytes);
                prop_assert!(((len_a - PREFIX_LEN) as u64) <= s.max_body_len());
            }
            prop_assert_eq!(decode(&stream), Ok(Some((a.clone(), len_a))));
            let mut d = Decoder::new();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            for cut in cuts {
                let (now, later) = rest.split_at(cut.min(rest.len()));
                d.feed(now);
                rest = later;
                got.extend(drain(&mut d).unwrap());
            }
            d.feed(rest);
            got.extend(drain(&mut d).unwrap());
            prop_assert_eq!(got, vec![a.clone(), b]);
            prop_assert_eq!(d.buffered(), 0);
            prop_assert_eq!(enc(&a), stream[..len_a].to_vec());
        }

        /// The zero-copy chunks are the uncompressed encoding, byte for byte, and data chunks
        /// share the set's buffers.
        #[test]
        fn set_chunks_equal_the_uncompressed_encoding(m in arb_message()) {
            if let Message::Set(s) = &m {
                let mut flat = Vec::new();
                let flat_stats = encode_opts(&m, &mut flat, false);
                let (chunks, stats) = encode_set_chunks(s, &KnownCrcs::default());
                prop_assert_eq!(chunks.concat(), flat);
                prop_assert_eq!((stats.raw_bytes, stats.wire_bytes), (flat_stats.raw_bytes, flat_stats.wire_bytes));
                let buffers: Vec<usize> = s.extents.iter().filter_map(|e| match &e.payload {
                    Payload::Data(b) if !b.is_empty() => Some(b.as_ptr() as usize),
                    _ => None,
                }).collect();
                let shared = chunks.iter().filter(|c| buffers.contains(&(c.as_ptr() as usize))).count();
                prop_assert_eq!(shared, buffers.len(), "each extent's first piece is its own memory");
            }
        }

        #[test]
        fn random_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            ty in 0u8..=TYPE_LAST + 1,
        ) {
            let _ = decode(&bytes);
            let mut d = Decoder::new();
            d.feed(&bytes);
            let _ = drain(&mut d);
            // Valid prefix, random body (mostly BadChecksum) and with a correct check.
            let mut framed = ((bytes.len()) as u32).to_be_bytes().to_vec();
            framed.push(ty);
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
            let sealed = small_frame(ty, &bytes);
            let _ = decode(&sealed);
            let mut set = small_frame(TYPE_SET, &bytes);
            let _ = decode(&set);
            let _ = corrupt_first_data_byte(&mut set);
        }

        #[test]
        fn hand_built_sets_never_panic_and_decoded_sets_are_valid(frame in arb_raw_set_frame()) {
            if let Ok(Some((Message::Set(s), used))) = decode(&frame) {
                prop_assert_eq!(used, frame.len());
                prop_assert_eq!(s.validate(), Ok(()));
            }
        }

        #[test]
        fn truncation_waits(msg in arb_message(), cut in any::<prop::sample::Index>()) {
            let bytes = enc(&msg);
            let cut = cut.index(bytes.len());
            prop_assert_eq!(decode(&bytes[..cut]), Ok(None));
            let mut d = Decoder::new();
            d.feed(&bytes[..cut]);
            prop_assert_eq!(d.next(), Ok(None));
        }

        #[test]
        fn single_byte_flips_are_detected(
            msg in arb_message(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let mut bytes = enc(&msg);
            let at = at.index(bytes.len());
            bytes[at] ^= xor;
            // The only acceptable success: an lz4 block whose flip still decompresses to the
            // very same data (e.g. another match offset into a run) — the same message.
            if let Ok(Some((back, _))) = decode(&bytes) {
                prop_assert_eq!(back, msg.clone(), "flip at {} undetected", at);
            }
            let mut d = Decoder::new();
            d.feed(&bytes);
            if let Ok(Some(back)) = d.next() {
                prop_assert_eq!(back, msg);
            }
        }
    }
}
