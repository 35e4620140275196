//! A congestion controller for a long, dedicated, lossy link ("steady"): it paces to the
//! bottleneck rate it measures instead of halving on every lost packet.
//!
//! Loss-based controllers (Cubic, NewReno) read every loss as congestion; at 20 ms RTT and
//! 0.1 % random loss they settle far below the link rate. Here the window follows the delivery
//! rate: `window = gain × max_delivery_rate × min_rtt`, with the rate sampled once per round
//! trip and kept as a windowed maximum (BBR's model, without its machinery).
//!
//! - Startup: the window grows by what is acknowledged (doubling per round trip) until the
//!   delivery rate stops growing by 25 % for three rounds, or a round loses more than
//!   `HEAVY_LOSS` of its packets (a queue overflowed).
//! - Steady: gain 2 (BBR's window gain: a standing queue of up to one round trip, enough that the
//!   bottleneck never runs dry while acknowledgements and the sender's own CPU stutter), with
//!   one round of gain 2.25 every 8 to find bandwidth that became available.
//! - Random loss is ignored. A round losing more than `HEAVY_LOSS` of its bytes is congestion:
//!   the rate estimate backs off by 15 % and the window keeps no standing queue (gain 1) for
//!   8 rounds. Persistent congestion (an outage) restarts
//!   from Startup.
//!
//! quinn paces at 1.25 × window / smoothed RTT, so the window also sets the pacing rate.

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A round losing more than this fraction of its bytes is congestion, not noise.
pub const HEAVY_LOSS: f64 = 0.05;
const STEADY_GAIN: f64 = 2.0;
const PROBE_GAIN: f64 = 2.25;
const PROBE_EVERY: u64 = 8;
/// Rounds over which the delivery-rate maximum is kept.
const RATE_WINDOW: usize = 10;
const STARTUP_GROWTH: f64 = 1.25;
const STARTUP_FLAT_ROUNDS: u32 = 3;
const CONGESTION_BACKOFF: f64 = 0.85;
const MIN_MODEL_RTT: Duration = Duration::from_millis(5);
/// In startup the window stays within this many times the measured bandwidth-delay product.
const STARTUP_CAP: f64 = 2.5;

/// The smallest window the controller ever has: four datagrams of the path's current MTU.
///
/// quinn sends an ack-eliciting packet only while `bytes in flight + one datagram < window`.
/// A window below one datagram therefore stops the connection for good: nothing is sent, so
/// nothing is acknowledged, and only acknowledgements move the window. `initial_window`
/// (14,720 bytes, ten 1472-byte datagrams) is such a window once MTU discovery has found a
/// large path MTU (65,507 bytes on loopback): with 128 volumes on one host, a starved round
/// trip of seconds made the startup cap fall to it, or persistent congestion reset the
/// controller to it, and the stream stalled with the link up (issue 13).
fn min_window(mtu: u64) -> u64 {
    4 * mtu
}

#[derive(Clone, Debug)]
pub struct SteadyConfig {
    pub initial_window: u64,
    /// Never grow the window beyond this (bytes); bounds memory and bursts.
    pub max_window: u64,
}

impl Default for SteadyConfig {
    fn default() -> Self {
        SteadyConfig {
            initial_window: 14_720,
            max_window: 1 << 30,
        }
    }
}

impl ControllerFactory for SteadyConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Steady::new(self, now, current_mtu))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Startup,
    Steady,
}

#[derive(Clone, Debug)]
pub struct Steady {
    config: Arc<SteadyConfig>,
    mtu: u64,
    mode: Mode,
    window: u64,
    min_rtt: Option<Duration>,
    /// Delivery-rate samples (bytes/s) of the last rounds, newest last.
    rates: Vec<f64>,
    round: u64,
    round_start: Instant,
    round_acked: u64,
    round_lost: u64,
    round_app_limited: bool,
    startup_best: f64,
    startup_flat: u32,
    /// After congestion, no standing queue and no probing until this round.
    calm_until: u64,
}

