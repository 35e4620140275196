//! On-disk journal records as pure code.
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `BMJ1` |
//! | 4 | kind: 1 data, 2 zero, 3 intent, 4 resync |
//! | 5..8 | reserved (0) |
//! | 8..16 | seq (u64 BE) |
//! | 16..24 | volume offset |
//! | 24..28 | length in bytes |
//! | 28..32 | crc32 of the data that follows (data records), else 0 |
//! | 32..40 | intent seq this record completes (data/zero), else 0 |
//! | 40..44 | crc32 of bytes 0..40 |
//! | 44..48 | reserved (0) |
//! | 48.. | data (data records only) |
//!
//! An intent is written before a write is submitted to the local disk; the data (or zero)
//! record that completes it names it. Intents left open by a crash mark ranges that may differ
//! from the mirror: they are re-read from the volume and journaled again (resync records).

pub const MAGIC: [u8; 4] = *b"BMJ1";
pub const HEADER_LEN: usize = 48;

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
        let crc = crc32fast::hash(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// None for anything that is not an intact header (a torn tail, garbage).
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN || b[0..4] != MAGIC {
            return None;
        }
        let crc = u32::from_be_bytes(b[40..44].try_into().ok()?);
        if crc != crc32fast::hash(&b[0..40]) {
            return None;
        }
        let kind = match b[4] {
            1 => Kind::Data,
            2 => Kind::Zero,
            3 => Kind::Intent,
            _ => return None,
        };
        Some(Header {
            kind,
            seq: u64::from_be_bytes(b[8..16].try_into().ok()?),
            offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
            len: u32::from_be_bytes(b[24..28].try_into().ok()?),
            data_crc: u32::from_be_bytes(b[28..32].try_into().ok()?),
            completes: u64::from_be_bytes(b[32..40].try_into().ok()?),
        })
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
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Some(h));
        assert_eq!(h.data_len(), 512);
        for i in 0..HEADER_LEN {
            let mut d = b;
            d[i] ^= 0x40;
            if (44..48).contains(&i) || (5..8).contains(&i) {
                continue; // reserved bytes are not covered
            }
            assert_eq!(Header::decode(&d), None, "flip at {i} must be caught");
        }
        assert_eq!(Header::decode(&b[..40]), None);
    }
}
