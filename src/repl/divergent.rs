//! Writes a side gave up, kept (docs/FAILOVER.md): before a failback or `resolve
//! --discard-local` makes a volume a secondary of its peer, the regions where it holds
//! writes of its own (its divergent tail: what the peer never got) are copied out of the
//! volume, so that no resolution destroys data. `blkmirror divergent` lists them and serves
//! one over NBD.
//!
//! Layout: `STATE/divergent/ID/` (mode 0700) with `NAME.img`, a sparse image of the volume's
//! size holding those regions at their offsets (holes elsewhere), and `saved.json`, which
//! names the ranges. The image is synced before the JSON is written (atomically), and the
//! JSON before the role change that may overwrite the regions: a saved tail whose JSON
//! exists is whole.

use crate::env::{write_all_at, write_atomic, FileSystem, OpenOptions};
use crate::repl::identity::GenId;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Bytes copied per read of the volume.
const COPY_PIECE: u64 = 1 << 20;
const META: &str = "saved.json";
/// The saves of a failback or `resolve` under way, before its role change is under an
/// intent: a stop in between leaves them to be removed by the next attempt.
const PENDING: &str = "pending.json";

/// One saved divergent tail (`saved.json`; its keys are a contract of `blkmirror divergent
/// --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub id: String,
    pub volume: String,
    /// When it was saved (Unix ms, this host's clock).
    pub time_ms: u64,
    /// What gave the writes up (`failback`, `resolve --discard-local`).
    pub why: String,
    /// The last state both sides held: the saved writes came after it.
    pub parted_gen: GenId,
    pub parted_seq: u64,
    /// The volume's size (the image's).
    pub size: u64,
    /// `(offset, length)` of every saved range, in offset order.
    pub ranges: Vec<(u64, u64)>,
    pub bytes: u64,
    /// The image's file name in the saved tail's directory.
    pub image: String,
}

impl Saved {
    pub fn image_path(&self, state_dir: &Path) -> PathBuf {
        dir(state_dir).join(&self.id).join(&self.image)
    }
}

/// Where saved tails live.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("divergent")
}

/// What [`save`] is told about the tail.
pub struct Tail<'a> {
    pub volume: &'a str,
    pub size: u64,
    pub why: &'a str,
    pub parted: (GenId, u64),
    pub ranges: &'a [(u64, u64)],
    pub time_ms: u64,
}