impl Steady {
    pub fn new(config: Arc<SteadyConfig>, now: Instant, mtu: u16) -> Steady {
        Steady {
            // Also after persistent congestion, when the path's MTU may be far above the one
            // `initial_window` was sized for (see `min_window`).
            window: config.initial_window.max(min_window(mtu as u64)),
            config,
            mtu: mtu as u64,
            mode: Mode::Startup,
            min_rtt: None,
            rates: Vec::with_capacity(RATE_WINDOW),
            round: 0,
            round_start: now,
            round_acked: 0,
            round_lost: 0,
            round_app_limited: false,
            startup_best: 0.0,
            startup_flat: 0,
            calm_until: 0,
        }
    }

    fn min_window(&self) -> u64 {
        min_window(self.mtu)
    }

    /// Bytes per second: the largest delivery rate of the recent rounds.
    pub fn rate(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
    }

    fn gain(&self) -> f64 {
        if self.round < self.calm_until {
            1.0
        } else if self.round.is_multiple_of(PROBE_EVERY) {
            PROBE_GAIN
        } else {
            STEADY_GAIN
        }
    }

    fn model_window(&self, gain: f64) -> Option<u64> {
        // Timers and acknowledgements come in millisecond steps: on a near-zero RTT a window
        // of one RTT's worth would starve the sender, so the model never goes below MIN_RTT.
        let rtt = self.min_rtt?.max(MIN_MODEL_RTT).as_secs_f64();
        let rate = self.rate();
        (rate > 0.0).then_some((gain * rate * rtt) as u64)
    }

    /// A round trip ended: take its delivery-rate sample and decide.
    fn end_round(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.round_start)
            .as_secs_f64();
        let sent = self.round_acked + self.round_lost;
        let loss = if sent > 0 {
            self.round_lost as f64 / sent as f64
        } else {
            0.0
        };
        if elapsed > 0.0 && self.round_acked > 0 {
            let sample = self.round_acked as f64 / elapsed;
            // An app-limited round only says the link can do at least this much.
            if !self.round_app_limited || sample > self.rate() {
                if self.rates.len() == RATE_WINDOW {
                    self.rates.remove(0);
                }
                self.rates.push(sample);
            }
        }
        let heavy = loss > HEAVY_LOSS;
        match self.mode {
            Mode::Startup => {
                let rate = self.rate();
                if rate > self.startup_best * STARTUP_GROWTH {
                    self.startup_best = rate;
                    self.startup_flat = 0;
                } else if !self.round_app_limited {
                    self.startup_flat += 1;
                }
                if heavy || self.startup_flat >= STARTUP_FLAT_ROUNDS {
                    self.mode = Mode::Steady;
                }
            }
            Mode::Steady if heavy => {
                // Congestion: back off by 15 %. Not to the last sample: a round that lost many
                // packets also delivered fewer, and chasing that would spiral down.
                for r in &mut self.rates {
                    *r *= CONGESTION_BACKOFF;
                }
                // A queue too shallow for our standing queue: keep none for a while.
                self.calm_until = self.round + PROBE_EVERY;
            }
            Mode::Steady => {}
        }
        if self.mode == Mode::Steady {
            if let Some(w) = self.model_window(self.gain()) {
                self.window = w;
            }
        }
        self.window = self.window.clamp(self.min_window(), self.config.max_window);
        self.round += 1;
        self.round_start = now;
        self.round_acked = 0;
        self.round_lost = 0;
        self.round_app_limited = false;
    }
}

impl Steady {
    /// `on_ack` with the RTT estimator reduced to what we use (tests drive this directly).
    pub fn ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        min: Duration,
    ) {
        if min > Duration::ZERO {
            self.min_rtt = Some(self.min_rtt.map_or(min, |m| m.min(min)));
        }
        self.round_acked += bytes;
        self.round_app_limited |= app_limited;
        if self.mode == Mode::Startup && !app_limited {
            // Double per round trip, but never past STARTUP_CAP times what the link has been
            // seen to deliver: once the rate stops growing, the queue stays bounded.
            let cap = self
                .model_window(STARTUP_CAP)
                .unwrap_or(u64::MAX)
                .max(self.config.initial_window)
                .max(self.min_window());
            self.window = (self.window + bytes).min(cap).min(self.config.max_window);
        }
        // A packet sent after the round began has made the trip: the round is over.
        if sent >= self.round_start {
            self.end_round(now);
        }
    }
}

