//! Logs kept as numbered segment files in one directory (`<number><suffix>`), shared by the
//! primary's journal and the mirror's redo log: listing them in order, recycling retired ones
//! as spares, and making renames durable.

use crate::env::{FileSystem, Fs, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The files `<number><suffix>` in `dir` (created if missing), by number: the segments of a
/// log. Anything else in the directory is left alone.
pub fn numbered_segments(
    fs: &dyn FileSystem,
    dir: &Path,
    suffix: &str,
) -> io::Result<Vec<(u64, PathBuf)>> {
    fs.create_dir_all(dir)?;
    let mut names: Vec<(u64, PathBuf)> = fs
        .read_dir(dir)?
        .into_iter()
        .filter_map(|p| {
            let n = p
                .file_name()?
                .to_str()?
                .strip_suffix(suffix)?
                .parse()
                .ok()?;
            Some((n, p))
        })
        .collect();
    names.sort();
    // Opened for writing once, which tightens a file an older release left readable by
    // others (0644) to 0600: a spare or a segment read only at replay is otherwise not
    // reopened for writing until it is reused, and it holds replicated client data.
    for (_, path) in &names {
        drop(fs.open(path, OpenOptions::write())?);
    }
    Ok(names)
}

/// Retired segments of a log kept for reuse, as `<n>.spare` in its directory: overwriting a
/// file's allocated blocks costs the file system no allocation, and syncing them no metadata.
pub struct Spares {
    fs: Fs,
    dir: PathBuf,
    free: Vec<PathBuf>,
    next: u64,
    max: usize,
}

impl Spares {
    /// The spares `dir` holds, at most `max` of them (any others are deleted).
    pub fn load(fs: &Fs, dir: &Path, max: usize) -> io::Result<Spares> {
        let found = numbered_segments(&**fs, dir, ".spare")?;
        let next = found.last().map_or(0, |(n, _)| n + 1);
        let mut free = Vec::new();
        for (_, path) in found {
            if free.len() < max {
                free.push(path);
            } else {
                fs.remove_file(&path)?;
            }
        }
        Ok(Spares {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            free,
            next,
            max,
        })
    }

    /// Keep the retired segment `path` as a spare, or delete it when enough are kept.
    pub fn retire(&mut self, path: &Path) -> io::Result<()> {
        if self.free.len() >= self.max {
            return self.fs.remove_file(path);
        }
        let spare = self.dir.join(format!("{:020}.spare", self.next));
        self.next += 1;
        self.fs.rename(path, &spare)?;
        self.free.push(spare);
        Ok(())
    }

    /// Rename a spare to `path`, if there is one (the caller makes the rename durable).
    pub fn reuse_as(&mut self, path: &Path) -> io::Result<bool> {
        let Some(spare) = self.free.pop() else {
            return Ok(false);
        };
        self.fs.rename(&spare, path)?;
        Ok(true)
    }
}
