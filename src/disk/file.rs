//! A volume backed by a regular file or a block device.
//!
//! Aligned I/O goes through an O_DIRECT descriptor (page cache bypassed, as on real volumes).
//! Requests that are not block-aligned go through a second, buffered descriptor of the same
//! file: the kernel's page cache then does the read-modify-write under its page locks, so two
//! unaligned writes sharing a block never undo each other, and the kernel keeps both descriptors
//! coherent (direct I/O writes back and invalidates cached pages in its range first).

use super::buf::ALIGN;
use super::spec::VolumeSpec;
use super::{DiskOp, Prepared, Storage};
use io_uring::{opcode, types};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("volume {name}: {path} does not exist (add size=SIZE to create it sparse)")]
    Missing { name: String, path: PathBuf },
    #[error(
        "volume {name}: {path} is {actual} bytes but size={wanted} was given; refusing to resize"
    )]
    SizeMismatch {
        name: String,
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
    #[error("volume {name}: {path} is neither a regular file nor a block device")]
    NotADisk { name: String, path: PathBuf },
    #[error("volume {name}: {path} is empty")]
    Empty { name: String, path: PathBuf },
    #[error("volume {name}: {path} is in use by another process (lock held)")]
    Locked { name: String, path: PathBuf },
    #[error("volume {name}: {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
}

pub struct FileStorage {
    direct: File,
    buffered: File,
    size: u64,
    read_only: bool,
    block_device: bool,
    direct_io: bool,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl FileStorage {
    pub fn open(spec: &VolumeSpec) -> Result<FileStorage, OpenError> {
        let (name, path) = (spec.name.clone(), spec.path.clone());
        let io_err = |source| OpenError::Io {
            name: name.clone(),
            path: path.clone(),
            source,
        };
        let exists = path.try_exists().map_err(io_err)?;
        if !exists {
            let Some(size) = spec.size.filter(|_| !spec.read_only) else {
                return Err(OpenError::Missing { name, path });
            };
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io_err)?;
            f.set_len(size).map_err(io_err)?;
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!spec.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let buffered = open(false).map_err(io_err)?;
        let meta = buffered.metadata().map_err(io_err)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(OpenError::NotADisk { name, path });
        }
        // One process per volume: a second server on the same disk would break every promise.
        if unsafe { libc::flock(buffered.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(OpenError::Locked { name, path });
            }
            return Err(io_err(e));
        }
        let size = if block_device {
            let mut sz: u64 = 0;
            if unsafe { libc::ioctl(buffered.as_raw_fd(), BLKGETSIZE64, &mut sz) } != 0 {
                return Err(io_err(io::Error::last_os_error()));
            }
            sz
        } else {
            meta.len()
        };
        if let Some(wanted) = spec.size.filter(|&w| w != size) {
            return Err(OpenError::SizeMismatch {
                name,
                path,
                actual: size,
                wanted,
            });
        }
        if size == 0 {
            return Err(OpenError::Empty { name, path });
        }
        let (direct, direct_io) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(volume = %name, path = %path.display(),
                    "file system refuses O_DIRECT; all I/O goes through the page cache");
                (buffered.try_clone().map_err(io_err)?, false)
            }
            Err(e) => return Err(io_err(e)),
        };
        Ok(FileStorage {
            direct,
            buffered,
            size,
            read_only: spec.read_only,
            block_device,
            direct_io,
        })
    }

    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// The descriptor for a transfer: O_DIRECT when offset, length and buffer all align.
    fn fd_for(&self, offset: u64, len: u32, buf: usize) -> types::Fd {
        let a = ALIGN as u64;
        let aligned = offset.is_multiple_of(a)
            && (len as u64).is_multiple_of(a)
            && (buf as u64).is_multiple_of(a);
        if self.direct_io && aligned {
            types::Fd(self.direct.as_raw_fd())
        } else {
            types::Fd(self.buffered.as_raw_fd())
        }
    }

    fn blk_ioctl(&self, req: libc::c_ulong, offset: u64, len: u32) -> i32 {
        // Block devices take whole 512-byte sectors here; the caller falls back for the rest.
        if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
            return -libc::EOPNOTSUPP;
        }
        let range: [u64; 2] = [offset, len as u64];
        if unsafe { libc::ioctl(self.direct.as_raw_fd(), req, &range) } != 0 {
            return -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
        }
        0
    }
}

