//! The link model, as pure code: parameters, a fast PRNG and the per-direction shaper that decides
//! for each packet whether it is dropped (and why), when it leaves the bottleneck and when it is
//! due at the far end. No I/O and no clock: the caller passes "now" in nanoseconds, so the model
//! is unit-tested deterministically.

use serde::{Deserialize, Serialize};

/// Link parameters, as given on the command line (`up` / `set`) and shown by `stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Params {
    /// Round-trip time added by the link (each direction gets half).
    pub rtt_ms: f64,
    /// Jitter: the one-way delay wanders within ± jitter/2 (never reordering
    /// unless `reorder` > 0).
    pub jitter_ms: f64,
    /// Probability that a packet is lost (Bernoulli, independent).
    pub loss: f64,
    /// Bottleneck rate in Mbit/s (IP bytes); 0 = unlimited.
    pub rate_mbit: f64,
    /// Bottleneck buffer, in milliseconds of transmission at `rate_mbit`.
    pub queue_ms: f64,
    /// Fraction of packets held back by an extra `reorder_ms` so that later packets overtake them.
    pub reorder: f64,
    /// Extra delay of a reordered packet.
    pub reorder_ms: f64,
    /// Probability that a packet is duplicated.
    pub dup: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            rtt_ms: 20.0,
            jitter_ms: 0.0,
            loss: 0.001,
            rate_mbit: 500.0,
            queue_ms: 50.0,
            reorder: 0.0,
            reorder_ms: 1.0,
            dup: 0.0,
        }
    }
}

/// A partial change of [`Params`] (`set` changes only what it names).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Patch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dup: Option<f64>,
}

impl Patch {
    pub(crate) fn is_empty(&self) -> bool {
        *self == Patch::default()
    }

    /// `base` with this patch applied (not validated).
    pub(crate) fn apply(&self, base: &Params) -> Params {
        Params {
            rtt_ms: self.rtt_ms.unwrap_or(base.rtt_ms),
            jitter_ms: self.jitter_ms.unwrap_or(base.jitter_ms),
            loss: self.loss.unwrap_or(base.loss),
            rate_mbit: self.rate_mbit.unwrap_or(base.rate_mbit),
            queue_ms: self.queue_ms.unwrap_or(base.queue_ms),
            reorder: self.reorder.unwrap_or(base.reorder),
            reorder_ms: self.reorder_ms.unwrap_or(base.reorder_ms),
            dup: self.dup.unwrap_or(base.dup),
        }
    }
}

impl Params {
    /// Checks ranges; the message names the offending flag.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let finite_nonneg = [
            ("--rtt-ms", self.rtt_ms),
            ("--jitter-ms", self.jitter_ms),
            ("--rate-mbit", self.rate_mbit),
            ("--queue-ms", self.queue_ms),
            ("--reorder-ms", self.reorder_ms),
        ];
        for (name, v) in finite_nonneg {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} must be a finite number >= 0 (got {v})"));
            }
        }
        for (name, v) in [
            ("--loss", self.loss),
            ("--dup", self.dup),
            ("--reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be a probability in [0, 1] (got {v})"));
            }
        }
        if self.rtt_ms > 60_000.0 || self.jitter_ms > 60_000.0 || self.reorder_ms > 60_000.0 {
            return Err("delays above 60 s are not supported".into());
        }
        Ok(())
    }
}

