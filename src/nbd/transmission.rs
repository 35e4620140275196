//! Transmission phase as pure code: request headers in, validated commands or protocol errors
//! out; reply encoders. No sockets, no disks.

use super::handshake::MAX_PAYLOAD;
use super::wire::*;

/// NBD error numbers (proto.md "Error values").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdErrno {
    /// Map an OS errno from the disk to what the client is told.
    pub fn from_os(errno: i32) -> NbdErrno {
        match errno {
            libc::EPERM | libc::EROFS | libc::EACCES => NbdErrno::Perm,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdErrno::NoSpc,
            libc::ENOMEM => NbdErrno::NoMem,
            libc::EINVAL => NbdErrno::Inval,
            libc::EOVERFLOW => NbdErrno::Overflow,
            libc::EOPNOTSUPP => NbdErrno::NotSup,
            libc::ESHUTDOWN => NbdErrno::Shutdown,
            _ => NbdErrno::Io,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("request has bad magic {0:#010x}")]
pub struct BadRequestMagic(pub u32);

pub fn parse_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, BadRequestMagic> {
    let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(BadRequestMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
        kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// A request that passed every check: safe to execute against the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Disconnect,
}

/// What the session knows when it judges a request.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub base_allocation: bool,
}

/// A request we refuse. `payload` tells the driver how many payload bytes follow the header
/// on the wire and must be read and thrown away to stay in step with the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub errno: NbdErrno,
    pub why: String,
    pub payload: u32,
}

/// A write payload larger than this cannot be skipped sensibly: we hang up instead.
pub const MAX_SKIPPABLE_PAYLOAD: u32 = 64 << 20;

pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Rejection> {
    let payload = if h.kind == CMD_WRITE { h.length } else { 0 };
    let reject = |errno, why: String| {
        Err(Rejection {
            errno,
            why,
            payload,
        })
    };
    let allowed_flags = match h.kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    };
    let known = matches!(
        h.kind,
        CMD_READ
            | CMD_WRITE
            | CMD_DISC
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if !known {
        return reject(NbdErrno::Inval, format!("unknown command {}", h.kind));
    }
    if h.flags & !allowed_flags != 0 {
        return reject(
            NbdErrno::Inval,
            format!("command {} with unknown flags {:#x}", h.kind, h.flags),
        );
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    match h.kind {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => return Ok(Command::Flush),
        _ => {}
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.read_only {
        return reject(NbdErrno::Perm, "write to a read-only export".into());
    }
    if h.kind == CMD_BLOCK_STATUS && !s.base_allocation {
        return reject(
            NbdErrno::Inval,
            "block status without a negotiated meta context".into(),
        );
    }
    if h.length == 0 {
        return reject(NbdErrno::Inval, format!("command {} with length 0", h.kind));
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.length > MAX_PAYLOAD {
        return reject(
            NbdErrno::Overflow,
            format!(
                "length {} above the advertised maximum {MAX_PAYLOAD}",
                h.length
            ),
        );
    }
    let end = h.offset.checked_add(h.length as u64);
    if end.is_none_or(|e| e > s.size) {
        // proto.md: ENOSPC for writes past the end, EINVAL for everything else.
        let errno = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            NbdErrno::NoSpc
        } else {
            NbdErrno::Inval
        };
        return reject(
            errno,
            format!(
                "offset {} + length {} past the end ({})",
                h.offset, h.length, s.size
            ),
        );
    }
    let (offset, len) = (h.offset, h.length);
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
        },
        _ => unreachable!("filtered above"),
    })
}

pub fn simple_reply(cookie: u64, errno: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Header of an OFFSET_DATA chunk; `data_len` bytes of data follow it on the wire.
pub fn offset_data_header(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, data_len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + data_len);
    out.extend_from_slice(&offset.to_be_bytes());
}

