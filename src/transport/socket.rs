//! The UDP socket under quinn, with one change: a batch of datagrams handed to the kernel in
//! one send (GSO) never exceeds the 64 KiB a single UDP send may carry.
//!
//! quinn batches up to 10 datagrams per send whatever their size. With 1472-byte datagrams
//! that is 14 KiB; once MTU discovery finds a jumbo-frame or loopback path (9000 or 65 527
//! bytes) ten of them no longer fit one send, the kernel answers EMSGSIZE and every datagram of
//! the batch is lost. Here such a batch goes out as several sends instead.

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The most UDP payload one send may carry on IPv4 (65 535 minus IP and UDP headers); IPv6
/// allows 20 bytes more, so this bound holds for both.
pub const MAX_SEND_BYTES: usize = 65_507;

/// Wraps quinn's socket; see the module documentation.
#[derive(Debug)]
pub struct BoundedBatches(pub Arc<dyn AsyncUdpSocket>);

/// How a transmit of `len` bytes in datagrams of `segment` bytes is cut into sends: the
/// length of each send, in order.
pub fn send_sizes(len: usize, segment: usize) -> impl Iterator<Item = usize> {
    let per_send = (MAX_SEND_BYTES / segment.max(1)).max(1) * segment.max(1);
    let mut left = len;
    std::iter::from_fn(move || {
        (left > 0).then(|| {
            let n = left.min(per_send);
            left -= n;
            n
        })
    })
}

impl AsyncUdpSocket for BoundedBatches {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let segment = match transmit.segment_size {
            Some(s) if transmit.contents.len() > MAX_SEND_BYTES => s,
            _ => return self.0.try_send(transmit),
        };
        let mut at = 0;
        for (i, len) in send_sizes(transmit.contents.len(), segment).enumerate() {
            let contents = &transmit.contents[at..at + len];
            at += len;
            let part = Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents,
                segment_size: (len > segment).then_some(segment),
                src_ip: transmit.src_ip,
            };
            match self.0.try_send(&part) {
                Ok(()) => {}
                // Nothing went yet: quinn may retry the whole batch.
                Err(e) if i == 0 => return Err(e),
                // Part of the batch went: retrying it would send that part twice. The rest
                // counts as lost, and QUIC's loss recovery sends it again.
                Err(e) => {
                    tracing::debug!(
                        "UDP send cut short after {} of {} bytes: {e}",
                        at - len,
                        transmit.contents.len()
                    );
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cut_at_whole_datagrams_within_one_send() {
        // Ten 1472-byte datagrams fit one send.
        assert_eq!(send_sizes(14_720, 1472).collect::<Vec<_>>(), vec![14_720]);
        // Ten 9000-byte datagrams: seven per send (63 000 bytes), then three.
        assert_eq!(
            send_sizes(90_000, 9000).collect::<Vec<_>>(),
            vec![63_000, 27_000]
        );
        // Loopback-sized datagrams go one per send; a short last datagram stays whole.
        assert_eq!(
            send_sizes(65_000 * 2 + 100, 65_000).collect::<Vec<_>>(),
            vec![65_000, 65_000, 100]
        );
        for (len, seg) in [(1, 1), (123_457, 1200), (700_000, 65_507)] {
            let sizes: Vec<_> = send_sizes(len, seg).collect();
            assert_eq!(sizes.iter().sum::<usize>(), len);
            assert!(sizes.iter().all(|&n| n <= MAX_SEND_BYTES.max(seg)));
            assert!(sizes[..sizes.len() - 1].iter().all(|n| n % seg == 0));
        }
    }
}