impl Storage for FileStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn prepare(&self, op: DiskOp) -> Prepared {
        let entry = match op {
            DiskOp::Read { offset, buf, len } => {
                opcode::Read::new(self.fd_for(offset, len, buf as usize), buf, len)
                    .offset(offset)
                    .build()
            }
            DiskOp::Write {
                offset,
                buf,
                len,
                fua,
            } => {
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(self.fd_for(offset, len, buf as usize), buf, len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            DiskOp::Sync => opcode::Fsync::new(types::Fd(self.direct.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            DiskOp::Discard { offset, len } if self.block_device => {
                // Discard only whole sectors inside the range: TRIM is advisory.
                let start = offset.div_ceil(512) * 512;
                let end = (offset + len as u64) / 512 * 512;
                if end <= start {
                    return Prepared::Done(0);
                }
                return Prepared::Done(self.blk_ioctl(BLKDISCARD, start, (end - start) as u32));
            }
            DiskOp::Zero { offset, len, .. } if self.block_device => {
                return Prepared::Done(self.blk_ioctl(BLKZEROOUT, offset, len));
            }
            DiskOp::Discard { offset, len }
            | DiskOp::Zero {
                offset,
                len,
                punch: true,
            } => opcode::Fallocate::new(types::Fd(self.direct.as_raw_fd()), len as u64)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            DiskOp::Zero {
                offset,
                len,
                punch: false,
            } => opcode::Fallocate::new(types::Fd(self.direct.as_raw_fd()), len as u64)
                .offset(offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        Prepared::Submit(entry)
    }

    fn discard_reads_zero(&self) -> bool {
        // Hole punching zeroes; a device's discard may leave anything behind.
        !self.block_device
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let end = offset + len;
        if self.block_device {
            return Ok(vec![(len, false)]);
        }
        let fd = self.buffered.as_raw_fd();
        let seek = |pos: u64, whence| -> io::Result<Option<u64>> {
            let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
            if r >= 0 {
                return Ok(Some(r as u64));
            }
            match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            }
        };
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                out.push((data - pos, true));
                pos = data;
                continue;
            }
            let hole = seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            if hole <= pos {
                // A file system that cannot tell: report data.
                out.push((end - pos, false));
                break;
            }
            out.push((hole - pos, false));
            pos = hole;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_sparse_refuses_resize_and_second_opener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let spec: VolumeSpec = format!("v={},size=1M", path.display()).parse().unwrap();
        let s = FileStorage::open(&spec).unwrap();
        assert_eq!(s.size(), 1 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert!(matches!(
            FileStorage::open(&spec),
            Err(OpenError::Locked { .. })
        ));
        drop(s);
        let bigger: VolumeSpec = format!("v={},size=2M", path.display()).parse().unwrap();
        assert!(matches!(
            FileStorage::open(&bigger),
            Err(OpenError::SizeMismatch { .. })
        ));
        let missing: VolumeSpec = format!("v={}/nope", dir.path().display()).parse().unwrap();
        assert!(matches!(
            FileStorage::open(&missing),
            Err(OpenError::Missing { .. })
        ));
    }

    #[test]
    fn allocation_reports_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let spec: VolumeSpec = format!("v={},size=1M", path.display()).parse().unwrap();
        let s = FileStorage::open(&spec).unwrap();
        use std::os::unix::fs::FileExt;
        s.buffered.write_all_at(&[1u8; 4096], 64 << 10).unwrap();
        let ext = s.allocation(0, 1 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.0).sum::<u64>(), 1 << 20);
        assert!(
            ext.iter().any(|e| !e.1),
            "the written block is data: {ext:?}"
        );
        assert!(ext[0].1, "the start is a hole: {ext:?}");
    }
}
