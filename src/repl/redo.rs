//! The mirror's redo log: each delta set is made durable here, exactly as it arrived, before it
//! is acknowledged; the applier then writes it in place. After a crash, sets past the last
//! applied one are replayed (applying a set twice gives the same bytes).
//!
//! Segment files `STATE/redo/VOLUME/<first set>.redo`, entries:
//! `magic "BMR1" | set u64 | len u32 | crc32(message) u32 | message (a frame::Message::Set)`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 4] = *b"BMR1";
const ENTRY_HEADER: usize = 20;
const SEGMENT_BYTES: u64 = 256 << 20;

struct Segment {
    last_set: u64,
    path: PathBuf,
    len: u64,
}

pub struct RedoLog {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    current: Option<File>,
}

impl RedoLog {
    pub fn open(dir: &Path) -> io::Result<RedoLog> {
        let names = numbered_segments(dir, ".redo")?;
        let mut log = RedoLog {
            dir: dir.to_path_buf(),
            segments: VecDeque::new(),
            current: None,
        };
        let mut torn = false;
        let mut expect: Option<u64> = None;
        for (first_set, path) in names {
            if torn {
                std::fs::remove_file(&path)?;
                continue;
            }
            let mut data = Vec::new();
            File::open(&path)?.read_to_end(&mut data)?;
            let mut pos = 0;
            let mut last_set = first_set.saturating_sub(1);
            while pos < data.len() {
                match parse_entry(&data[pos..]) {
                    Some((set, n)) if expect.is_none_or(|e| e == set) => {
                        last_set = set;
                        expect = Some(set + 1);
                        pos += n;
                    }
                    _ => {
                        torn = true;
                        break;
                    }
                }
            }
            if torn {
                tracing::warn!(path = %path.display(), at = pos, "redo log: torn entry at the tail, truncated");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(pos as u64)?;
                f.sync_all()?;
            }
            if pos == 0 {
                std::fs::remove_file(&path)?;
                continue;
            }
            log.segments.push_back(Segment {
                last_set,
                path,
                len: pos as u64,
            });
        }
        Ok(log)
    }

    /// The newest durable set, if the log holds any.
    pub fn last_set(&self) -> Option<u64> {
        self.segments.back().map(|s| s.last_set)
    }

    /// Append sets (each a whole encoded Set message) and make them durable.
    pub fn append(&mut self, entries: &[(u64, &[u8])]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let rotate =
            self.current.is_none() || self.segments.back().is_none_or(|s| s.len >= SEGMENT_BYTES);
        if rotate {
            let first = entries[0].0;
            let path = self.dir.join(format!("{first:020}.redo"));
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            sync_dir(&self.dir)?;
            self.segments.push_back(Segment {
                last_set: first - 1,
                path,
                len: 0,
            });
            self.current = Some(f);
        }
        let f = self.current.as_mut().expect("current segment");
        let seg = self.segments.back_mut().expect("current segment");
        let mut buf = Vec::new();
        for (set, msg) in entries {
            buf.clear();
            buf.extend_from_slice(&MAGIC);
            buf.extend_from_slice(&set.to_be_bytes());
            buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            buf.extend_from_slice(&crc32fast::hash(msg).to_be_bytes());
            f.write_all(&buf)?;
            f.write_all(msg)?;
            seg.len += (ENTRY_HEADER + msg.len()) as u64;
            seg.last_set = *set;
        }
        f.sync_data()
    }

    /// Every entry with a set number above `applied`, in order.
    pub fn read_after(&self, applied: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for seg in self.segments.iter().filter(|s| s.last_set > applied) {
            let mut data = Vec::new();
            File::open(&seg.path)?.read_to_end(&mut data)?;
            let mut pos = 0;
            while let Some((set, n)) = parse_entry(&data[pos..seg.len as usize]) {
                if set > applied {
                    out.push((set, data[pos + ENTRY_HEADER..pos + n].to_vec()));
                }
                pos += n;
            }
        }
        Ok(out)
    }

    /// Forget segments whose sets are all applied (and synced to the volume).
    pub fn trim(&mut self, applied: u64) -> io::Result<()> {
        while self.segments.front().is_some_and(|s| s.last_set <= applied) {
            let s = self.segments.pop_front().unwrap();
            if self.segments.is_empty() {
                self.current = None;
            }
            std::fs::remove_file(&s.path)?;
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// (set, entry length) of an intact entry at the start of `b`.
fn parse_entry(b: &[u8]) -> Option<(u64, usize)> {
    if b.len() < ENTRY_HEADER || b[0..4] != MAGIC {
        return None;
    }
    let set = u64::from_be_bytes(b[4..12].try_into().ok()?);
    let len = u32::from_be_bytes(b[12..16].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(b[16..20].try_into().ok()?);
    let msg = b.get(ENTRY_HEADER..ENTRY_HEADER + len)?;
    (crc32fast::hash(msg) == crc).then_some((set, ENTRY_HEADER + len))
}

/// The files `<number><suffix>` in `dir` (created if missing), by number: the segments of a
/// log. Anything else in the directory is left alone.
pub fn numbered_segments(dir: &Path, suffix: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    std::fs::create_dir_all(dir)?;
    let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
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
    Ok(names)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_reopen_read_trim() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = RedoLog::open(dir.path()).unwrap();
            assert_eq!(log.last_set(), None);
            log.append(&[(1, b"one"), (2, b"two")]).unwrap();
            log.append(&[(3, b"three")]).unwrap();
        }
        let mut log = RedoLog::open(dir.path()).unwrap();
        assert_eq!(log.last_set(), Some(3));
        let e = log.read_after(1).unwrap();
        assert_eq!(e, vec![(2, b"two".to_vec()), (3, b"three".to_vec())]);
        log.append(&[(4, b"four")]).unwrap();
        log.trim(4).unwrap();
        assert_eq!(log.last_set(), None);
        log.append(&[(5, b"five")]).unwrap();
        assert_eq!(log.read_after(0).unwrap(), vec![(5, b"five".to_vec())]);
    }

    #[test]
    fn torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = RedoLog::open(dir.path()).unwrap();
            log.append(&[(1, b"one"), (2, b"two-two")]).unwrap();
        }
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let log = RedoLog::open(dir.path()).unwrap();
        assert_eq!(log.last_set(), Some(1));
        assert_eq!(log.read_after(0).unwrap().len(), 1);
    }
}
