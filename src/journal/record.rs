//! On-disk journal records as pure code.
//!
//! Version 2 (`BMJ2`, written now), 56-byte header:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `BMJ2` |
//! | 4 | kind: 1 data, 2 zero, 3 intent |
//! | 5..8 | reserved (0) |
//! | 8..16 | seq (u64 BE) |
//! | 16..24 | volume offset |
//! | 24..28 | length in bytes |
//! | 28..32 | crc32 of the data that follows (data records), else 0 |
//! | 32..40 | intent seq this record completes (data/zero), else 0 |
//! | 40..48 | when the write completed, Unix milliseconds (data/zero), else 0 |
//! | 48..52 | crc32 of bytes 0..48 |
//! | 52..56 | reserved (0) |
//! | 56.. | data (data records only) |
//!
//! Version 1 (`BMJ1`, still read): the same fields without the time, a 48-byte header whose
//! crc32 of bytes 0..40 sits at 40..44.
//!
//! An intent is written before a write is submitted to the local disk; the data (or zero)
//! record that completes it names it. Intents left open by a crash mark ranges that may differ
//! from the mirror: they are re-read from the volume and journaled again (resync records). The
//! completion time lets the mirror say how old the newest write it holds is, even for records
//! read back after a restart.

pub const MAGIC: [u8; 4] = *b"BMJ2";
pub const MAGIC_V1: [u8; 4] = *b"BMJ1";
/// Header length of the records written now.
pub const HEADER_LEN: usize = 56;
const V1_HEADER_LEN: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Data = 1,
    Zero = 2,
    Intent = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub data_crc: u32,
    pub completes: u64,
    /// Unix milliseconds when the write completed (0: not known, or an intent).
    pub time_ms: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b[28..32].copy_from_slice(&self.data_crc.to_be_bytes());
        b[32..40].copy_from_slice(&self.completes.to_be_bytes());
        b[40..48].copy_from_slice(&self.time_ms.to_be_bytes());
        let crc = crc32fast::hash(&b[0..48]);
        b[48..52].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// The intact header at the start of `b` and its length; None for anything else (a torn
    /// tail, garbage).
    pub fn decode(b: &[u8]) -> Option<(Header, usize)> {
        let magic = b.get(0..4)?;
        let (len, crc_at, covered) = if magic == MAGIC {
            (HEADER_LEN, 48, 48)
        } else if magic == MAGIC_V1 {
            (V1_HEADER_LEN, 40, 40)
        } else {
            return None;
        };
        let b = b.get(..len)?;
        let crc = u32::from_be_bytes(b[crc_at..crc_at + 4].try_into().ok()?);
        if crc != crc32fast::hash(&b[0..covered]) {
            return None;
        }
        let kind = match b[4] {
            1 => Kind::Data,
            2 => Kind::Zero,
            3 => Kind::Intent,
            _ => return None,
        };
        let u64_at =
            |i: usize| -> Option<u64> { Some(u64::from_be_bytes(b[i..i + 8].try_into().ok()?)) };
        Some((
            Header {
                kind,
                seq: u64_at(8)?,
                offset: u64_at(16)?,
                len: u32::from_be_bytes(b[24..28].try_into().ok()?),
                data_crc: u32::from_be_bytes(b[28..32].try_into().ok()?),
                completes: u64_at(32)?,
                time_ms: if len == HEADER_LEN { u64_at(40)? } else { 0 },
            },
            len,
        ))
    }

    /// Bytes of data that follow the header on disk.
    pub fn data_len(&self) -> usize {
        if self.kind == Kind::Data {
            self.len as usize
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let h = Header {
            kind: Kind::Data,
            seq: 7,
            offset: 4096,
            len: 512,
            data_crc: 99,
            completes: 6,
            time_ms: 1_700_000_000_123,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Some((h, HEADER_LEN)));
        assert_eq!(h.data_len(), 512);
        for i in 0..HEADER_LEN {
            let mut d = b;
            d[i] ^= 0x40;
            if (52..56).contains(&i) || (5..8).contains(&i) {
                continue; // reserved bytes are not covered
            }
            assert_eq!(Header::decode(&d), None, "flip at {i} must be caught");
        }
        assert_eq!(Header::decode(&b[..40]), None);
    }

    /// Records of the previous layout are still read (a journal written by an older release).
    #[test]
    fn version_1_headers_are_read() {
        let mut b = [0u8; 48];
        b[0..4].copy_from_slice(&MAGIC_V1);
        b[4] = 2;
        b[8..16].copy_from_slice(&9u64.to_be_bytes());
        b[16..24].copy_from_slice(&8192u64.to_be_bytes());
        b[24..28].copy_from_slice(&4096u32.to_be_bytes());
        b[32..40].copy_from_slice(&8u64.to_be_bytes());
        let crc = crc32fast::hash(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_be_bytes());
        let (h, len) = Header::decode(&b).unwrap();
        assert_eq!(len, 48);
        assert_eq!(
            h,
            Header {
                kind: Kind::Zero,
                seq: 9,
                offset: 8192,
                len: 4096,
                data_crc: 0,
                completes: 8,
                time_ms: 0,
            }
        );
    }
}
