//! A volume backed by a regular file or a block device.
//!
//! One I/O mode per file, never both: mixing O_DIRECT with page-cache I/O on one file can make
//! the kernel fail to invalidate cached pages, and it then reports EIO on the next fsync.
//!
//! - [`IoMode::Direct`] (the primary's volumes): every transfer is O_DIRECT and must be aligned
//!   to the file's direct-I/O alignment ([`Storage::alignment`]); the NBD connection reads
//!   unaligned requests through aligned bounce buffers and turns unaligned writes into a
//!   read-modify-write of the edge blocks under a range lock.
//! - [`IoMode::Buffered`] (the mirror's volumes, written in batches and synced per batch, and
//!   files that cannot do O_DIRECT): everything through the page cache.

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    Direct,
    Buffered,
}

pub struct FileStorage {
    file: File,
    /// Holds the volume's flock when `file` is a second (O_DIRECT) descriptor.
    _lock: Option<File>,
    size: u64,
    read_only: bool,
    block_device: bool,
    /// Offset and length alignment every transfer needs (1 when buffered).
    align: u64,
    /// Buffer address alignment direct transfers need.
    mem_align: usize,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKSSZGET: libc::c_ulong = 0x1268;
/// How long opening waits for a volume lock held by a process that is still exiting.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The O_DIRECT (offset, memory) alignment of an open file (statx STATX_DIOALIGN; block
/// devices: the logical sector size for both), or None when the kernel does not say.
fn dio_alignment(f: &File, block_device: bool) -> Option<(u64, usize)> {
    if block_device {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one c_int through the pointer, which is valid for it.
        let ok = unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET, &mut sector) } == 0;
        return (ok && sector > 0).then_some((sector as u64, sector as usize));
    }
    // SAFETY: statx is a plain C struct of integers; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: an empty, NUL-terminated path with AT_EMPTY_PATH names the open descriptor;
    // the kernel writes at most one statx into `stx`.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let ok = rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0;
    // Our buffers are page-aligned: fine for any memory alignment up to a page.
    let mem = stx.stx_dio_mem_align.max(1) as usize;
    (ok && mem <= ALIGN).then_some((stx.stx_dio_offset_align as u64, mem))
}

