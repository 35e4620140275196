//! Reading and writing whole replication messages on a QUIC stream.

use super::frame::{self, EncodeStats, FrameError, Message};
use crate::disk::buf::{align_up, BlockBytes, SharedPool};
use quinn::{RecvStream, SendStream};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream closed")]
    Closed,
    #[error("stream ended in the middle of a message ({0} bytes read)")]
    Truncated(usize),
    #[error("bad message: {0}")]
    Frame(#[from] FrameError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
}

/// The next whole message and its raw bytes (kept for the redo log, which writes them from
/// this block-aligned memory without a copy; the message's data refers to them rather than
/// copying); None at a clean end. The memory comes from `pool` and goes back to it when the
/// last reference to the message is dropped.
pub async fn read_message(
    recv: &mut RecvStream,
    pool: &Arc<SharedPool>,
) -> Result<Option<(Message, BlockBytes)>, StreamError> {
    let mut head = [0u8; frame::PREFIX_LEN];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => return Err(StreamError::Truncated(n)),
        Err(e) => return Err(e.into()),
    }
    let body_len = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes"));
    if body_len > frame::MAX_MESSAGE {
        return Err(FrameError::TooLarge(body_len).into());
    }
    let total = frame::PREFIX_LEN + body_len as usize;
    // Chunks as quinn holds them, copied once: no zero-filling of a buffer about to be
    // overwritten.
    let mut raw = pool.get(align_up(total));
    raw.set_len(total);
    raw[..head.len()].copy_from_slice(&head);
    let mut filled = head.len();
    while filled < total {
        let chunk = recv
            .read_chunk(total - filled, true)
            .await
            .map_err(|e| StreamError::Read(quinn::ReadExactError::ReadError(e)))?;
        match chunk {
            Some(c) => {
                raw[filled..filled + c.bytes.len()].copy_from_slice(&c.bytes);
                filled += c.bytes.len();
            }
            None => return Err(StreamError::Truncated(filled)),
        }
    }
    let raw = BlockBytes::new(raw, total);
    Ok(Some((frame::decode_frame(&raw.to_bytes())?, raw)))
}

pub async fn write_message(
    send: &mut SendStream,
    msg: &Message,
) -> Result<EncodeStats, StreamError> {
    let mut buf = Vec::new();
    let stats = frame::encode(msg, &mut buf);
    send.write_all(&buf).await?;
    Ok(stats)
}