pub fn offset_hole(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, errno: NbdErrno, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&(errno as u32).to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// One base:allocation extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

pub fn block_status_chunk(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[Extent]) {
    chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        4 + 8 * extents.len() as u32,
    );
    out.extend_from_slice(&context.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.len.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
}

pub fn done_chunk(out: &mut Vec<u8>, cookie: u64) {
    chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// Split `data` into runs of all-zero and non-zero `granule`-sized pieces, so a READ can answer
/// zero runs with OFFSET_HOLE instead of shipping zero bytes. Returns (start, len, is_zero).
pub fn zero_runs(data: &[u8], granule: usize) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, piece) in data.chunks(granule).enumerate() {
        let zero = is_zero(piece);
        match runs.last_mut() {
            Some(r) if r.2 == zero => r.1 += piece.len(),
            _ => runs.push((i * granule, piece.len(), zero)),
        }
    }
    runs
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64.
    let (head, words, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Session = Session {
        size: 1 << 20,
        read_only: false,
        structured: true,
        base_allocation: true,
    };

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 0xdead_beef_0000_0001,
            offset,
            length,
        }
    }

    #[test]
    fn request_round_trips_byte_for_byte() {
        let h = req(CMD_WRITE, CMD_FLAG_FUA, 0x1234, 512);
        let b = encode_request(&h);
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1, 0, 0, 0, 0,
                0, 0, 0x12, 0x34, 0, 0, 2, 0
            ]
        );
        assert_eq!(parse_request(&b), Ok(h));
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(parse_request(&bad), Err(BadRequestMagic(0x0060_9513)));
    }

    #[test]
    fn valid_commands() {
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, 4096), &S),
            Ok(Command::Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            validate(&req(CMD_WRITE, CMD_FLAG_FUA, (1 << 20) - 1, 1), &S),
            Ok(Command::Write {
                offset: (1 << 20) - 1,
                len: 1,
                fua: true
            })
        );
        assert_eq!(
            validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20), &S),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                no_hole: true
            })
        );
        assert_eq!(validate(&req(CMD_FLUSH, 0, 0, 0), &S), Ok(Command::Flush));
        assert_eq!(
            validate(&req(CMD_DISC, 0, 0, 0), &S),
            Ok(Command::Disconnect)
        );
    }

    fn errno(h: RequestHeader, s: &Session) -> (NbdErrno, u32) {
        let r = validate(&h, s).unwrap_err();
        (r.errno, r.payload)
    }

    #[test]
    fn rejections_carry_the_protocol_errno_and_payload_to_skip() {
        assert_eq!(errno(req(77, 0, 0, 10), &S), (NbdErrno::Inval, 0));
        assert_eq!(errno(req(CMD_READ, 0, 0, 0), &S), (NbdErrno::Inval, 0));
        assert_eq!(errno(req(CMD_WRITE, 0, 0, 0), &S), (NbdErrno::Inval, 0));
        assert_eq!(
            errno(req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &S),
            (NbdErrno::Overflow, 0)
        );
        assert_eq!(
            errno(req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &S),
            (NbdErrno::Overflow, MAX_PAYLOAD + 1)
        );
        assert_eq!(
            errno(req(CMD_READ, 0, (1 << 20) - 1, 2), &S),
            (NbdErrno::Inval, 0)
        );
        assert_eq!(
            errno(req(CMD_WRITE, 0, (1 << 20) - 1, 2), &S),
            (NbdErrno::NoSpc, 2)
        );
        assert_eq!(
            errno(req(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &S),
            (NbdErrno::NoSpc, 0)
        );
        assert_eq!(
            errno(req(CMD_TRIM, 0, u64::MAX, 1), &S),
            (NbdErrno::Inval, 0)
        );
        assert_eq!(
            errno(req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &S),
            (NbdErrno::Inval, 0)
        );
        let ro = Session {
            read_only: true,
            ..S
        };
        assert_eq!(errno(req(CMD_WRITE, 0, 0, 512), &ro), (NbdErrno::Perm, 512));
        assert_eq!(errno(req(CMD_TRIM, 0, 0, 512), &ro), (NbdErrno::Perm, 0));
        let plain = Session {
            structured: false,
            base_allocation: false,
            ..S
        };
        assert_eq!(
            errno(req(CMD_BLOCK_STATUS, 0, 0, 512), &plain),
            (NbdErrno::Inval, 0)
        );
    }

    #[test]
    fn reply_encodings() {
        assert_eq!(
            simple_reply(7, 22),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        let mut out = Vec::new();
        offset_hole(&mut out, 7, true, 4096, 8192);
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 12, 0, 0, 0,
                0, 0, 0, 0x10, 0, 0, 0, 0x20, 0
            ]
        );
        out.clear();
        error_chunk(&mut out, 7, NbdErrno::Io, "disk");
        assert_eq!(
            &out[4..8],
            &[0, 1, 0x80, 1],
            "DONE flag, NBD_REPLY_TYPE_ERROR"
        );
        assert_eq!(&out[16..20], &[0, 0, 0, 10]);
        assert_eq!(&out[20..], &[0, 0, 0, 5, 0, 4, b'd', b'i', b's', b'k']);
        out.clear();
        block_status_chunk(
            &mut out,
            7,
            1,
            &[Extent {
                len: 4096,
                flags: 3,
            }],
        );
        assert_eq!(&out[20..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn zero_runs_split_and_merge() {
        let mut d = vec![0u8; 4 * 4096];
        d[4096 + 5] = 1;
        d[2 * 4096] = 9;
        assert_eq!(
            zero_runs(&d, 4096),
            vec![(0, 4096, true), (4096, 8192, false), (3 * 4096, 4096, true)]
        );
        assert_eq!(zero_runs(&[1u8; 100], 4096), vec![(0, 100, false)]);
    }
}
