//! A small ICMP echo client (raw socket, run from inside one of the namespaces), so that tests
//! and scripts can check the link without iputils-ping being installed.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::Serialize;

use crate::sys::{in_netns, now_ns};

#[derive(Debug, Serialize)]
pub(crate) struct PingReport {
    pub from_ns: String,
    pub to: String,
    pub sent: u32,
    pub received: u32,
    pub duplicates: u32,
    pub loss: f64,
    pub rtt_min_ms: Option<f64>,
    pub rtt_avg_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
    /// Per echo request, in order: the RTT in ms, or null when no reply came.
    pub rtts_ms: Vec<Option<f64>>,
}

pub(crate) struct PingOpts {
    pub count: u32,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub size: usize,
    pub verbose: bool,
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn raw_icmp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_echo(fd: &OwnedFd, to: Ipv4Addr, id: u16, seq: u16, size: usize) -> io::Result<()> {
    let mut pkt = vec![0u8; 8 + size];
    pkt[0] = 8; // echo request
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in pkt[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let ck = checksum(&pkt);
    pkt[2..4].copy_from_slice(&ck.to_be_bytes());
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: buffer and address are valid for the call.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `count` echo requests from namespace `ns` to `to`, one every `interval_ms`, and waits
/// `timeout_ms` after the last one for stragglers.
pub(crate) fn ping(ns: &str, to: Ipv4Addr, o: &PingOpts) -> io::Result<PingReport> {
    let fd = in_netns(ns, raw_icmp_socket)?;
    let id = (std::process::id() ^ (now_ns() as u32 >> 7)) as u16;
    let count = o.count.clamp(1, 65535) as usize;
    let mut sent_at: Vec<u64> = Vec::with_capacity(count);
    let mut rtts: Vec<Option<f64>> = vec![None; count];
    let mut duplicates = 0u32;
    let interval = o.interval_ms * 1_000_000;
    let mut next_send = now_ns();
    let mut deadline = u64::MAX;
    let mut buf = [0u8; 4096];
    loop {
        let now = now_ns();
        if sent_at.len() < count && now >= next_send {
            let seq = sent_at.len() as u16;
            sent_at.push(now_ns());
            if let Err(e) = send_echo(&fd, to, id, seq, o.size) {
                if o.verbose {
                    eprintln!("send icmp_seq={seq}: {e}");
                }
            }
            next_send += interval;
            if sent_at.len() == count {
                deadline = now_ns() + o.timeout_ms * 1_000_000;
            }
            continue;
        }
        if now >= deadline || (sent_at.len() == count && rtts.iter().all(|r| r.is_some())) {
            break;
        }
        let until = if sent_at.len() < count {
            next_send
        } else {
            deadline
        };
        let wait_ms = until.saturating_sub(now).div_ceil(1_000_000).min(1000) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        if r <= 0 {
            continue;
        }
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            let got = now_ns();
            let pkt = &buf[..n as usize];
            if pkt.len() < 20 {
                continue;
            }
            let ihl = (pkt[0] & 0x0f) as usize * 4;
            let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
            let Some(icmp) = pkt.get(ihl..) else { continue };
            if src != to || icmp.len() < 8 || icmp[0] != 0 {
                continue;
            }
            if u16::from_be_bytes([icmp[4], icmp[5]]) != id {
                continue;
            }
            let seq = u16::from_be_bytes([icmp[6], icmp[7]]) as usize;
            if seq >= sent_at.len() {
                continue;
            }
            if rtts[seq].is_some() {
                duplicates += 1;
                continue;
            }
            let ms = (got - sent_at[seq]) as f64 / 1e6;
            rtts[seq] = Some(ms);
            if o.verbose {
                println!(
                    "{} bytes from {to}: icmp_seq={} time={ms:.3} ms",
                    icmp.len(),
                    seq + 1
                );
            }
        }
    }
    let got: Vec<f64> = rtts.iter().flatten().copied().collect();
    let received = got.len() as u32;
    let avg = (!got.is_empty()).then(|| got.iter().sum::<f64>() / got.len() as f64);
    Ok(PingReport {
        from_ns: ns.to_string(),
        to: to.to_string(),
        sent: count as u32,
        received,
        duplicates,
        loss: 1.0 - received as f64 / count as f64,
        rtt_min_ms: got.iter().copied().reduce(f64::min),
        rtt_avg_ms: avg,
        rtt_max_ms: got.iter().copied().reduce(f64::max),
        rtts_ms: rtts,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 §3: 0001 f203 f4f5 f6f7 sums to ddf2, so the checksum is !ddf2 = 220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(super::checksum(&data), 0x220d);
    }
}
