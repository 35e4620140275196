//! What the primary's volume held at every point of its history, for the checks: per
//! generation, the records the journal appended (sequence number and extent) and, where a
//! generation starts with a break, the volume's content at that moment. The state after write
//! `seq` of generation `gen` is the nearest base at or before `gen` with every record of the
//! generations from there up to `seq` applied in order: what the mirror must hold when it
//! says it holds (`gen`, `seq`) (promise I1).

use crate::extent::{Extent, Payload};
use crate::repl::identity::GenId;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
struct Span {
    gen: GenId,
    first_seq: u64,
    /// The volume's content when this generation started with a break.
    base: Option<Vec<u8>>,
    /// By (seq, n): a record at (seq, 0); the n-th write the dirty map took at (seq, n), just
    /// after record `seq` (the number a fold skipped) in the order of completion.
    records: BTreeMap<(u64, u64), Extent>,
    tracked: u64,
}

/// The primary's history (module doc). Shared with the journal's observer.
#[derive(Clone, Default)]
pub struct Model {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Model {
    /// A new generation; `base` is the volume's content when it starts with a break.
    pub fn mint(&self, gen: GenId, first_seq: u64, base: Option<Vec<u8>>) {
        self.spans.lock().unwrap().push(Span {
            gen,
            first_seq,
            base,
            records: BTreeMap::new(),
            tracked: 0,
        });
    }

    /// A record the journal appended (to the current generation), or a write the dirty map
    /// took instead (`tracked`, placed just after `seq`).
    pub fn record(&self, seq: u64, tracked: bool, e: &Extent) {
        let mut spans = self.spans.lock().unwrap();
        let span = spans.last_mut().expect("a generation before any record");
        let key = if tracked {
            span.tracked += 1;
            (seq, span.tracked)
        } else {
            (seq, 0)
        };
        span.records.insert(key, e.clone());
    }

    /// The volume after write `seq` of generation `gen` (None: no such generation here).
    pub fn state(&self, gen: GenId, seq: u64) -> Option<Vec<u8>> {
        let spans = self.spans.lock().unwrap();
        let i = spans.iter().rposition(|s| s.gen == gen)?;
        let j = (0..=i).rev().find(|&k| spans[k].base.is_some())?;
        let mut content = spans[j].base.clone().expect("found a base");
        for span in &spans[j..=i] {
            for (_, e) in span.records.range(..=(seq, u64::MAX)) {
                let at = e.offset as usize;
                match &e.payload {
                    Payload::Data(d) => content[at..at + d.len()].copy_from_slice(d),
                    Payload::Zero(n) => content[at..at + *n as usize].fill(0),
                }
            }
        }
        Some(content)
    }

    /// The (generation, seq) of every record touching `[offset, offset+len)`, for reports.
    pub fn writes_to(&self, offset: u64, len: u64) -> Vec<(String, u64)> {
        let spans = self.spans.lock().unwrap();
        let mut out = Vec::new();
        for s in spans.iter() {
            for ((seq, _), e) in &s.records {
                if e.offset < offset + len && offset < e.end() {
                    out.push((
                        format!("{}{}", s.gen, if s.base.is_some() { "*" } else { "" }),
                        *seq,
                    ));
                }
            }
        }
        out
    }

    /// An independent copy (the history a cloned primary shares up to now).
    pub fn fork(&self) -> Model {
        Model {
            spans: Arc::new(Mutex::new(self.spans.lock().unwrap().clone())),
        }
    }

    /// Where generation `gen` starts.
    pub fn first_seq(&self, gen: GenId) -> Option<u64> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .rev()
            .find(|s| s.gen == gen)
            .map(|s| s.first_seq)
    }
}

/// The first 4 KiB block where two images differ, for messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<(usize, usize)> {
    let blocks = a.chunks(4096).zip(b.chunks(4096));
    let differing: Vec<usize> = blocks
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    differing.first().map(|&f| (f, differing.len()))
}
