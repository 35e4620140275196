//! The simulated link between the two hosts: encoded messages of numbered connections, each
//! delivered after a delay, or lost, duplicated, reordered, corrupted, or cut by a partition.
//! QUIC hides loss and reordering from the real protocol; here they reach it on purpose, as a
//! broken or hostile transport would deliver them: the protocol must notice, never apply what
//! it should not, and recover once the link is healthy.

use super::rng::Prng;
use std::time::Duration;

/// A message in flight on connection `conn`.
#[derive(Clone, Debug)]
pub struct Frame {
    pub conn: u64,
    pub bytes: Vec<u8>,
}

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    ToMirror,
    ToPrimary,
}

/// Faults, as chances in a thousand per frame.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub loss: u64,
    pub duplicate: u64,
    pub corrupt: u64,
    /// A frame delayed by up to `reorder_ms` more, so later ones may overtake it.
    pub reorder: u64,
    pub reorder_ms: u64,
}

pub struct Link {
    /// One-way delay of every frame.
    pub delay: Duration,
    pub faults: Faults,
    /// Nothing gets through until then.
    pub partitioned_until: Duration,
    queue: Vec<(Duration, u64, Dir, Frame)>,
    order: u64,
    pub sent: u64,
    pub dropped: u64,
}

impl Link {
    pub fn new(delay: Duration) -> Link {
        Link {
            delay,
            faults: Faults::default(),
            partitioned_until: Duration::ZERO,
            queue: Vec::new(),
            order: 0,
            sent: 0,
            dropped: 0,
        }
    }

    pub fn partitioned(&self, now: Duration) -> bool {
        now < self.partitioned_until
    }

    pub fn send(&mut self, now: Duration, dir: Dir, frame: Frame, rng: &mut Prng) {
        self.sent += 1;
        let f = self.faults;
        if self.partitioned(now) || rng.chance(f.loss, 1000) {
            self.dropped += 1;
            return;
        }
        let copies = if rng.chance(f.duplicate, 1000) { 2 } else { 1 };
        for _ in 0..copies {
            let mut frame = frame.clone();
            if !frame.bytes.is_empty() && rng.chance(f.corrupt, 1000) {
                let i = rng.below(frame.bytes.len() as u64) as usize;
                frame.bytes[i] ^= 1 << rng.below(8);
            }
            let mut at = now + self.delay;
            if rng.chance(f.reorder, 1000) {
                at += Duration::from_millis(rng.below(f.reorder_ms + 1));
            }
            self.order += 1;
            self.queue.push((at, self.order, dir, frame));
        }
    }

    /// Frames due by `now`, in delivery order; those sent into a partition are gone.
    pub fn due(&mut self, now: Duration) -> Vec<(Dir, Frame)> {
        let cut = self.partitioned(now);
        let (mut due, rest): (Vec<_>, Vec<_>) =
            self.queue.drain(..).partition(|(at, ..)| *at <= now);
        self.queue = rest;
        due.sort_by_key(|(at, order, ..)| (*at, *order));
        if cut {
            self.dropped += due.len() as u64;
            return Vec::new();
        }
        due.into_iter().map(|(_, _, d, f)| (d, f)).collect()
    }

    /// When the next frame is due.
    pub fn next_due(&self) -> Option<Duration> {
        self.queue.iter().map(|(at, ..)| *at).min()
    }

    /// Every connection ends (its hosts changed roles): what is in flight is lost.
    pub fn cut_all(&mut self) {
        self.dropped += self.queue.len() as u64;
        self.queue.clear();
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}
