//! [`FileSystem`] over the real file system.

use super::{FileHandle, FileSystem, Handle, OpenOptions};
use bytes::Bytes;
use std::fs::{DirBuilder, File, Permissions};
use std::io::{self, IoSlice};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Owner only: logs and state hold or describe client data.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsFs;

/// Tighten a file or directory an older release created readable by others.
fn restrict(path: &Path, meta: &std::fs::Metadata, mode: u32) -> io::Result<()> {
    if meta.permissions().mode() & 0o777 != mode {
        std::fs::set_permissions(path, Permissions::from_mode(mode))?;
    }
    Ok(())
}

impl FileSystem for OsFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
        restrict(dir, &std::fs::metadata(dir)?, DIR_MODE)
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect()
    }

    fn open(&self, path: &Path, opts: OpenOptions) -> io::Result<Handle> {
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true)
                .write(opts.write)
                .create(opts.create)
                .truncate(opts.truncate)
                .mode(FILE_MODE);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let file = match open(opts.direct) {
            // Not every file system takes O_DIRECT (tmpfs): the page cache then.
            Err(e) if opts.direct && e.raw_os_error() == Some(libc::EINVAL) => open(false),
            r => r,
        }?;
        if opts.write {
            restrict(path, &file.metadata()?, FILE_MODE)?;
        }
        Ok(Arc::new(OsFile {
            file: Arc::new(file),
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
}

struct OsFile {
    /// Shared with the mappings handed out, which keep the file open.
    file: Arc<File>,
}

impl FileHandle for OsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        self.file.read_at(buf, at)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], at: u64) -> io::Result<usize> {
        let at = libc::off_t::try_from(at).map_err(io::Error::other)?;
        nix::sys::uio::pwritev(&*self.file, bufs, at).map_err(io::Error::from)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Mapped rather than read: the shipper sends journal records straight from the page cache
    /// (reading them back into buffers cost a copy per byte, 5 % of both daemons' CPU once the
    /// journal is at its cap). Logs are only appended to while mapped and never truncated
    /// below a mapped range, so a mapping cannot lose its pages; a file unlinked meanwhile
    /// stays readable until the last mapping goes. (What a mapping handles worse than a read:
    /// a disk error while a page is read back stops the daemon with SIGBUS.)
    fn map(&self, at: u64, len: usize) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        // SAFETY: see above; the mapping is read-only and lives as long as the Bytes sharing
        // it, which also keep the file open.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(at)
                .len(len)
                .map(&*self.file)?
        };
        Ok(Bytes::from_owner(MappedSpan {
            map,
            _file: self.file.clone(),
        }))
    }

    fn mapped(&self) -> bool {
        Arc::strong_count(&self.file) > 1
    }

    fn drop_cache(&self) {
        let _ = nix::fcntl::posix_fadvise(
            &*self.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// A mapped span of a file, kept open as long as the span lives.
struct MappedSpan {
    map: memmap2::Mmap,
    _file: Arc<File>,
}

impl AsRef<[u8]> for MappedSpan {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}