impl Controller for Steady {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.ack(now, sent, bytes, app_limited, rtt.min());
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.round_lost += lost_bytes;
        if is_persistent_congestion {
            // The link was gone (an outage): measure it again from scratch.
            let fresh = Steady::new(self.config.clone(), now, self.mtu as u16);
            *self = Steady {
                min_rtt: self.min_rtt,
                ..fresh
            };
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu as u64;
        self.window = self.window.max(self.min_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.config.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fluid model of a bottleneck link: `rate` bytes/s, propagation RTT `rtt`, a drop-tail
    /// queue of `queue` bytes and random loss `loss`. Returns (delivered bytes/s over the last
    /// second, lost fraction) after `secs` of a sender that always has data.
    fn simulate(rate: f64, rtt: Duration, queue: f64, loss: f64, secs: f64) -> (f64, f64, Steady) {
        let start = Instant::now();
        let mut cc = Steady::new(Arc::new(SteadyConfig::default()), start, 1200);
        let pkt = 1200u64;
        let mut now = start;
        let step = Duration::from_micros(100);
        let mut in_flight: std::collections::VecDeque<(Instant, Instant, u64)> = Default::default(); // (sent, arrives, bytes)
        let mut queued = 0.0f64; // bytes in the bottleneck queue
        let mut link_free = start;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut lost, mut sent_total) = (0u64, 0u64);
        let measure_from = start + Duration::from_secs_f64(secs - 1.0);
        let mut delivered_last = 0u64;
        let mut bytes_in_flight = 0u64;
        while now < start + Duration::from_secs_f64(secs) {
            // Send what the window allows, paced at 1.25 * window / rtt.
            let budget =
                (1.25 * cc.window() as f64 * step.as_secs_f64() / rtt.as_secs_f64()) as u64 + pkt;
            let mut sent_now = 0;
            while bytes_in_flight + pkt <= cc.window() && sent_now < budget {
                sent_now += pkt;
                bytes_in_flight += pkt;
                sent_total += 1;
                // Queue drains at `rate`; drop-tail when full.
                let backlog = (link_free.saturating_duration_since(now)).as_secs_f64() * rate;
                queued = backlog;
                if queued + pkt as f64 > queue || rnd() < loss {
                    lost += 1;
                    in_flight.push_back((now, now + rtt + rtt / 2, 0)); // detected as lost later
                    continue;
                }
                let depart = link_free.max(now) + Duration::from_secs_f64(pkt as f64 / rate);
                link_free = depart;
                in_flight.push_back((now, depart + rtt, pkt));
            }
            now += step;
            while let Some(&(sent, arrives, bytes)) = in_flight.front() {
                if arrives > now {
                    break;
                }
                in_flight.pop_front();
                bytes_in_flight -= pkt;
                if bytes == 0 {
                    cc.on_congestion_event(now, sent, false, pkt);
                } else {
                    if now >= measure_from {
                        delivered_last += bytes;
                    }
                    cc.ack(now, sent, bytes, false, rtt);
                }
            }
        }
        let _ = queued;
        (
            delivered_last as f64,
            lost as f64 / sent_total.max(1) as f64,
            cc,
        )
    }

    const MBIT: f64 = 1e6 / 8.0;

    #[test]
    fn fills_a_lossy_long_link() {
        // 500 Mbit/s, 20 ms, 50 ms of queue, 0.1 % random loss.
        let rate = 500.0 * MBIT;
        let (got, lost, cc) = simulate(rate, Duration::from_millis(20), 0.05 * rate, 0.001, 4.0);
        assert!(
            got > 0.9 * rate,
            "delivered {:.0} Mbit/s of 500",
            got / MBIT
        );
        assert!(lost < 0.01, "lost {:.3} of packets", lost);
        assert_eq!(cc.mode, Mode::Steady);
    }

    #[test]
    fn random_loss_of_two_percent_does_not_collapse_the_window() {
        let rate = 200.0 * MBIT;
        let (got, _lost, _) = simulate(rate, Duration::from_millis(20), 0.05 * rate, 0.02, 4.0);
        assert!(
            got > 0.85 * rate,
            "delivered {:.0} Mbit/s of 200",
            got / MBIT
        );
    }

    #[test]
    fn a_shallow_queue_keeps_loss_bounded() {
        // A 2 ms queue cannot hold even the steady quarter-RTT standing queue: the controller
        // backs off on heavy loss instead of flooding (it trades some rate, as BBR does there).
        let rate = 300.0 * MBIT;
        let (got, lost, _) = simulate(rate, Duration::from_millis(20), 0.002 * rate, 0.0, 5.0);
        assert!(
            got > 0.5 * rate,
            "delivered {:.0} Mbit/s of 300",
            got / MBIT
        );
        assert!(lost < 0.10, "lost {:.3} of packets", lost);
    }

    /// The loopback path's MTU, which MTU discovery finds on one host.
    const LOOPBACK_MTU: u16 = 65_507;

    /// A controller on a path whose MTU discovery found `mtu` after the start at 1452 bytes.
    fn on_path(now: Instant, mtu: u16) -> Steady {
        let mut cc = Steady::new(Arc::new(SteadyConfig::default()), now, 1452);
        cc.on_mtu_update(mtu);
        cc
    }

    #[test]
    fn persistent_congestion_leaves_room_for_datagrams_of_the_current_mtu() {
        // Issue 13: reset to `initial_window` (14,720 bytes) on loopback, where datagrams are
        // 65,507 bytes, quinn could never send again and the stream stalled with the link up.
        let now = Instant::now();
        let mut cc = on_path(now, LOOPBACK_MTU);
        cc.window = 10 << 20;
        cc.mode = Mode::Steady;
        cc.on_congestion_event(now, now, true, 1 << 20);
        assert_eq!(cc.mode, Mode::Startup);
        assert_eq!(cc.window(), 4 * u64::from(LOOPBACK_MTU));
    }

    #[test]
    fn a_starved_startup_never_caps_the_window_below_a_datagram() {
        // Round trips of seconds (both daemons starved of CPU) measure a delivery rate so low
        // that the startup cap fell to `initial_window`, below one loopback datagram (issue 13).
        let t0 = Instant::now();
        let mut cc = on_path(t0, LOOPBACK_MTU);
        let min = Duration::from_micros(100);
        let mtu = u64::from(LOOPBACK_MTU);
        // A round of one datagram acknowledged after 3 s: ~22 kB/s.
        let t1 = t0 + Duration::from_secs(3);
        cc.ack(t1, t0 + Duration::from_millis(1), mtu, false, min);
        // Acks of packets sent before that round began: the window grows under the cap only.
        cc.ack(t1, t0, mtu, false, min);
        assert_eq!(cc.mode, Mode::Startup);
        assert!(cc.window() >= 4 * mtu, "window {} < 4 x {mtu}", cc.window());
    }

    #[test]
    fn the_window_always_holds_four_datagrams() {
        // Any mix of acks (fast, starved, app-limited), losses, persistent congestion and MTU
        // changes leaves room for four datagrams: quinn must always be able to send.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = Instant::now();
        let mut cc = Steady::new(Arc::new(SteadyConfig::default()), now, 1200);
        for _ in 0..20_000 {
            let sent = now;
            now += Duration::from_micros(rnd(3_000_000));
            match rnd(100) {
                0 => cc.on_congestion_event(now, sent, true, rnd(1 << 20)),
                1..=4 => cc.on_congestion_event(now, sent, false, rnd(1 << 20)),
                5 => cc.on_mtu_update([1200, 1452, 1472, 9000, LOOPBACK_MTU][rnd(5) as usize]),
                _ => cc.ack(
                    now,
                    sent,
                    rnd(cc.mtu * 8) + 1,
                    rnd(4) == 0,
                    Duration::from_micros(rnd(50_000) + 1),
                ),
            }
            assert!(
                cc.window() >= 4 * cc.mtu,
                "window {} with mtu {}",
                cc.window(),
                cc.mtu
            );
        }
    }

    #[test]
    fn persistent_congestion_restarts_measurement() {
        let now = Instant::now();
        let mut cc = Steady::new(Arc::new(SteadyConfig::default()), now, 1200);
        cc.window = 10 << 20;
        cc.mode = Mode::Steady;
        cc.on_congestion_event(now, now, true, 1 << 20);
        assert_eq!(cc.mode, Mode::Startup);
        assert_eq!(cc.window(), SteadyConfig::default().initial_window);
    }
}
