//! Serving a point of a mirror volume's history over NBD while replication goes on
//! (`blkmirror export`): a [`Storage`] whose reads are the volume as it was at the point
//! ([`MirrorVolume::read_point`]); `--writable` keeps writes in an overlay file of its own,
//! removed when the export ends, so the live mirror is never written. Each export pins its
//! point against retention and ends when the `blkmirror export` process that asked for it is
//! gone (it asks to stop on SIGTERM; a killed one is noticed within a second).

use crate::disk::fingerprint::Fingerprint;
use crate::disk::{DiskOp, Prepared, Storage};
use crate::repl::history::Point;
use crate::repl::mirror::MirrorVolume;
use std::collections::HashSet;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// The unit of the writable overlay (and the alignment the NBD server gives this storage's
/// operations: it reads and merges the edges of smaller writes itself).
const BLOCK: u64 = 4096;

/// A point of a volume's history as a disk.
pub struct PointInTime {
    volume: Arc<MirrorVolume>,
    point: Point,
    overlay: Option<Overlay>,
}

/// Writes to a writable export: blocks in a file of their own (unlinked at once: nothing is
/// left behind, even after a crash), and which blocks it holds.
struct Overlay {
    file: std::fs::File,
    written: Mutex<HashSet<u64>>,
}

impl PointInTime {
    /// `overlay_dir`: where a writable export keeps its writes (None: read-only).
    pub fn new(
        volume: Arc<MirrorVolume>,
        point: Point,
        overlay_dir: Option<&std::path::Path>,
    ) -> io::Result<PointInTime> {
        let overlay = match overlay_dir {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(format!("{}-{}.overlay", volume.name, point.set));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)?;
                std::fs::remove_file(&path)?;
                Some(Overlay {
                    file,
                    written: Mutex::new(HashSet::new()),
                })
            }
        };
        Ok(PointInTime {
            volume,
            point,
            overlay,
        })
    }

    pub fn point(&self) -> Point {
        self.point
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.volume.read_point(self.point.set, offset, out)?;
        let Some(o) = &self.overlay else {
            return Ok(());
        };
        let written = o.written.lock().unwrap();
        let end = offset + out.len() as u64;
        let mut b = offset / BLOCK;
        while b * BLOCK < end {
            if written.contains(&b) {
                let (from, to) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
                let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
                o.file.read_exact_at(dst, from)?;
            }
            b += 1;
        }
        Ok(())
    }

    /// A write to the overlay: whole blocks (the server aligns them), or zeroes.
    fn write(&self, offset: u64, data: Option<&[u8]>, len: u64) -> io::Result<()> {
        let o = self
            .overlay
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))?;
        let zeroes;
        let data = match data {
            Some(d) => d,
            None => {
                zeroes = vec![0u8; len as usize];
                &zeroes
            }
        };
        o.file.write_all_at(data, offset)?;
        let mut written = o.written.lock().unwrap();
        written.extend(offset / BLOCK..(offset + len).div_ceil(BLOCK));
        Ok(())
    }
}

fn done(r: io::Result<()>, len: u32) -> Prepared {
    match r {
        Ok(()) => Prepared::Done(len as i32),
        Err(e) => Prepared::Done(-e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

impl Storage for PointInTime {
    fn size(&self) -> u64 {
        self.volume.size
    }

    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }

    fn prepare(&self, op: DiskOp) -> Prepared {
        match op {
            DiskOp::Read { offset, buf, len } => {
                // SAFETY: the caller owns `buf` for `len` bytes until the op completes, which
                // it does here, before this returns.
                let out = unsafe { std::slice::from_raw_parts_mut(buf, len as usize) };
                done(self.read(offset, out), len)
            }
            DiskOp::Write {
                offset, buf, len, ..
            } => {
                // SAFETY: as above, for reading `buf`.
                let data = unsafe { std::slice::from_raw_parts(buf, len as usize) };
                done(self.write(offset, Some(data), u64::from(len)), len)
            }
            DiskOp::Sync => Prepared::Done(0),
            DiskOp::Discard { offset, len } | DiskOp::Zero { offset, len, .. } => {
                match self.write(offset, None, u64::from(len)) {
                    Ok(()) => Prepared::Done(0),
                    Err(e) => Prepared::Done(-e.raw_os_error().unwrap_or(libc::EIO)),
                }
            }
        }
    }

    fn discard_reads_zero(&self) -> bool {
        true
    }

    fn alignment(&self) -> u64 {
        BLOCK
    }

    fn sync_durable(&self) -> io::Result<()> {
        // The point never changes; a writable export's overlay is dropped at its end.
        Ok(())
    }

    fn read_sync(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.read(offset, out)
    }

    fn allocation(&self, _offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        Ok(vec![(len, false)])
    }

    fn fingerprint(&self) -> io::Result<Fingerprint> {
        Err(io::Error::other("a point in time has no disk of its own"))
    }
}
