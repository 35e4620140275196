//! How a daemon recognises its own volume: a fingerprint of the disk behind it, recorded in the
//! volume's state and checked at every start, so a blank replacement disk at the same path, a
//! restored old image, or another machine's disk is not taken for the volume the state
//! describes (promise I6).
//!
//! - A regular file is named by its inode number and its birth time (statx `btx_btime`, to the
//!   nanosecond): a file deleted and created again, or copied into place, is another file.
//!   The device number is recorded for the message only: it may change across reboots.
//! - A block device by its serial number or WWID (sysfs) and size; without either, by its
//!   device number and size.
//! - Changes made while the daemon was stopped: a regular file's ctime (which only the kernel
//!   sets, on every write or metadata change) is sealed at each clean stop (primary) or
//!   checkpoint (mirror) and compared at the next start.
//!
//! What it cannot catch (docs/IDENTITY.md): a block device overwritten in place while the
//! daemon was stopped (no change time on a device's content); a file changed after a crash
//! of the daemon (its seal is older than the daemon's own last writes); a file on a file
//! system without birth times (then only the inode number and size name it). The online
//! verify of the next release compares the data itself.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// What kind of disk a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskKind {
    File,
    Block,
    /// A simulated disk (the simulator and tests).
    Memory,
}

/// A moment as the kernel keeps it: seconds and nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub sec: i64,
    pub nsec: u32,
}

/// The identity of the disk behind a volume (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub kind: DiskKind,
    /// Files: the file system's device; block devices: the device itself (major:minor as one
    /// number). Shown, compared only for block devices without a serial.
    pub dev: u64,
    /// Files: the inode number.
    pub ino: u64,
    /// Files: when the inode was created (absent where the file system does not say).
    pub born: Option<Stamp>,
    /// Block devices: serial number or WWID.
    pub serial: Option<String>,
    pub size: u64,
    /// Files: the last change time, when it was read (see [`Fingerprint::changed_since`]).
    pub ctime: Option<Stamp>,
}

impl Fingerprint {
    /// Whether `other` is the same disk (the change time aside).
    pub fn same_disk(&self, other: &Fingerprint) -> bool {
        if self.kind != other.kind || self.size != other.size {
            return false;
        }
        match self.kind {
            DiskKind::File | DiskKind::Memory => {
                self.ino == other.ino && self.born == other.born && self.dev_if_no_birth(other)
            }
            DiskKind::Block => match (&self.serial, &other.serial) {
                (Some(a), Some(b)) => a == b,
                (None, None) => self.dev == other.dev,
                _ => false,
            },
        }
    }

    /// Without birth times, an inode number alone is weak: the device must match too.
    fn dev_if_no_birth(&self, other: &Fingerprint) -> bool {
        self.born.is_some() || self.dev == other.dev
    }

    /// Whether the disk's content may have changed since `sealed` was taken of it: a file's
    /// change time moved. Always false for block devices (they keep no change time).
    pub fn changed_since(&self, sealed: &Fingerprint) -> bool {
        match (self.kind, &self.ctime, &sealed.ctime) {
            (DiskKind::File | DiskKind::Memory, Some(now), Some(then)) => now != then,
            _ => false,
        }
    }

    /// One line for logs and status.
    pub fn describe(&self) -> String {
        match self.kind {
            DiskKind::Block => format!(
                "block device {}:{} serial {} ({} bytes)",
                self.dev >> 8,
                self.dev & 0xff,
                self.serial.as_deref().unwrap_or("none"),
                self.size
            ),
            DiskKind::File | DiskKind::Memory => format!(
                "file inode {} born {} ({} bytes)",
                self.ino,
                self.born
                    .map_or("unknown".into(), |b| format!("{}.{:09}", b.sec, b.nsec)),
                self.size
            ),
        }
    }
}

/// The fingerprint of an open volume.
pub fn of_file(file: &File, block_device: bool, size: u64) -> io::Result<Fingerprint> {
    use nix::sys::stat::{fstat, major, minor};
    let st = fstat(file)?;
    if block_device {
        let rdev = st.st_rdev;
        return Ok(Fingerprint {
            kind: DiskKind::Block,
            dev: (major(rdev) << 8) | (minor(rdev) & 0xff),
            ino: 0,
            born: None,
            serial: block_serial(major(rdev), minor(rdev)),
            size,
            ctime: None,
        });
    }
    Ok(Fingerprint {
        kind: DiskKind::File,
        dev: st.st_dev,
        ino: st.st_ino,
        born: birth_time(file),
        serial: None,
        size,
        ctime: Some(Stamp {
            sec: st.st_ctime,
            nsec: u32::try_from(st.st_ctime_nsec).unwrap_or(0),
        }),
    })
}

/// statx's birth time, where the file system keeps one.
fn birth_time(file: &File) -> Option<Stamp> {
    // SAFETY: statx writes only into `stx`, a plain struct we own; the path is the empty C
    // string with AT_EMPTY_PATH, so the call reads the open descriptor.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BTIME,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_BTIME != 0).then_some(Stamp {
        sec: stx.stx_btime.tv_sec,
        nsec: stx.stx_btime.tv_nsec,
    })
}

/// A block device's serial number or WWID from sysfs.
fn block_serial(major: u64, minor: u64) -> Option<String> {
    let base = format!("/sys/dev/block/{major}:{minor}");
    ["device/serial", "serial", "device/wwid", "wwid"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("{base}/{f}")).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(path: &std::path::Path) -> Fingerprint {
        let f = File::open(path).unwrap();
        let size = f.metadata().unwrap().len();
        of_file(&f, false, size).unwrap()
    }

    /// A file recreated at the same path (a blank replacement) is another disk; one written
    /// in place is the same disk whose content changed.
    #[test]
    fn a_recreated_file_is_another_disk_and_a_write_moves_its_change_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let first = fp(&path);
        assert_eq!(first.kind, DiskKind::File);
        assert!(first.same_disk(&fp(&path)));
        assert!(!fp(&path).changed_since(&first));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
            b"x",
            0,
        )
        .unwrap();
        let written = fp(&path);
        assert!(written.same_disk(&first), "written in place: same disk");
        assert!(written.changed_since(&first), "but its content changed");
        // Replaced: deleted and created again (a new inode, or at least a new birth time).
        let keep = dir.path().join("keep");
        std::fs::rename(&path, &keep).unwrap();
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        assert!(
            !fp(&path).same_disk(&first),
            "{:?} vs {:?}",
            fp(&path),
            first
        );
        // A different size is another disk too.
        let mut other = first.clone();
        other.size += 4096;
        assert!(!other.same_disk(&first));
    }
}