impl FileStorage {
    pub fn open(spec: &VolumeSpec, mode: IoMode) -> Result<FileStorage, OpenError> {
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
        // A process killed with io_uring requests in flight keeps its files (and this lock) for
        // a moment while the kernel tears its ring down: give a just-dead owner LOCK_WAIT.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match buffered.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
            }
            if std::time::Instant::now() > deadline {
                return Err(OpenError::Locked { name, path });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let size = if block_device {
            let mut sz: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for it.
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
        let mut file = buffered;
        let mut lock = None;
        let mut align = 1;
        let mut mem_align = 1;
        if mode == IoMode::Direct {
            match open(true) {
                Ok(direct) => {
                    match dio_alignment(&direct, block_device).or(Some((ALIGN as u64, ALIGN))) {
                        Some((a, m)) if size % a == 0 => {
                            mem_align = m;
                            // The flock belongs to the first descriptor's open file: keep it.
                            lock = Some(std::mem::replace(&mut file, direct));
                            align = a;
                        }
                        _ => tracing::warn!(volume = %name, size,
                        "volume size is not a multiple of the direct-I/O block; using the page cache"),
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(volume = %name, path = %path.display(),
                        "file system refuses O_DIRECT; all I/O goes through the page cache");
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(FileStorage {
            file,
            _lock: lock,
            size,
            read_only: spec.read_only,
            block_device,
            align,
            mem_align,
        })
    }

    pub fn direct_io(&self) -> bool {
        self.align > 1
    }

    /// A buffered write from the calling thread (page-cache copy, no waiting on the disk).
    /// Only for files opened without direct I/O.
    pub fn write_buffered(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        debug_assert!(!self.direct_io(), "write_buffered on a direct-I/O file");
        self.file.write_all_at(data, offset)
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Whether a write of `data` at `offset` can go to the file as it is (aligned for direct
    /// I/O, or buffered).
    pub fn takes_as_is(&self, offset: u64, data: &[u8]) -> bool {
        u32::try_from(data.len())
            .is_ok_and(|len| !self.misaligned(offset, len, data.as_ptr() as usize))
    }

    /// A transfer the file's mode cannot take (a caller bug, refused rather than risked).
    fn misaligned(&self, offset: u64, len: u32, buf: usize) -> bool {
        self.align > 1
            && !(offset.is_multiple_of(self.align)
                && (len as u64).is_multiple_of(self.align)
                && buf.is_multiple_of(self.mem_align))
    }

    fn blk_ioctl(&self, req: libc::c_ulong, offset: u64, len: u32) -> i32 {
        // Block devices take whole 512-byte sectors here; the caller falls back for the rest.
        if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
            return -libc::EOPNOTSUPP;
        }
        let range: [u64; 2] = [offset, len as u64];
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 (start, length) from the pointer.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), req, &range) } != 0 {
            return -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
        }
        0
    }
}

impl FileStorage {
    /// A second, read-only handle on the same open file (its lock stays with this one): for
    /// reading a volume while another thread owns this handle.
    pub fn reader(&self) -> std::io::Result<FileStorage> {
        Ok(FileStorage {
            file: self.file.try_clone()?,
            _lock: None,
            size: self.size,
            read_only: true,
            block_device: self.block_device,
            align: self.align,
            mem_align: self.mem_align,
        })
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
            DiskOp::Read { offset, buf, len } if self.misaligned(offset, len, buf as usize) => {
                return Prepared::Done(-libc::EINVAL);
            }
            DiskOp::Write {
                offset, buf, len, ..
            } if self.misaligned(offset, len, buf as usize) => {
                return Prepared::Done(-libc::EINVAL);
            }
            DiskOp::Read { offset, buf, len } => opcode::Read::new(self.fd(), buf, len)
                .offset(offset)
                .build(),
            DiskOp::Write {
                offset,
                buf,
                len,
                fua,
            } => {
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(self.fd(), buf, len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            DiskOp::Sync => opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
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
            } => opcode::Fallocate::new(types::Fd(self.file.as_raw_fd()), len as u64)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            DiskOp::Zero {
                offset,
                len,
                punch: false,
            } => opcode::Fallocate::new(types::Fd(self.file.as_raw_fd()), len as u64)
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

    fn alignment(&self) -> u64 {
        self.align
    }

    fn sync_durable(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_sync(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.align == 1 {
            return self.file.read_exact_at(out, offset);
        }
        let (start, end) = super::ranges::aligned_span(offset, out.len() as u64, self.align);
        let mut bounce = super::buf::AlignedBuf::new((end - start) as usize);
        let mut done = 0;
        while done < bounce.len() {
            // O_DIRECT needs aligned chunks; read_exact_at may split, so loop by hand.
            let n = self
                .file
                .read_at(&mut bounce[done..], start + done as u64)?;
            if n == 0 {
                bounce[done..].fill(0);
                break;
            }
            done += n;
        }
        let skip = (offset - start) as usize;
        out.copy_from_slice(&bounce[skip..skip + out.len()]);
        Ok(())
    }

    fn fingerprint(&self) -> io::Result<super::fingerprint::Fingerprint> {
        super::fingerprint::of_file(&self.file, self.block_device, self.size)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let end = offset + len;
        if self.block_device {
            return Ok(vec![(len, false)]);
        }
        let seek = |pos: u64, whence| -> io::Result<Option<u64>> {
            match nix::unistd::lseek(&self.file, pos as libc::off_t, whence) {
                Ok(r) => Ok(Some(r as u64)),
                Err(nix::errno::Errno::ENXIO) => Ok(None),
                Err(e) => Err(e.into()),
            }
        };
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = seek(pos, nix::unistd::Whence::SeekData)?
                .unwrap_or(end)
                .min(end);
            if data > pos {
                out.push((data - pos, true));
                pos = data;
                continue;
            }
            let hole = seek(pos, nix::unistd::Whence::SeekHole)?
                .unwrap_or(end)
                .min(end);
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
        let s = FileStorage::open(&spec, IoMode::Direct).unwrap();
        assert_eq!(s.size(), 1 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert!(matches!(
            FileStorage::open(&spec, IoMode::Direct),
            Err(OpenError::Locked { .. })
        ));
        drop(s);
        let bigger: VolumeSpec = format!("v={},size=2M", path.display()).parse().unwrap();
        assert!(matches!(
            FileStorage::open(&bigger, IoMode::Direct),
            Err(OpenError::SizeMismatch { .. })
        ));
        let missing: VolumeSpec = format!("v={}/nope", dir.path().display()).parse().unwrap();
        assert!(matches!(
            FileStorage::open(&missing, IoMode::Direct),
            Err(OpenError::Missing { .. })
        ));
    }

    #[test]
    fn allocation_reports_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let spec: VolumeSpec = format!("v={},size=1M", path.display()).parse().unwrap();
        let s = FileStorage::open(&spec, IoMode::Buffered).unwrap();
        use std::os::unix::fs::FileExt;
        s.file.write_all_at(&[1u8; 4096], 64 << 10).unwrap();
        let ext = s.allocation(0, 1 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.0).sum::<u64>(), 1 << 20);
        assert!(
            ext.iter().any(|e| !e.1),
            "the written block is data: {ext:?}"
        );
        assert!(ext[0].1, "the start is a hole: {ext:?}");
    }
}
