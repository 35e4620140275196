//! File I/O behind one small trait, so the logs and state files of both daemons run over the
//! real file system in production ([`OsFs`]) and over an in-memory one that models what a crash
//! keeps ([`mem::MemFs`]) in the simulator and in tests (tikv's raft-engine keeps its
//! `FileSystem` trait in `src/env/` for the same reason).
//!
//! What goes through it: the primary's journal, the mirror's redo log, the segment helpers they
//! share, and the small state files (volume state, identity and generations). Volumes do not:
//! they are disks, reached through [`crate::disk::Storage`].
//!
//! The contract the callers rely on, and the one `MemFs` enforces at a crash:
//! - data written to a file is durable only after `sync_data` on that file;
//! - a name created, renamed or removed is durable only after `sync_dir` on its directory;
//! - until then a crash may keep any prefix of a directory's changes, and any mix of the old and
//!   the new content of a file's unsynced blocks (torn at sector boundaries).

#[cfg(any(test, feature = "test-hooks"))]
pub mod mem;
mod os;

pub use os::OsFs;

use bytes::Bytes;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file system shared by everything one daemon opens.
pub type Fs = Arc<dyn FileSystem>;
/// An open file.
pub type Handle = Arc<dyn FileHandle>;

/// How to open a file. Files are created with mode 0600: logs and state hold client data or
/// describe it, and no other local user may read them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    pub write: bool,
    pub create: bool,
    pub truncate: bool,
    /// Bypass the page cache where the file system allows it (O_DIRECT): every transfer must
    /// then be whole, block-aligned blocks from block-aligned memory.
    pub direct: bool,
}

impl OpenOptions {
    pub fn read() -> Self {
        OpenOptions::default()
    }

    pub fn write() -> Self {
        OpenOptions {
            write: true,
            ..OpenOptions::default()
        }
    }

    pub fn create(mut self) -> Self {
        self.create = true;
        self.write = true;
        self
    }

    pub fn truncate(mut self) -> Self {
        self.truncate = true;
        self
    }

    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }
}

/// What the logs and state files need of a file system.
pub trait FileSystem: Send + Sync {
    /// Create `dir` and its parents; the directory itself is readable by its owner only (0700).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The entries of `dir` (files and directories), in no particular order.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    fn open(&self, path: &Path, opts: OpenOptions) -> io::Result<Handle>;
    /// The whole content of a file (NotFound if it does not exist).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Make the entries of `dir` (names created, renamed, removed) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> io::Result<bool>;
}

/// An open file. Positions are explicit: a failed or short write never moves where the next
/// one lands (a cursor that moved past a half-written record once made the journal reuse
/// sequence numbers the mirror already held).
pub trait FileHandle: Send + Sync {
    fn size(&self) -> io::Result<u64>;
    /// Read up to `buf.len()` bytes at `at`; 0 at the end of the file.
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize>;
    /// Write some of `bufs` at `at`; returns how many bytes.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], at: u64) -> io::Result<usize>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Make the content written so far durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// `len` bytes at `at` as shared bytes: mapped from the page cache on a real file (no
    /// copy), copied in memory. The bytes stay valid after the file is removed.
    fn map(&self, at: u64, len: usize) -> io::Result<Bytes>;
    /// Whether bytes handed out by `map` are still alive (the file must then not be reused).
    fn mapped(&self) -> bool;
    /// Hint that the cached pages of the file will not be read again.
    fn drop_cache(&self) {}
}