/// xorshift64* — a few nanoseconds per number, reproducible from a seed.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that nearby seeds give unrelated streams and 0 is fine.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    #[inline]
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p` (p = 0 never, p = 1 always).
    #[inline]
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DropReason {
    Loss,
    QueueFull,
}

/// What happens to one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Drop(DropReason),
    /// Deliver at `due` (ns, same clock as `now`); if `dup_due` is set, deliver a copy then too.
    /// `held` = this packet got the reordering extra delay.
    Deliver {
        due: u64,
        dup_due: Option<u64>,
        held: bool,
    },
}

/// [`Params`] turned into per-packet arithmetic.
#[derive(Clone, Copy, Debug)]
struct Compiled {
    one_way_ns: f64,
    jitter_ns: f64,
    loss: f64,
    dup: f64,
    reorder: f64,
    reorder_ns: f64,
    /// 0 = unlimited rate.
    ns_per_byte: f64,
    queue_ns: f64,
}

impl Compiled {
    fn new(p: &Params) -> Compiled {
        Compiled {
            one_way_ns: p.rtt_ms * 1e6 / 2.0,
            jitter_ns: p.jitter_ms * 1e6,
            loss: p.loss,
            dup: p.dup,
            reorder: p.reorder,
            reorder_ns: p.reorder_ms * 1e6,
            // 1 Mbit/s = 1e6 bit/s: one byte takes 8e3 / rate_mbit ns.
            ns_per_byte: if p.rate_mbit > 0.0 {
                8e3 / p.rate_mbit
            } else {
                0.0
            },
            queue_ns: p.queue_ms * 1e6,
        }
    }
}

/// One direction of the link: a Bernoulli loss stage, a FIFO bottleneck of rate R whose buffer
/// holds `queue_ms` of transmission (tail drop), then a propagation delay with jitter and
/// optional reordering. The bottleneck is modelled in virtual time (`link_free_at` = when the
/// queued bytes will have left), which is exactly a FIFO queue served at rate R.
#[derive(Clone, Debug)]
pub(crate) struct Shaper {
    c: Compiled,
    rng: Rng,
    /// ns at which the bottleneck finishes sending everything accepted so far.
    link_free_at: f64,
    /// Latest due time given to an in-order packet: later packets never overtake it.
    last_due: u64,
    /// Jitter curve: offsets `jit_v0` at `jit_t0` and `jit_v1` one period later (ns);
    /// `jit_t0` < 0 = not started.
    jit_t0: f64,
    jit_v0: f64,
    jit_v1: f64,
}

/// Jitter points are at least this far apart (ns).
const JITTER_PERIOD_MIN_NS: f64 = 10e6;

impl Shaper {
    pub(crate) fn new(params: &Params, seed: u64) -> Shaper {
        Shaper {
            c: Compiled::new(params),
            rng: Rng::new(seed),
            link_free_at: 0.0,
            last_due: 0,
            jit_t0: -1.0,
            jit_v0: 0.0,
            jit_v1: 0.0,
        }
    }

    /// New parameters take effect for the next packet; queued packets keep their times.
    pub(crate) fn set_params(&mut self, params: &Params) {
        self.c = Compiled::new(params);
        self.jit_t0 = -1.0;
    }

    /// A fresh jitter offset, uniform in ± jitter/2.
    fn jitter_point(&mut self) -> f64 {
        (self.rng.next_f64() - 0.5) * self.c.jitter_ns
    }

    /// Jitter offset at time `t` (ns): uniform random points one period apart, joined by straight
    /// lines. The period is at least twice the jitter, so the offset falls by less than half a
    /// ns per ns and `t + offset(t)` keeps increasing: jitter alone never reorders, and the mean
    /// delay stays rtt/2 (per-packet independent draws would have to be clamped to keep order,
    /// which at high packet rates turns jitter into a constant extra jitter/2 of delay).
    fn jitter_at(&mut self, t: f64) -> f64 {
        let period = (2.0 * self.c.jitter_ns).max(JITTER_PERIOD_MIN_NS);
        if self.jit_t0 < 0.0 || t - self.jit_t0 >= 2.0 * period {
            // Start (or restart after a long idle time) a period beginning now.
            self.jit_t0 = t;
            self.jit_v0 = self.jitter_point();
            self.jit_v1 = self.jitter_point();
        }
        while t >= self.jit_t0 + period {
            self.jit_t0 += period;
            self.jit_v0 = self.jit_v1;
            self.jit_v1 = self.jitter_point();
        }
        let frac = ((t - self.jit_t0) / period).max(0.0);
        self.jit_v0 + (self.jit_v1 - self.jit_v0) * frac
    }

    /// Through the bottleneck: departure time, or None when its buffer is full.
    #[inline]
    fn enqueue(&mut self, now: f64, len: usize) -> Option<f64> {
        let tx = len as f64 * self.c.ns_per_byte;
        let start = if self.link_free_at > now {
            self.link_free_at
        } else {
            now
        };
        let backlog = start - now;
        // An empty queue always takes a packet; otherwise the bytes waiting before it plus its own
        // must fit the buffer.
        if backlog > 0.0 && backlog + tx > self.c.queue_ns {
            return None;
        }
        self.link_free_at = start + tx;
        Some(self.link_free_at)
    }

    /// Due time after propagation delay, jitter and (maybe) reordering.
    #[inline]
    fn propagate(&mut self, departure: f64) -> (u64, bool) {
        let mut delay = self.c.one_way_ns;
        if self.c.jitter_ns > 0.0 {
            delay = (delay + self.jitter_at(departure)).max(0.0);
        }
        let mut due = (departure + delay) as u64;
        if due < self.last_due {
            due = self.last_due;
        }
        if self.rng.chance(self.c.reorder) {
            (due + self.c.reorder_ns.max(1.0) as u64, true)
        } else {
            self.last_due = due;
            (due, false)
        }
    }

    /// Decides the fate of one packet of `len` bytes read at `now` (ns).
    #[inline]
    pub(crate) fn on_packet(&mut self, now: u64, len: usize) -> Verdict {
        if self.rng.chance(self.c.loss) {
            return Verdict::Drop(DropReason::Loss);
        }
        let now_f = now as f64;
        let Some(departure) = self.enqueue(now_f, len) else {
            return Verdict::Drop(DropReason::QueueFull);
        };
        let (due, held) = self.propagate(departure);
        let mut dup_due = None;
        if self.rng.chance(self.c.dup) {
            // The copy is a packet on the link too: it takes its turn in the bottleneck.
            if let Some(d2) = self.enqueue(now_f, len) {
                let (d, _) = self.propagate(d2);
                dup_due = Some(d.max(due));
            }
        }
        Verdict::Deliver { due, dup_due, held }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            rtt_ms: 0.0,
            jitter_ms: 0.0,
            loss: 0.0,
            rate_mbit: 0.0,
            queue_ms: 50.0,
            reorder: 0.0,
            reorder_ms: 1.0,
            dup: 0.0,
        }
    }

    fn count(s: &mut Shaper, n: u64, gap_ns: u64, len: usize) -> (u64, u64, u64, u64) {
        let (mut ok, mut loss, mut full, mut dups) = (0, 0, 0, 0);
        for i in 0..n {
            match s.on_packet(i * gap_ns, len) {
                Verdict::Deliver { dup_due, .. } => {
                    ok += 1;
                    dups += dup_due.is_some() as u64;
                }
                Verdict::Drop(DropReason::Loss) => loss += 1,
                Verdict::Drop(DropReason::QueueFull) => full += 1,
            }
        }
        (ok, loss, full, dups)
    }

    #[test]
    fn rng_is_reproducible_and_uniform() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut c = Rng::new(8);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        let mut r = Rng::new(1);
        let mean = (0..100_000).map(|_| r.next_f64()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!(!r.chance(0.0));
        assert!((0..1000).all(|_| r.chance(1.0)));
    }

    #[test]
    fn loss_and_dup_follow_their_rates() {
        let mut p = params();
        p.loss = 0.01;
        p.dup = 0.05;
        let mut s = Shaper::new(&p, 1);
        let (ok, loss, full, dups) = count(&mut s, 200_000, 1000, 100);
        assert_eq!(full, 0);
        assert_eq!(ok + loss, 200_000);
        assert!((1700..2300).contains(&loss), "loss {loss}");
        assert!((9000..11000).contains(&dups), "dups {dups}");
    }

    #[test]
    fn delay_is_half_the_rtt_and_order_is_kept_under_jitter() {
        let mut p = params();
        p.rtt_ms = 20.0;
        p.jitter_ms = 4.0;
        let mut s = Shaper::new(&p, 3);
        let mut last = 0;
        let (mut sum, mut lo, mut hi) = (0.0, f64::MAX, 0.0f64);
        let n = 100_000u64;
        for i in 0..n {
            let now = i * 100_000; // 10 s in all, 1000 jitter periods
            let Verdict::Deliver { due, held, .. } = s.on_packet(now, 1000) else {
                panic!("dropped")
            };
            assert!(!held);
            assert!(due >= last, "reordered without --reorder");
            let ms = (due - now) as f64 / 1e6;
            assert!((8.0..=12.0).contains(&ms), "one-way {ms} ms");
            sum += ms;
            lo = lo.min(ms);
            hi = hi.max(ms);
            last = due;
        }
        let avg = sum / n as f64;
        assert!((avg - 10.0).abs() < 0.2, "avg one-way {avg} ms");
        assert!(lo < 8.3 && hi > 11.7, "jitter spread {lo}..{hi} ms");
        // Sparse packets (a ping every 200 ms) see independent delays in the same range.
        let mut s = Shaper::new(&p, 4);
        let delays: Vec<u64> = (0..20u64)
            .map(|i| match s.on_packet(i * 200_000_000, 100) {
                Verdict::Deliver { due, .. } => due - i * 200_000_000,
                v => panic!("{v:?}"),
            })
            .collect();
        let distinct = delays.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct > 15, "{delays:?}");
    }

    #[test]
    fn bottleneck_paces_at_the_rate_and_tail_drops_at_the_buffer() {
        let mut p = params();
        p.rate_mbit = 100.0; // 1500 B = 120 µs
        p.queue_ms = 12.0; // 100 packets of 1500 B
        let mut s = Shaper::new(&p, 1);
        // A burst of 1000 packets at once: the buffer takes ~100, the rest is tail-dropped.
        let mut dues = vec![];
        let mut full = 0;
        for _ in 0..1000 {
            match s.on_packet(1_000_000, 1500) {
                Verdict::Deliver { due, .. } => dues.push(due),
                Verdict::Drop(DropReason::QueueFull) => full += 1,
                v => panic!("{v:?}"),
            }
        }
        assert!((100..=102).contains(&dues.len()), "accepted {}", dues.len());
        assert_eq!(full, 1000 - dues.len());
        for w in dues.windows(2) {
            assert_eq!(w[1] - w[0], 120_000);
        }
        // Offered at exactly the rate for a long time: nothing dropped.
        let mut s = Shaper::new(&p, 1);
        let (ok, _, full, _) = count(&mut s, 10_000, 120_000, 1500);
        assert_eq!((ok, full), (10_000, 0));
        // Offered at twice the rate: about half is dropped.
        let mut s = Shaper::new(&p, 1);
        let (ok, _, full, _) = count(&mut s, 10_000, 60_000, 1500);
        assert!(
            (4900..5200).contains(&ok) && ok + full == 10_000,
            "{ok} {full}"
        );
    }

    #[test]
    fn reorder_holds_back_the_configured_fraction() {
        let mut p = params();
        p.rtt_ms = 2.0;
        p.reorder = 0.1;
        p.reorder_ms = 1.0;
        let mut s = Shaper::new(&p, 9);
        let mut held_n = 0;
        let mut dues = vec![];
        for i in 0..10_000u64 {
            if let Verdict::Deliver { due, held, .. } = s.on_packet(i * 10_000, 100) {
                held_n += held as u32;
                dues.push(due);
            }
        }
        assert!((900..1100).contains(&held_n), "held {held_n}");
        let overtaken = dues.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(overtaken > 800, "overtaken {overtaken}");
    }

    #[test]
    fn patch_and_validation() {
        let base = Params::default();
        let patch = Patch {
            loss: Some(1.0),
            ..Patch::default()
        };
        let p = patch.apply(&base);
        assert_eq!(p.loss, 1.0);
        assert_eq!(p.rtt_ms, base.rtt_ms);
        assert!(p.validate().is_ok());
        assert!(Patch::default().is_empty());
        let bad = Patch {
            loss: Some(1.5),
            ..Patch::default()
        };
        assert!(bad.apply(&base).validate().unwrap_err().contains("--loss"));
        let bad = Patch {
            rtt_ms: Some(-1.0),
            ..Patch::default()
        };
        assert!(bad.apply(&base).validate().is_err());
    }
}
