//! Thin wrappers over the Linux calls the emulator needs: network namespaces (`setns`), TUN
//! devices (`TUNSETIFF`), a monotonic nanosecond clock and timer slack.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where `ip netns add NAME` binds namespace NAME.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

pub(crate) fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Moves the calling thread into the network namespace behind `ns` (a file opened from
/// `/run/netns/NAME` or `/proc/self/ns/net`).
pub(crate) fn setns_net(ns: &File) -> io::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` with the calling thread inside network namespace `name`, then returns to the
/// namespace it was in (also when `f` fails). File descriptors opened by `f` (sockets, TUN
/// devices) stay bound to `name`.
pub(crate) fn in_netns<T>(name: &str, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(netns_path(name))
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
    setns_net(&target)?;
    let out = f();
    setns_net(&home).expect("cannot return to the original network namespace");
    out
}

/// Creates TUN device `name` (IFF_TUN | IFF_NO_PI: each read/write is one bare IP packet) in
/// the calling thread's network namespace. The device lives as long as the returned file.
pub(crate) fn open_tun(name: &str) -> io::Result<File> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back) one struct ifreq that outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO: no syscall).
#[inline]
pub(crate) fn now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Makes the calling thread's timed sleeps wake within ~1 ns of slack instead of the default
/// 50 µs, so that packets leave close to their due time.
pub(crate) fn tight_timer_slack() {
    let _ = nix::sys::prctl::set_timerslack(1);
}

/// Is `pid` alive (or a zombie)?
pub(crate) fn pid_alive(pid: i32) -> bool {
    // No signal: only checks existence and permission.
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

pub(crate) fn kill(pid: i32, sig: nix::sys::signal::Signal) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Command line of `pid`, arguments joined by spaces ("" when gone).
pub(crate) fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}