/// Copy `tail.ranges` of the volume (read through `read`, which fills the buffer from that
/// offset) into a new saved tail, durably.
pub fn save(
    fs: &dyn FileSystem,
    state_dir: &Path,
    tail: &Tail<'_>,
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Saved> {
    let root = dir(state_dir);
    fs.create_dir_all(&root)?;
    // Saves a crash cut short (no JSON: their role change never happened) go first: a crash
    // loop must not fill the file system with half images.
    for d in fs.read_dir(&root)? {
        if d.ends_with(PENDING) {
            continue;
        }
        if !fs.exists(&d.join(META))? && crate::env::remove_files_in(fs, &d)? > 0 {
            tracing::warn!(dir = %d.display(), "removed a save of divergent writes a stop cut short");
        }
    }
    let base = format!("{}-{}-{}", tail.volume, tail.time_ms, tail.parted.0);
    let mut id = base.clone();
    // Two saves in one millisecond (a retried failback) keep both.
    let mut n = 1;
    while fs.exists(&root.join(&id).join(META))? {
        n += 1;
        id = format!("{base}.{n}");
    }
    let here = root.join(&id);
    fs.create_dir_all(&here)?;
    let result = save_into(fs, &root, &here, id, tail, read);
    if result.is_err() {
        // A save cut short (a full file system) leaves no half image behind to fill it more.
        let _ = crate::env::remove_files_in(fs, &here);
    }
    result
}

fn save_into(
    fs: &dyn FileSystem,
    root: &Path,
    here: &Path,
    id: String,
    tail: &Tail<'_>,
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<Saved> {
    let image = format!("{}.img", tail.volume);
    let file = fs.open(&here.join(&image), OpenOptions::write().create().truncate())?;
    file.set_len(tail.size)?;
    let mut buf = vec![0u8; COPY_PIECE as usize];
    let mut bytes = 0;
    for &(offset, len) in tail.ranges {
        assert!(offset + len <= tail.size, "a range past the volume's end");
        let mut at = offset;
        while at < offset + len {
            let n = COPY_PIECE.min(offset + len - at);
            let b = &mut buf[..n as usize];
            read(at, b)?;
            write_all_at(&*file, b, at)?;
            at += n;
        }
        bytes += len;
    }
    file.sync_data()?;
    let saved = Saved {
        id,
        volume: tail.volume.to_string(),
        time_ms: tail.time_ms,
        why: tail.why.to_string(),
        parted_gen: tail.parted.0,
        parted_seq: tail.parted.1,
        size: tail.size,
        ranges: tail.ranges.to_vec(),
        bytes,
        image,
    };
    let json = serde_json::to_vec_pretty(&saved).map_err(io::Error::other)?;
    write_atomic(fs, &here.join(META), &json)?;
    fs.sync_dir(root)?;
    Ok(saved)
}

/// Note `ids` as the saves of a failback or `resolve` whose role change is not under an
/// intent yet (None: it is now, or it ended).
pub fn note_pending(
    fs: &dyn FileSystem,
    state_dir: &Path,
    ids: Option<&[String]>,
) -> io::Result<()> {
    let path = dir(state_dir).join(PENDING);
    match ids {
        Some(ids) => {
            let json = serde_json::to_vec(ids).map_err(io::Error::other)?;
            write_atomic(fs, &path, &json)
        }
        None => match fs.remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => fs.sync_dir(&dir(state_dir)),
        },
    }
}

/// Remove the saves a failback or `resolve` cut short left (see [`note_pending`]).
pub fn remove_pending(fs: &dyn FileSystem, state_dir: &Path) -> io::Result<()> {
    let ids: Vec<String> = match fs.read(&dir(state_dir).join(PENDING)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for id in &ids {
        tracing::warn!(saved = %id, "removing a save whose role change never happened");
        remove(fs, state_dir, id)?;
    }
    note_pending(fs, state_dir, None)
}

/// Remove saved tail `id` (one whose role change did not happen: a failback of several
/// volumes that failed part-way saves them all again at its next attempt).
pub fn remove(fs: &dyn FileSystem, state_dir: &Path, id: &str) -> io::Result<()> {
    let here = dir(state_dir).join(id);
    // The JSON first: a stop in the middle leaves an incomplete save, removed at the next.
    match fs.remove_file(&here.join(META)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::env::remove_files_in(fs, &here)?;
    fs.sync_dir(&dir(state_dir))
}

/// Every saved tail in `state_dir`, oldest first. A directory without its JSON (a save cut
/// short by a crash) is not listed: its role change never happened.
pub fn list(fs: &dyn FileSystem, state_dir: &Path) -> io::Result<Vec<Saved>> {
    let root = dir(state_dir);
    let entries = match fs.read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for d in entries {
        if d.ends_with(PENDING) {
            continue;
        }
        if let Some(saved) = read_meta(fs, &d)? {
            out.push(saved);
        }
    }
    out.sort_by(|a, b| (a.time_ms, &a.id).cmp(&(b.time_ms, &b.id)));
    Ok(out)
}

/// Saved tail `id` of `state_dir`, if it is there whole.
pub fn find(fs: &dyn FileSystem, state_dir: &Path, id: &str) -> io::Result<Option<Saved>> {
    read_meta(fs, &dir(state_dir).join(id))
}

/// The `saved.json` of the saved tail in `here` (None: not there, or a save cut short).
fn read_meta(fs: &dyn FileSystem, here: &Path) -> io::Result<Option<Saved>> {
    let path = here.join(META);
    let bytes = match fs.read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// Serve saved tail `id` of `state_dir` read-only over NBD at `socket` (export name: the
/// volume's) until SIGINT or SIGTERM.
pub fn serve(state_dir: &Path, id: &str, socket: &Path) -> Result<(), String> {
    let fs = crate::env::os();
    let saved = find(&*fs, state_dir, id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "no saved divergent writes named {id:?} in {}",
                dir(state_dir).display()
            )
        })?;
    let signals = crate::daemon::Signals::block().map_err(|e| e.to_string())?;
    let spec = crate::disk::spec::VolumeSpec {
        name: saved.volume.clone(),
        path: saved.image_path(state_dir),
        size: None,
        read_only: true,
    };
    let storage = crate::disk::file::FileStorage::open(&spec, crate::disk::file::IoMode::Buffered)
        .map_err(|e| e.to_string())?;
    let export = crate::nbd::server::Export {
        info: crate::nbd::handshake::ExportInfo {
            name: saved.volume.clone(),
            size: saved.size,
            read_only: true,
            description: format!(
                "{}: {} bytes of writes given up ({})",
                saved.volume, saved.bytes, saved.why
            ),
        },
        volume: std::sync::Arc::new(crate::volume::Volume {
            name: saved.volume.clone(),
            storage: std::sync::Arc::new(storage),
            journal: None,
            locks: std::sync::Arc::new(crate::disk::ranges::RangeLocks::new()),
        }),
    };
    let limits = crate::nbd::server::Limits {
        max_connections: crate::nbd::server::DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: crate::nbd::server::DEFAULT_HANDSHAKE_TIMEOUT,
    };
    let server = crate::nbd::server::Server::new(vec![export], limits);
    let (listener, _file) = crate::daemon::bind_unix(socket).map_err(|e| e.to_string())?;
    server.spawn_unix(listener).map_err(|e| e.to_string())?;
    tracing::info!(id, socket = %socket.display(), "serving the saved divergent writes (read-only)");
    let sig = signals.wait_for_termination().map_err(|e| e.to_string())?;
    tracing::info!(signal = %sig, "stopping");
    server.shutdown(std::time::Duration::from_secs(5));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::mem::MemFs;

    #[test]
    fn a_saved_tail_holds_its_ranges_and_is_listed() {
        let fs = MemFs::new();
        let state = Path::new("/s");
        let volume: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let ranges = [(4096u64, 8192u64), (1 << 19, 4096)];
        let tail = Tail {
            volume: "v",
            size: volume.len() as u64,
            why: "failback",
            parted: (GenId(0xab), 77),
            ranges: &ranges,
            time_ms: 1_000,
        };
        let mut read = |at: u64, b: &mut [u8]| {
            b.copy_from_slice(&volume[at as usize..at as usize + b.len()]);
            Ok(())
        };
        let saved = save(&fs, state, &tail, &mut read).unwrap();
        assert_eq!(saved.bytes, 12288);
        let again = save(&fs, state, &tail, &mut read).unwrap();
        assert_ne!(saved.id, again.id, "a second save keeps the first");
        assert_eq!(
            list(&fs, state).unwrap(),
            vec![saved.clone(), again.clone()]
        );
        let image = fs.read(&saved.image_path(state)).unwrap();
        assert_eq!(image.len(), volume.len());
        for &(o, l) in &ranges {
            let r = o as usize..(o + l) as usize;
            assert_eq!(image[r.clone()], volume[r]);
        }
        assert!(
            image[..4096].iter().all(|&b| b == 0),
            "outside the ranges: holes"
        );
        // A failback of several volumes cut short before its intent: its saves are pending,
        // and the next attempt removes them (and only them) before saving again.
        note_pending(&fs, state, Some(std::slice::from_ref(&again.id))).unwrap();
        remove_pending(&fs, state).unwrap();
        assert_eq!(list(&fs, state).unwrap(), vec![saved.clone()]);
        remove_pending(&fs, state).unwrap();
        assert_eq!(list(&fs, state).unwrap(), vec![saved]);
    }
}