/// Write all of `bufs` at `at`; returns the bytes written. A short write continues where it
/// stopped.
pub fn write_all_vectored_at(
    file: &dyn FileHandle,
    mut bufs: &mut [IoSlice<'_>],
    at: u64,
) -> io::Result<u64> {
    let mut pos = at;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match file.write_vectored_at(bufs, pos) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                pos += n as u64;
                IoSlice::advance_slices(&mut bufs, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(pos - at)
}

/// Write all of `data` at `at`.
pub fn write_all_at(file: &dyn FileHandle, data: &[u8], at: u64) -> io::Result<()> {
    write_all_vectored_at(file, &mut [IoSlice::new(data)], at).map(|_| ())
}

/// Fill `out` from `file` at `at`; a file that ends first is an error.
pub fn read_exact_at(file: &dyn FileHandle, out: &mut [u8], at: u64) -> io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        match file.read_at(&mut out[done..], at + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file ends before the range read",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Make `data`, the start of `file` as read back at open, durable: written again, then synced.
/// Syncing alone is not enough after a sync that failed before a restart: Linux marks the
/// pages whose writeback failed clean, so they would stay off the disk whatever a later sync
/// says, a hole before whatever is appended next.
pub fn write_back_and_sync(file: &dyn FileHandle, data: &[u8]) -> io::Result<()> {
    write_all_at(file, data, 0)?;
    file.sync_data()
}

/// The whole content of an open file.
pub fn read_all(file: &dyn FileHandle) -> io::Result<Vec<u8>> {
    let len = usize::try_from(file.size()?).map_err(io::Error::other)?;
    let mut data = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut data[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(done);
    Ok(data)
}

/// Replace `path` with `data` atomically and durably: a temporary file, synced, renamed over
/// the old one, then the directory synced. A crash leaves the old content or the new, never a
/// mix.
pub fn write_atomic(fs: &dyn FileSystem, path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no directory", path.display())))?;
    fs.create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = fs.open(&tmp, OpenOptions::write().create().truncate())?;
    write_all_at(&*file, data, 0)?;
    file.sync_data()?;
    drop(file);
    fs.rename(&tmp, path)?;
    fs.sync_dir(dir)
}

/// Room kept in a daemon's state directory for its small state files (`STATE/reserve`, 1 MiB
/// of zeros). The journal shares that file system and can fill it (an undersized disk, the
/// mirror away): then the one state write that lets replication resume, and so lets the
/// journal shrink, would fail for want of a few kilobytes, for good. On ENOSPC the reserve is
/// given back and the write tried once more; it is made again at the next start.
pub struct Reserve {
    fs: Fs,
    path: PathBuf,
}

/// Bytes of the reserve: many times the state files written before space can come back.
pub const RESERVE_BYTES: usize = 1 << 20;

/// Remove every file directly in `dir` (a role's logs when a volume changes role) and sync the
/// directory; a missing directory is already empty. Subdirectories are left alone.
pub fn remove_files_in(fs: &dyn FileSystem, dir: &Path) -> io::Result<usize> {
    let entries = match fs.read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for path in entries {
        match fs.remove_file(&path) {
            Ok(()) => removed += 1,
            // A subdirectory (remove_file refuses it), or gone meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) if fs.read_dir(&path).is_ok() => {}
            Err(e) => return Err(e),
        }
    }
    if removed > 0 {
        fs.sync_dir(dir)?;
    }
    Ok(removed)
}

fn out_of_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull
}

impl Reserve {
    pub fn new(fs: Fs, state_dir: &Path) -> Reserve {
        Reserve {
            fs,
            path: state_dir.join("reserve"),
        }
    }

    /// Make the reserve if it is missing (an error when there is no room for it).
    pub fn ensure(&self) -> io::Result<()> {
        if self.fs.exists(&self.path)? {
            return Ok(());
        }
        write_atomic(&*self.fs, &self.path, &vec![0u8; RESERVE_BYTES])
    }

    /// `write`, and once more after giving the reserve back if it failed for want of space.
    pub fn write_through<T>(&self, mut write: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        match write() {
            Err(e) if out_of_space(&e) && self.fs.exists(&self.path).unwrap_or(false) => {
                self.fs.remove_file(&self.path)?;
                if let Some(dir) = self.path.parent() {
                    self.fs.sync_dir(dir)?;
                }
                tracing::warn!(path = %self.path.display(),
                    "the state directory is full: its reserve was given back so that state can be saved (it is made again at the next start; free space on this file system)");
                write()
            }
            other => other,
        }
    }
}

/// The real file system.
pub fn os() -> Fs {
    Arc::new(OsFs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same contract on both implementations.
    fn contract(fs: &dyn FileSystem, dir: &Path) {
        let d = dir.join("a/b");
        fs.create_dir_all(&d).unwrap();
        let p = d.join("f");
        assert!(!fs.exists(&p).unwrap());
        let f = fs.open(&p, OpenOptions::write().create()).unwrap();
        write_all_vectored_at(
            &*f,
            &mut [IoSlice::new(b"hello "), IoSlice::new(b"world")],
            0,
        )
        .unwrap();
        write_all_at(&*f, b"W", 6).unwrap();
        assert_eq!(f.size().unwrap(), 11);
        assert_eq!(&f.map(6, 5).unwrap()[..], b"World");
        f.sync_data().unwrap();
        assert_eq!(read_all(&*f).unwrap(), b"hello World");
        f.set_len(5).unwrap();
        assert_eq!(fs.read(&p).unwrap(), b"hello");
        let q = d.join("g");
        fs.rename(&p, &q).unwrap();
        fs.sync_dir(&d).unwrap();
        assert!(!fs.exists(&p).unwrap());
        assert_eq!(fs.read(&q).unwrap(), b"hello");
        let names: Vec<PathBuf> = fs.read_dir(&d).unwrap();
        assert_eq!(names, vec![q.clone()]);
        write_atomic(fs, &d.join("state.json"), b"{}").unwrap();
        assert_eq!(fs.read(&d.join("state.json")).unwrap(), b"{}");
        assert!(!fs.exists(&d.join("state.json.tmp")).unwrap());
        fs.remove_file(&q).unwrap();
        assert_eq!(
            fs.read(&q).unwrap_err().kind(),
            io::ErrorKind::NotFound,
            "removed"
        );
    }

    #[test]
    fn a_full_file_system_gives_the_reserve_back_for_state() {
        use mem::{Faults, MemFs};
        let m = MemFs::new();
        let fs: Fs = Arc::new(m.clone());
        let dir = Path::new("/state");
        let reserve = Reserve::new(fs.clone(), dir);
        reserve.ensure().unwrap();
        m.set_faults(Faults {
            capacity: Some(m.used_bytes()),
            ..Faults::default()
        });
        let state = dir.join("volumes/v.json");
        let e = write_atomic(&*fs, &state, b"{}").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        reserve
            .write_through(|| write_atomic(&*fs, &state, b"{\"a\": 1}"))
            .expect("saved in the reserve's room");
        assert_eq!(fs.read(&state).unwrap(), b"{\"a\": 1}");
        assert!(!fs.exists(&dir.join("reserve")).unwrap());
        // Given back once: a second failure is the caller's to see.
        let big = vec![1u8; 2 * RESERVE_BYTES];
        assert!(reserve
            .write_through(|| write_atomic(&*fs, &dir.join("big"), &big))
            .is_err());
    }
    #[test]
    fn os_and_memory_file_systems_keep_the_same_contract() {
        let dir = tempfile::tempdir().unwrap();
        contract(&OsFs, dir.path());
        contract(&mem::MemFs::new(), Path::new("/state"));
    }

    #[test]
    fn os_files_and_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("journal/vol1");
        OsFs.create_dir_all(&d).unwrap();
        let f = d.join("1.jnl");
        drop(OsFs.open(&f, OpenOptions::write().create()).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&f), 0o600);
        // Files and directories an older release left readable are tightened when reused.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        OsFs.create_dir_all(&d).unwrap();
        drop(OsFs.open(&f, OpenOptions::write()).unwrap());
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&f), 0o600);
    }
}
