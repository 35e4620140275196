//! What a change to a volume is, in the words every layer shares (journal, volume write path,
//! delta sets, frames, the applier): an [`Extent`] places a [`Payload`] at a byte offset.

use bytes::Bytes;

/// What an extent writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// These bytes.
    Data(Bytes),
    /// `Zero(len)`: the range reads as zeroes (write-zeroes / trim).
    Zero(u32),
}

impl Payload {
    /// Length in bytes of the range this payload covers.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Data(b) => b.len() as u64,
            Payload::Zero(n) => u64::from(*n),
        }
    }

    /// True if the payload covers no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sub-range `[from, to)` of this payload (relative offsets, `from <= to <= len`).
    /// Data is sliced without copying.
    pub(crate) fn slice(&self, from: u64, to: u64) -> Payload {
        debug_assert!(from <= to && to <= self.len());
        match self {
            // Bounds are <= b.len(), which is a usize, so the casts are lossless.
            Payload::Data(b) => Payload::Data(b.slice(from as usize..to as usize)),
            // to - from <= n, which is a u32.
            Payload::Zero(_) => Payload::Zero((to - from) as u32),
        }
    }
}

/// One write: `payload` placed at byte `offset` of the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub payload: Payload,
}

impl Extent {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.payload.len()
    }

    /// True if the extent covers no byte.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }

    /// One past the last byte (`offset + len`, saturating at `u64::MAX`).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len())
    }

    pub(crate) fn data_len(&self) -> u64 {
        match self.payload {
            Payload::Data(_) => self.len(),
            Payload::Zero(_) => 0,
        }
    }
}
