//! End-to-end replication tests: a `blkmirror mirror` and a `blkmirror primary` (real processes,
//! QUIC with mutual TLS on 127.0.0.1) in a fresh temporary directory per test, real NBD clients
//! writing to the primary, and checks on the mirror's image after `blkmirror recover`
//! (promises I1-I4 of docs/DESIGN.md).
//!
//! No timed assertions: every wait is for a condition (polled every 100 ms with a generous
//! timeout) and a timeout fails with the last status documents and log lines of both daemons.

mod common;

use blkmirror::extent::{Extent, Payload};
use blkmirror::repl::core::primary::PrimaryVolumeState;
use blkmirror::repl::frame::{self, DeltaSet, Message, Mode, SetKind, PROTOCOL_VERSION};
use blkmirror::repl::identity::PrimaryClaim;
use blkmirror::transport::{client_endpoint, connect, Identity, TlsFiles, Tuning};
use common::*;
use serde_json::{json, Value};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every volume of these tests: 64 MiB, sparse (the default size of a [`Pair`]).
const SIZE: u64 = 64 * MIB;

// ------------------------------------------------------------------------------------------
// The rig: a pair (tests/common/pair.rs) whose mirror runs from the start.
// ------------------------------------------------------------------------------------------

/// Certificates, a running mirror, and a primary that is described but not started (so a
/// test can prepare the primary's volume first).
fn rig(opts: PairOptions) -> Pair {
    let mut rig = Pair::new(opts);
    rig.mirror.start();
    rig
}

impl Pair {
    /// Start `tools/workload.py` writing seqs `start..=end` of plan `seed` in the background.
    fn workload(&self, seed: u64, start: u64, end: u64) -> Background {
        self.workload_over(seed, start, end, BLOCKS)
    }

    /// [`Pair::workload`] over the first `blocks` blocks.
    fn workload_over(&self, seed: u64, start: u64, end: u64, blocks: u64) -> Background {
        let mut c = Command::new("/usr/bin/python3");
        c.arg(tool("workload.py"))
            .args(["--uri", &self.uri()])
            .args(["--seed", &seed.to_string()])
            .args(["--writes", &end.to_string()])
            .args(["--start-seq", &start.to_string()])
            .args(["--blocks", &blocks.to_string()])
            .args(["--block-size", &BLOCK.to_string()]);
        Background::spawn(
            &format!("workload seed {seed} seqs {start}..={end}"),
            c,
            &self.dir().join(format!("workload-{seed}-{start}.out")),
        )
    }
}

/// tools/crashcheck.py on `image` for plan `seed` of `writes` writes; Ok(prefix) if it prints
/// OK, Err(its output) otherwise.
fn crashcheck(image: &Path, seed: u64, writes: u64, min_seq: Option<u64>) -> Result<u64, String> {
    crashcheck_over(image, seed, writes, min_seq, BLOCKS)
}

/// [`crashcheck`] of a plan over the first `blocks` blocks.
fn crashcheck_over(
    image: &Path,
    seed: u64,
    writes: u64,
    min_seq: Option<u64>,
    blocks: u64,
) -> Result<u64, String> {
    let seed = seed.to_string();
    let writes = writes.to_string();
    let blocks = blocks.to_string();
    let min = min_seq.map(|m| m.to_string());
    let mut args = vec![
        tool("crashcheck.py").to_str().unwrap().to_string(),
        "--image".into(),
        image.to_str().unwrap().to_string(),
        "--seed".into(),
        seed,
        "--writes".into(),
        writes,
        "--blocks".into(),
        blocks,
    ];
    if let Some(m) = min {
        args.push("--min-seq".into());
        args.push(m);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_output("/usr/bin/python3", &args, None);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() || !out.starts_with("OK") {
        return Err(out);
    }
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("prefix="))
        .and_then(|p| p.parse().ok())
        .ok_or(out.clone())
}

/// sha256 of every regular file directly under `dir` (lost+found skipped), sorted by name.
fn checksums(dir: &Path) -> Vec<(String, String)> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.path())
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into(), sha256(p)))
        .collect()
}

// ------------------------------------------------------------------------------------------
// 1. A real file system replicates; the mirror's copy mounts and is clean.
// ------------------------------------------------------------------------------------------

/// mkfs.ext4 and files on the primary's volume (nbdfuse + loop device); after lag 0, stop and
/// recover, the mirror image equals the primary image, mounts read-only with the same file
/// checksums, and `e2fsck -fn` finds nothing.
#[test]
fn ext4_replicates_and_mirror_mounts() {
    let mut rig = rig(PairOptions::default());
    rig.primary.start();
    let mnt = rig.dir().join("mnt");
    let before;
    {
        let fuse = FuseFile::start(&rig.dir().join("fuse"), &rig.uri());
        let lo = LoopDev::attach(&fuse.file());
        run("mkfs.ext4", &["-q", "-F", &lo.dev]);
        let m = Mount::at(&lo.dev, &mnt);
        for i in 0..8u64 {
            let len = if i % 3 == 2 {
                (i as usize + 1) * 3001
            } else {
                ((i % 4 + 1) * MIB) as usize - (i as usize * 4093)
            };
            std::fs::write(mnt.join(format!("file{i}")), pseudo_random(len, 500 + i)).unwrap();
        }
        run("sync", &[]);
        before = checksums(&mnt);
        assert_eq!(before.len(), 8);
        m.umount();
        drop(lo);
        drop(fuse);
    }
    rig.wait_synced();
    rig.finish_and_compare();

    let lo = LoopDev::attach_ro(&rig.mirror_img);
    let m = Mount::with_options(&lo.dev, &rig.dir().join("mnt-mirror"), "ro,noload");
    assert_eq!(checksums(&m.dir), before, "files differ on the mirror");
    m.umount();
    drop(lo);
    let fsck = run_output("e2fsck", &["-fn", rig.mirror_img.to_str().unwrap()], None);
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the mirror image found problems ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert_eq!(rig.full_copies(), 1);
}

// ------------------------------------------------------------------------------------------
// 2. kill -9 of the mirror at random moments: every recovered state is a prefix state (I1).
// ------------------------------------------------------------------------------------------

/// workload.py writes its plan through the primary in pieces of 1200 writes, one piece running
/// in the background during each round; each round kills the mirror with SIGKILL at a random
/// moment (0.2-1.0 s into the piece), runs `recover`, checks with crashcheck.py that the
/// image is the state after a prefix of the plan (and that the prefix never goes back), and
/// restarts the mirror. At the end: lag 0, mirror == primary, crashcheck --min-seq = writes.
///
/// Why pieces rather than one long run: after a mirror restart the primary only notices its
/// old connection is dead after QUIC's 10 s idle timeout, so one run of a few seconds would be
/// over before the second round; each round first waits for the link to be back up, then
/// writes.
#[test]
fn mirror_kill9_rounds_keep_a_valid_crash_state() {
    let rounds: u64 = std::env::var("BLKMIRROR_TORTURE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10)
        .max(1);
    let seed: u64 = 0x5EED_0001;
    // Each piece is long enough (about 1 s at the ~1000 writes/s of workload.py on a debug
    // build) that the kill usually lands while it is still writing.
    let per_round: u64 = 1200;
    let writes: u64 = per_round * rounds;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    let mut rig = Pair::running(PairOptions::default());

    let started = Instant::now();
    let mut next_seq = 1;
    let mut last_prefix = 0;
    let mut log = Vec::new();
    for round in 1..=rounds {
        rig.wait(
            &format!("round {round}: a primary attached to the mirror"),
            LONG,
            |m, _| m["link"] == "up",
        );
        let mut piece = (next_seq <= writes).then(|| {
            let end = (next_seq + per_round - 1).min(writes);
            let w = rig.workload(seed, next_seq, end);
            next_seq = end + 1;
            w
        });
        let sleep_ms = 200 + rng.next() % 801;
        std::thread::sleep(Duration::from_millis(sleep_ms));
        let writing = piece.as_mut().is_some_and(|p| p.is_running());
        let before_kill = vol0(&rig.mirror.status());
        rig.mirror.kill9();
        let report = rig.recover();
        let prefix = crashcheck(&rig.mirror_img, seed, writes, None).unwrap_or_else(|out| {
            panic!(
                "round {round}: the mirror image after kill -9 + recover is not a prefix \
                 state of the plan:\n{out}\nrecover: {report}\nmirror log:\n{}",
                tail_lines(&rig.mirror.log(), 30)
            )
        });
        // Acknowledged means durable: what the mirror had acknowledged before the kill
        // survives it.
        assert_eq!(report["consistent"], true, "round {round}: {report}");
        assert!(
            u(&report, "applied_set") >= u(&before_kill, "acked_set")
                && u(&report, "applied_seq") >= u(&before_kill, "durable_seq"),
            "round {round}: the mirror acknowledged set {} (seq {}) before the kill, but              recover only reached set {} (seq {})",
            before_kill["acked_set"],
            before_kill["durable_seq"],
            report["applied_set"],
            report["applied_seq"]
        );
        assert!(
            prefix >= last_prefix,
            "round {round}: the mirror went back from the state after write {last_prefix} \
             to the state after write {prefix}"
        );
        last_prefix = prefix;
        log.push(format!(
            "round {round}: slept {sleep_ms} ms, workload {}, mirror acked_set {} before the \
             kill, recover replayed {} sets, prefix {prefix}",
            if writing { "writing" } else { "idle" },
            before_kill["acked_set"],
            report["replayed_sets"],
        ));
        rig.mirror.start();
        if let Some(mut p) = piece {
            p.wait_success();
        }
    }
    if next_seq <= writes {
        rig.workload(seed, next_seq, writes).wait_success();
    }
    rig.wait_synced();
    rig.finish_and_compare();
    let prefix = crashcheck(&rig.mirror_img, seed, writes, Some(writes))
        .unwrap_or_else(|out| panic!("final mirror image fails crashcheck:\n{out}"));
    assert_eq!(prefix, writes);
    assert_eq!(
        rig.full_copies(),
        1,
        "a mirror restart caused a new full copy"
    );
    eprintln!(
        "mirror_kill9_rounds: {rounds} rounds of kill -9 in {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        log.join("\n")
    );
}

// ------------------------------------------------------------------------------------------
// 3. kill -9 of the primary: the journal carries on, no new full copy.
// ------------------------------------------------------------------------------------------

#[test]
fn primary_kill9_resumes_from_journal() {
    let mut rig = Pair::running(PairOptions::default());
    let mut w = rig.workload(31, 1, 6000);
    // Kill once a good part of the workload is journaled (not after a fixed time).
    let (_, p) = rig.wait("the workload is under way", LONG, |_, p| {
        u(p, "journal_seq") >= 2000
    });
    rig.primary.kill9();
    let status = w.wait();
    assert!(
        !status.success(),
        "the workload should have lost its server (journal_seq {} at the kill); output:\n{}",
        p["journal_seq"],
        w.output()
    );
    rig.primary.start();
    rig.wait("link up after the restart", LONG, |_, p| p["link"] == "up");
    rig.workload(32, 1, 1500).wait_success();
    rig.wait_synced();
    rig.finish_and_compare();
    assert_eq!(
        rig.full_copies(),
        1,
        "the restarted primary started a new full copy; log:\n{}",
        rig.primary.log()
    );
    assert_eq!(rig.primary.starts, 2);
}

// ------------------------------------------------------------------------------------------
// 4. Link outages through a UDP relay: short blip, then longer than the idle timeout.
// ------------------------------------------------------------------------------------------

/// A UDP relay on 127.0.0.1: datagrams from the client go to `target`, datagrams from
/// `target` go back to the last client address; `drop_all` discards everything both ways.
struct Relay {
    port: u16,
    drop_all: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn big_buffers(s: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let v: usize = 8 << 20;
    if setsockopt(s, sockopt::RcvBufForce, &v).is_err() {
        let _ = setsockopt(s, sockopt::RcvBuf, &v);
    }
    if setsockopt(s, sockopt::SndBufForce, &v).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &v);
    }
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(target).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            big_buffers(s);
        }
        let port = front.local_addr().unwrap().port();
        let drop_all = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let front2 = front.try_clone().unwrap();
        let back2 = back.try_clone().unwrap();
        let up = {
            let (drop_all, stop, dropped, client) = (
                drop_all.clone(),
                stop.clone(),
                dropped.clone(),
                client.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *client.lock().unwrap() = Some(from);
                    if drop_all.load(Ordering::Relaxed) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let _ = back.send(&buf[..n]);
                }
            })
        };
        let down = {
            let (drop_all, stop, dropped) = (drop_all.clone(), stop.clone(), dropped.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    // Errors (e.g. ECONNREFUSED while the mirror is down) are ignored.
                    let Ok(n) = back2.recv(&mut buf) else {
                        continue;
                    };
                    if drop_all.load(Ordering::Relaxed) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let to = *client.lock().unwrap();
                    if let Some(to) = to {
                        let _ = front2.send_to(&buf[..n], to);
                    }
                }
            })
        };
        Relay {
            port,
            drop_all,
            stop,
            dropped,
            threads: vec![up, down],
        }
    }

    fn set_drop(&self, on: bool) {
        self.drop_all.store(on, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn link_blip_resumes_without_new_copy() {
    // The relay needs the mirror's port before the mirror starts: take a free one for it.
    let mirror_port = free_udp_port();
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], mirror_port)));
    let mut rig = Pair::running(PairOptions {
        mirror_port: Some(mirror_port),
        mirror_addr: Some(format!("127.0.0.1:{}", relay.port)),
        ..Default::default()
    });
    let seed = 41;
    let writes = 6000;

    // A 4 s blip while writing: shorter than the idle timeout.
    let mut w = rig.workload(seed, 1, 3000);
    rig.wait("writes under way", LONG, |_, p| u(p, "journal_seq") >= 200);
    relay.set_drop(true);
    std::thread::sleep(Duration::from_secs(4));
    relay.set_drop(false);
    w.wait_success();
    let (_, p) = rig.wait_synced();
    let reconnects_after_blip = u(&p, "reconnects");

    // 12 s or more: past the 10 s idle timeout, so the link must go down and come back.
    let mut w = rig.workload(seed, 3001, writes);
    rig.wait("writes under way", LONG, |_, p| {
        u(p, "journal_seq") >= u(p, "acked_seq") + 200 || u(p, "lag_bytes") > 0
    });
    relay.set_drop(true);
    let outage = Instant::now();
    let mut max_lag = 0;
    rig.wait(
        "the primary sees the link down during the outage",
        LONG,
        |_, p| {
            max_lag = max_lag.max(u(p, "lag_bytes"));
            p["link"] == "down" && outage.elapsed() >= Duration::from_secs(12)
        },
    );
    relay.set_drop(false);
    let (_, p) = rig.wait("link up again after the outage", LONG, |_, p| {
        p["link"] == "up"
    });
    eprintln!(
        "link_blip: outage of {:.1} s, {} datagrams dropped, lag up to {max_lag} bytes; \
         last_error {}",
        outage.elapsed().as_secs_f64(),
        relay.dropped.load(Ordering::Relaxed),
        p["last_error"]
    );
    w.wait_success();
    let (_, p) = rig.wait_synced();
    assert!(
        u(&p, "reconnects") > reconnects_after_blip,
        "the 12 s outage did not cause a reconnect: {p}"
    );
    eprintln!(
        "link_blip: reconnects after the 4 s blip: {reconnects_after_blip}, after the 12 s \
         outage: {}",
        p["reconnects"]
    );
    rig.finish_and_compare();
    crashcheck(&rig.mirror_img, seed, writes, Some(writes))
        .unwrap_or_else(|out| panic!("mirror image fails crashcheck:\n{out}"));
    assert_eq!(
        rig.full_copies(),
        1,
        "an outage caused a new full copy; primary log:\n{}",
        rig.primary.log()
    );
}

/// Tried: the mirror's first session acknowledges nothing while its link stays up (test hook
/// `BLKMIRROR_TEST_WITHHOLD_ACKS_SESSIONS=1`: sets arrive and are made durable, the Acks are
/// not sent), as a stream that stalls for good did with 128 volumes; the primary's stall
/// watchdog is cut to 3 s (`BLKMIRROR_TEST_STALL_TIMEOUT_MS`, 30 s in production).
///
/// Expected: the primary ends that session as stalled (its log says "stalled: no
/// acknowledgement", status `stalls` 1), connects again by itself, the second session
/// resumes from what the mirror made durable (no second full copy), data written afterwards
/// replicates (lag 0) and the mirror ends byte-identical; the watchdog fires once only.
#[test]
fn a_stalled_stream_is_ended_reported_and_resumed() {
    let mut rig = rig(PairOptions::default());
    rig.mirror.stop();
    rig.mirror
        .envs
        .push(("BLKMIRROR_TEST_WITHHOLD_ACKS_SESSIONS".into(), "1".into()));
    rig.mirror.start();
    rig.primary
        .envs
        .push(("BLKMIRROR_TEST_STALL_TIMEOUT_MS".into(), "3000".into()));
    rig.primary.start();
    let (_, p) = rig.wait("the watchdog ended the first session", LONG, |_, p| {
        u(p, "stalls") >= 1
    });
    assert_eq!(u(&p, "stalls"), 1, "{p}");
    let log = rig.primary.log();
    assert!(
        log.contains("stalled: no acknowledgement for 3 s"),
        "the primary's log names the stall:\n{}",
        tail_lines(&log, 30)
    );
    assert!(
        rig.mirror
            .log()
            .contains("test hook: acknowledgement withheld"),
        "the hook was active"
    );
    rig.wait_consistent();
    rig.nbd_write(8 * MIB, &pseudo_random(4 * MIB as usize, 77));
    let (m, p) = rig.wait_synced();
    assert_eq!(u(&p, "stalls"), 1, "the second session never stalls: {p}");
    assert!(
        u(&m, "reconnects") >= 1,
        "the mirror saw a second session: {m}"
    );
    assert_eq!(
        rig.full_copies(),
        1,
        "the stall caused a new full copy:\n{}",
        rig.primary.log()
    );
    rig.finish_and_compare();
}

/// Tried: a mirror pre-seeded with a copy of the primary's volume (as a restored backup or a
/// disk shipped by courier would be: 64 MiB of data), made before the primary changed 3 MiB
/// of it; the mirror's state directory is new.
///
/// Expected: the decision is a comparison that names the pre-seeded volume, not a full copy;
/// only the chunks that differ cross the link (the primary's `sent_bytes` under 8 MiB, far
/// below the 64 MiB a copy sends), and the mirror ends byte-identical.
#[test]
fn a_preseeded_mirror_receives_only_what_differs() {
    let mut rig = Pair::new(PairOptions::default());
    std::fs::write(&rig.primary_img, pseudo_random(SIZE as usize, 901)).unwrap();
    std::fs::copy(&rig.primary_img, &rig.mirror_img).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&rig.primary_img)
            .unwrap();
        f.write_all_at(&pseudo_random(3 * MIB as usize, 902), 20 * MIB)
            .unwrap();
    }
    rig.mirror.start();
    rig.primary.start();
    let (m, p) = rig.wait_synced();
    let decision = p["last_decision"].to_string();
    assert!(
        decision.contains("pre-seeded") && decision.contains("compare"),
        "the decision: {p}"
    );
    assert!(
        u(&p, "sent_bytes") < 8 * MIB,
        "only the differing chunks are sent: {p}\n{m}"
    );
    assert!(
        rig.primary.log().contains("compare=true"),
        "a comparison, not a copy:\n{}",
        rig.primary.log()
    );
    eprintln!(
        "preseeded: sent {} bytes, {} on the wire, for 3 MiB changed of 64 MiB",
        u(&p, "sent_bytes"),
        u(&p, "wire_bytes")
    );
    rig.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 5. Peers the mirror must refuse (I3).
// ------------------------------------------------------------------------------------------

#[test]
fn refused_peers_apply_nothing() {
    let mut rig = Pair::running(PairOptions::default());
    rig.nbd_write(MIB, &pseudo_random(6 * MIB as usize, 51));
    rig.wait_synced();
    rig.primary.stop();
    rig.wait("mirror link down", LONG, |m, _| m["link"] == "down");
    let baseline = rig.mirror_holds();

    let d = rig.dir().to_path_buf();
    // (a) a certificate named "primary" from another CA (trusting the right CA itself).
    let other = d.join("pki-other");
    certs_init(&other, &["primary"]);
    // (b) the right CA, the wrong name.
    certs_issue(&rig.pki, "intruder", &[]);
    // (c) the right CA and name, expired.
    let expired = d.join("pki-expired");
    std::fs::create_dir(&expired).unwrap();
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(rig.pki.join(f), expired.join(f)).unwrap();
    }
    certs_issue(&expired, "primary", &["--expired"]);

    let cases: [(&str, &Path, &str, &[&str]); 3] = [
        ("other-ca", &other, "primary", &["UnknownIssuer", "unknown"]),
        (
            "wrong-name",
            &rig.pki,
            "intruder",
            &["intruder", "name", "NotValidForName"],
        ),
        ("expired", &expired, "primary", &["Expired", "expired"]),
    ];
    let mut reasons = Vec::new();
    for (label, cert_dir, cert_name, keywords) in cases {
        let refusals_before = rig.mirror.log().matches("peer refused").count();
        // A volume with data of its own: had the mirror accepted it, a full copy would follow.
        let img = d.join(format!("bad-{label}.img"));
        let mut data = pseudo_random(SIZE as usize, 52);
        data[..4].copy_from_slice(b"EVIL");
        std::fs::write(&img, &data).unwrap();
        drop(data);
        let state = d.join(format!("bad-{label}-state"));
        let args = rig.primary_args(
            &img,
            &d.join(format!("bad-{label}.sock")),
            &state,
            &format!("127.0.0.1:{}", rig.port),
            cert_dir,
            cert_name,
            &[],
        );
        let mut bad = Daemon::new(
            &format!("primary ({label})"),
            args,
            d.join(format!("bad-{label}.log")),
            state.join("control.sock"),
            Some(d.join(format!("bad-{label}.sock"))),
        );
        bad.start();
        let deadline = Instant::now() + LONG;
        let last = loop {
            let last = vol0(&bad.status());
            let refused = last["link"] == "down"
                && last["last_error"].as_str().is_some_and(|e| !e.is_empty())
                && rig.mirror.log().matches("peer refused").count() > refusals_before;
            if refused {
                break last;
            }
            assert!(
                Instant::now() < deadline,
                "{label}: no refusal seen; last status of the bad primary: {last}\n\
                 bad primary log:\n{}\nmirror log:\n{}",
                tail_lines(&bad.log(), 20),
                tail_lines(&rig.mirror.log(), 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_ne!(last["link"], "up");
        bad.stop();
        let mirror_log = rig.mirror.log();
        let line = mirror_log
            .lines()
            .filter(|l| l.contains("peer refused"))
            .nth(refusals_before)
            .unwrap_or_default()
            .to_string();
        assert!(
            keywords.iter().any(|k| line.contains(k)),
            "{label}: the mirror's refusal does not say why (expected one of {keywords:?}): \
             {line}"
        );
        reasons.push(format!(
            "{label}: primary last_error {} | mirror: {line}",
            last["last_error"]
        ));
        assert_eq!(
            rig.mirror_holds(),
            baseline,
            "{label}: the mirror's state or volume changed after a refused peer"
        );
        assert_eq!(
            bad.log().matches("replication link up").count(),
            0,
            "{label}: the refused primary believed it was connected:\n{}",
            bad.log()
        );
    }

    // (d) garbage datagrams, some shaped like QUIC Initial packets.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u64 {
        let len = 1 + (i as usize * 37) % 1400;
        let mut dgram = pseudo_random(len.max(1200 * (i % 2) as usize), 600 + i);
        if i % 2 == 1 {
            // Long header, Initial, QUIC v1, 8-byte connection ids, then junk.
            dgram[0] = 0xC3;
            dgram[1..5].copy_from_slice(&1u32.to_be_bytes());
            dgram[5] = 8;
            dgram[14] = 8;
        }
        junk.send_to(&dgram, rig.mirror_addr()).unwrap();
    }
    // The mirror still answers (its control socket and, below, a good primary).
    rig.wait("mirror alive after garbage", LONG, |m, _| m["name"] == VOL);
    assert_eq!(
        rig.mirror_holds(),
        baseline,
        "garbage datagrams changed the mirror"
    );

    // A good primary still replicates.
    rig.primary.start();
    rig.nbd_write(20 * MIB, &pseudo_random(3 * MIB as usize, 53));
    rig.wait_synced();
    rig.finish_and_compare();
    assert_eq!(rig.full_copies(), 1);
    eprintln!("refused_peers:\n{}", reasons.join("\n"));
}

// ------------------------------------------------------------------------------------------
// 6. A corrupted frame is detected by its CRC, dropped, and re-sent (I4).
// ------------------------------------------------------------------------------------------

#[test]
fn corrupted_frame_is_detected_and_resent() {
    let mut rig = Pair::running(PairOptions {
        primary_extra: vec!["--test-corrupt-first-set".into()],
        ..Default::default()
    });
    rig.nbd_write(2 * MIB, &pseudo_random(4 * MIB as usize, 61));
    assert!(
        rig.mirror
            .wait_for_log_count("CRC32 mismatch", 1, Duration::from_secs(60)),
        "the mirror never reported the CRC mismatch; log:\n{}",
        tail_lines(&rig.mirror.log(), 30)
    );
    assert!(rig.mirror.wait_for_log_count(
        "replication session dropped",
        1,
        Duration::from_secs(60)
    ));
    assert!(rig.primary.log().contains("test hook: corrupted"));
    rig.wait("the primary reconnected", LONG, |_, p| {
        u(p, "reconnects") >= 1 && p["link"] == "up"
    });
    rig.wait_synced();
    rig.finish_and_compare();
    assert_eq!(rig.full_copies(), 1);
}

// ------------------------------------------------------------------------------------------
// 7. A hand-made client with a valid certificate sends bad protocol input (I4).
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug
enum Reply {
    Msg(Message),
    /// The mirror finished its side of the stream.
    Finished,
    /// The stream or connection failed (e.g. the mirror closed the connection).
    Closed(String),
    Timeout,
}

impl Reply {
    fn refuse_reason(&self) -> Option<&str> {
        match self {
            Reply::Msg(Message::Refuse { reason, .. }) => Some(reason),
            _ => None,
        }
    }
}

async fn next_reply(recv: &mut quinn::RecvStream, buf: &mut Vec<u8>) -> Reply {
    let fut = async {
        loop {
            match frame::decode_one(buf) {
                Ok(Some((m, used))) => {
                    buf.drain(..used);
                    return Reply::Msg(m);
                }
                Ok(None) => {}
                Err(e) => return Reply::Closed(format!("undecodable reply: {e}")),
            }
            let mut chunk = vec![0u8; 64 << 10];
            match recv.read(&mut chunk).await {
                Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(None) => return Reply::Finished,
                Err(e) => return Reply::Closed(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or(Reply::Timeout)
}

struct Attacker {
    rt: tokio::runtime::Runtime,
    ep: quinn::Endpoint,
    id: Identity,
    addr: SocketAddr,
}

/// One stream of one connection of the attacker.
struct Conn {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

impl Attacker {
    fn new(pki: &Path, addr: SocketAddr) -> Attacker {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let id = Identity::load(&TlsFiles {
            ca: pki.join("ca.crt"),
            cert: pki.join("primary.crt"),
            key: pki.join("primary.key"),
            peer_name: "mirror".into(),
        })
        .expect("load the primary's identity");
        let ep = {
            let _g = rt.enter();
            client_endpoint(&id, &Tuning::default()).expect("client endpoint")
        };
        Attacker { rt, ep, id, addr }
    }

    fn open(&self) -> Conn {
        self.rt.block_on(async {
            let conn = connect(&self.ep, self.addr, &self.id)
                .await
                .expect("a valid primary certificate connects");
            let (send, recv) = conn.open_bi().await.expect("open a stream");
            Conn {
                conn,
                send,
                recv,
                buf: Vec::new(),
            }
        })
    }

    fn send(&self, c: &mut Conn, bytes: &[u8]) {
        self.rt
            .block_on(c.send.write_all(bytes))
            .expect("write to the stream");
    }

    fn send_msg(&self, c: &mut Conn, msg: &Message) {
        let mut buf = Vec::new();
        frame::encode(msg, &mut buf);
        self.send(c, &buf);
    }

    fn reply(&self, c: &mut Conn) -> Reply {
        match self.rt.block_on(next_reply(&mut c.recv, &mut c.buf)) {
            // Say how the connection was closed (quinn's read error only says "lost").
            Reply::Closed(e) => Reply::Closed(match c.conn.close_reason() {
                Some(why) => format!("{e} ({why})"),
                None => e,
            }),
            other => other,
        }
    }

    /// Open a stream, say Hello for `volume`, return the reply.
    fn hello(&self, volume: &str, size: u64) -> (Conn, Reply) {
        let mut c = self.open();
        self.send_msg(
            &mut c,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                volume: volume.into(),
                size,
            },
        );
        let r = self.reply(&mut c);
        (c, r)
    }

    /// Hello and Identify for vol1 as the real primary would say them (its identity and
    /// generations read from its state file: what a compromised primary knows), expecting a
    /// decision to resume; returns the stream, durable_set and durable_seq.
    fn attach(&self, primary_state: &Path) -> (Conn, u64, u64) {
        let st: PrimaryVolumeState = serde_json::from_slice(
            &std::fs::read(primary_state.join("volumes").join(format!("{VOL}.json")))
                .expect("the primary's state file"),
        )
        .expect("a primary state file");
        let mut c = self.open();
        self.send_msg(
            &mut c,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                volume: VOL.into(),
                size: SIZE,
            },
        );
        self.send_msg(
            &mut c,
            &Message::Identify(Box::new(PrimaryClaim {
                uuid: st.identity.uuid,
                lineage: st.identity.lineage.clone(),
                journal_acked: 0,
                // Claims to hold whatever the mirror holds.
                journal_last: 1 << 40,
                fingerprint: st.identity.fingerprint.clone().expect("a fingerprint"),
                resync_from: None,
            })),
        );
        match self.reply(&mut c) {
            Reply::Msg(Message::Decision {
                mode,
                durable_set,
                durable_seq,
                reason,
                ..
            }) => {
                assert_eq!(mode, Mode::Resume, "the mirror should resume: {reason}");
                (c, durable_set, durable_seq)
            }
            other => panic!("expected a Decision, got {other:?}"),
        }
    }

    fn close(&self, c: Conn) {
        c.conn.close(0u32.into(), b"test over");
    }
}

fn data_set(set: u64, seq: u64, offset: u64, len: usize, seed: u64) -> DeltaSet {
    DeltaSet {
        set,
        first_seq: seq,
        last_seq: seq,
        newest_write_ms: 0,
        kind: SetKind::Journal,
        extents: vec![Extent {
            offset,
            payload: Payload::Data(bytes::Bytes::from(pseudo_random(len, seed))),
        }],
    }
}

#[test]
fn bad_wire_input_is_refused() {
    let mut rig = Pair::running(PairOptions::default());
    rig.nbd_write(0, &pseudo_random(2 * MIB as usize, 71));
    rig.wait_synced();
    // The attacker's Hello would replace a live primary's session: stop the good one.
    rig.primary.stop();
    rig.wait("mirror link down", LONG, |m, _| m["link"] == "down");
    let baseline = rig.mirror_holds();
    let a = Attacker::new(&rig.pki, rig.mirror_addr());
    let primary_state = rig.primary_state.clone();
    let mut outcomes = Vec::new();
    let dropped = |rig: &Pair| {
        rig.mirror
            .log()
            .matches("replication session dropped")
            .count()
    };
    let refused_streams = |rig: &Pair| {
        rig.mirror
            .log()
            .matches("refused replication stream")
            .count()
    };
    let check_unchanged = |rig: &Pair, what: &str| {
        // The mirror has logged the outcome by now; the state and volume must be as before.
        assert_eq!(
            rig.mirror_holds(),
            baseline,
            "{what}: the mirror's state or volume changed"
        );
    };

    // (a) Hello for a volume the mirror does not have.
    let (c, r) = a.hello("no-such-volume", SIZE);
    outcomes.push(format!("(a) unknown volume: {r:?}"));
    assert!(
        r.refuse_reason()
            .is_some_and(|s| s.contains("no volume named")),
        "(a) expected Refuse, got {r:?}"
    );
    a.close(c);
    check_unchanged(&rig, "(a)");

    // (a') Hello with the wrong size.
    let (c, r) = a.hello(VOL, SIZE + 4096);
    outcomes.push(format!("(a') wrong size: {r:?}"));
    assert!(
        r.refuse_reason().is_some_and(|s| s.contains("bytes")),
        "(a') expected Refuse, got {r:?}"
    );
    a.close(c);
    check_unchanged(&rig, "(a')");

    // (b) a set from the future.
    let before = dropped(&rig);
    let (mut c, durable_set, durable_seq) = a.attach(&primary_state);
    let set = data_set(durable_set + 5, durable_seq + 1, 0, 8192, 72);
    a.send_msg(&mut c, &Message::Set(set));
    let r = a.reply(&mut c);
    outcomes.push(format!(
        "(b) set {} from the future: {r:?}",
        durable_set + 5
    ));
    assert!(
        rig.mirror
            .wait_for_log_count("replication session dropped", before + 1, LONG),
        "(b) the mirror did not drop the session"
    );
    assert!(rig.mirror.log().contains("from the future"));
    a.close(c);
    check_unchanged(&rig, "(b)");
    let b_reply_ok = r
        .refuse_reason()
        .is_some_and(|s| s.contains("from the future"));

    // (b') a set already durable, and one writing past the volume's end.
    let before = dropped(&rig);
    let (mut c, durable_set, durable_seq) = a.attach(&primary_state);
    a.send_msg(
        &mut c,
        &Message::Set(data_set(durable_set, durable_seq, 0, 4096, 73)),
    );
    let r = a.reply(&mut c);
    outcomes.push(format!("(b') set {durable_set} already durable: {r:?}"));
    assert!(rig
        .mirror
        .wait_for_log_count("replication session dropped", before + 1, LONG));
    a.close(c);
    check_unchanged(&rig, "(b') already durable");
    let before = dropped(&rig);
    let (mut c, durable_set, durable_seq) = a.attach(&primary_state);
    a.send_msg(
        &mut c,
        &Message::Set(data_set(
            durable_set + 1,
            durable_seq + 1,
            SIZE - 4096,
            8192,
            74,
        )),
    );
    let r = a.reply(&mut c);
    outcomes.push(format!("(b') set past the end: {r:?}"));
    assert!(rig
        .mirror
        .wait_for_log_count("replication session dropped", before + 1, LONG));
    assert!(rig.mirror.log().contains("past the volume's end"));
    a.close(c);
    check_unchanged(&rig, "(b') past the end");

    // (c) half a (valid, next) set, then the end of the stream.
    let before = dropped(&rig);
    let (mut c, durable_set, durable_seq) = a.attach(&primary_state);
    let mut buf = Vec::new();
    frame::encode(
        &Message::Set(data_set(durable_set + 1, durable_seq + 1, 0, 65536, 75)),
        &mut buf,
    );
    a.send(&mut c, &buf[..buf.len() / 2]);
    c.send.finish().expect("finish the stream");
    let r = a.reply(&mut c);
    outcomes.push(format!("(c) truncated set: {r:?}"));
    assert!(
        rig.mirror
            .wait_for_log_count("replication session dropped", before + 1, LONG),
        "(c) the mirror did not report the truncated message; log:\n{}",
        tail_lines(&rig.mirror.log(), 20)
    );
    assert!(rig.mirror.log().contains("in the middle of a message"));
    a.close(c);
    check_unchanged(&rig, "(c)");

    // (d) a frame header claiming a 4 GiB body, inside a session and as the first message.
    let before = dropped(&rig);
    let (mut c, _, _) = a.attach(&primary_state);
    let mut huge = vec![0xFF, 0xFF, 0xFF, 0xFF, 3];
    huge.extend_from_slice(&pseudo_random(1000, 76));
    a.send(&mut c, &huge);
    let r = a.reply(&mut c);
    outcomes.push(format!("(d) 4 GiB frame in a session: {r:?}"));
    let refused_or_closed = |r: &Reply| {
        matches!(r, Reply::Closed(_) | Reply::Finished)
            || r.refuse_reason().is_some_and(|s| s.contains("exceeds"))
    };
    assert!(
        refused_or_closed(&r),
        "(d) expected Refuse or close, got {r:?}"
    );
    assert!(rig
        .mirror
        .wait_for_log_count("replication session dropped", before + 1, LONG));
    a.close(c);
    check_unchanged(&rig, "(d)");
    let before = refused_streams(&rig);
    let mut c = a.open();
    a.send(&mut c, &huge);
    let r = a.reply(&mut c);
    outcomes.push(format!("(d) 4 GiB frame instead of Hello: {r:?}"));
    assert!(
        refused_or_closed(&r),
        "(d) expected Refuse or close, got {r:?}"
    );
    assert!(rig
        .mirror
        .wait_for_log_count("refused replication stream", before + 1, LONG));
    a.close(c);
    check_unchanged(&rig, "(d) first message");
    a.rt.block_on(a.ep.wait_idle());

    // A good primary still replicates.
    rig.primary.start();
    rig.nbd_write(8 * MIB, &pseudo_random(2 * MIB as usize, 77));
    rig.wait_synced();
    rig.finish_and_compare();
    eprintln!("bad_wire_input:\n{}", outcomes.join("\n"));
    assert!(
        b_reply_ok,
        "(b) the mirror logged the refusal of a set from the future, but the client never \
         received the Refuse message (it was: {})",
        outcomes[2]
    );
}

// ------------------------------------------------------------------------------------------
// 8. Status: both forms, every contract key, lag, and the initial copy.
// ------------------------------------------------------------------------------------------

const COMMON_KEYS: &[&str] = &[
    "name",
    "link",
    "lag_bytes",
    "lag_seconds",
    "journal_bytes",
    "sent_bytes",
    "wire_bytes",
    "acked_set",
    "applied_set",
    "reconnects",
    "last_error",
];
const MIRROR_KEYS: &[&str] = &[
    "consistent",
    "copy",
    "state",
    "durable_seq",
    "applied_seq",
    "refused",
];
const PRIMARY_KEYS: &[&str] = &["initial_copy", "journal_seq", "acked_seq"];

/// `blkmirror status` (`--json` or not): its stdout; it must exit 0, or 6 saying which volume
/// is not replicating.
fn cli_status_out(control: &Path, json: bool) -> String {
    let (code, out, err) = status_exit(control, json);
    assert!(
        code == Some(0) && err.is_empty() || code == Some(6) && err.contains("not replicating"),
        "status (json={json}) exited {code:?}:\n{out}{err}"
    );
    out
}

/// `blkmirror status` in both forms; checks the contract keys; returns the JSON.
fn cli_status(control: &Path, role: &str) -> Value {
    let json = cli_status_out(control, true);
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json:?}: {e}"));
    assert_eq!(v["role"], role, "{json}");
    let vols = v["volumes"].as_array().expect("volumes is an array");
    assert_eq!(vols.len(), 1, "{json}");
    let extra = if role == "mirror" {
        MIRROR_KEYS
    } else {
        PRIMARY_KEYS
    };
    for k in COMMON_KEYS.iter().chain(extra) {
        assert!(
            vols[0].get(*k).is_some(),
            "{role} status lacks {k:?}: {json}"
        );
    }
    assert_eq!(vols[0]["name"], VOL);
    let human = cli_status_out(control, false);
    assert!(
        human.starts_with(&format!("role: {role}\n")),
        "human status:\n{human}"
    );
    assert!(
        human.contains("LAG BYTES") && human.contains("ACKED SET"),
        "{human}"
    );
    assert!(
        human.lines().any(|l| l.starts_with(&format!("{VOL}  "))),
        "human status has no line for {VOL}:\n{human}"
    );
    v
}

#[test]
fn status_reports_lag_and_initial_copy() {
    let mut rig = rig(PairOptions::default());
    // The primary's volume holds data before any mirror has seen it: 40 MiB of random data,
    // the rest a hole.
    {
        let f = std::fs::File::create(&rig.primary_img).unwrap();
        f.set_len(SIZE).unwrap();
        use std::os::unix::fs::FileExt;
        for i in 0..10u64 {
            f.write_all_at(&pseudo_random(4 * MIB as usize, 80 + i), i * 4 * MIB)
                .unwrap();
        }
    }
    let m = cli_status(&rig.mirror.control, "mirror");
    let m0 = &m["volumes"][0];
    assert_eq!(
        m0["consistent"], false,
        "a new mirror is not consistent: {m}"
    );
    assert_eq!(m0["copy"], "none", "{m}");
    assert_eq!(m0["link"], "down", "{m}");

    rig.primary.start();
    let mut seen_copy_progress = None;
    let mut seen_mirror_copying = false;
    rig.wait("initial copy done, mirror consistent", LONG, |m, p| {
        if let Some(ic) = p.get("initial_copy").filter(|c| !c.is_null()) {
            assert_eq!(ic["total_bytes"], SIZE, "{p}");
            assert!(u(ic, "done_bytes") <= SIZE, "{p}");
            seen_copy_progress.get_or_insert(ic.clone());
        }
        if m["copy"] == "running" {
            assert_eq!(m["consistent"], false, "consistent during the copy: {m}");
            seen_mirror_copying = true;
        }
        m["consistent"] == true && p["initial_copy"].is_null() && p["link"] == "up"
    });
    assert!(rig.primary.log().contains("full copy sent"));
    cli_status(&rig.primary.control, "primary");
    let m = cli_status(&rig.mirror.control, "mirror");
    assert_eq!(m["volumes"][0]["copy"], "done", "{m}");
    assert_eq!(m["volumes"][0]["state"], "replicating", "{m}");
    assert_eq!(m["volumes"][0]["state_detail"], "consistent", "{m}");

    // A write burst: lag shows, acked_set grows, then lag 0.
    let (_, p) = rig.wait_synced();
    let acked_before = u(&p, "acked_set");
    let mut w = rig.workload(81, 1, 3000);
    let mut max_lag = 0;
    while w.is_running() {
        let p = vol0(&rig.primary.status());
        max_lag = max_lag.max(u(&p, "lag_bytes"));
        std::thread::sleep(Duration::from_millis(100));
    }
    w.wait_success();
    let (m, p) = rig.wait_synced();
    assert!(
        max_lag > 0 || u(&p, "acked_set") > acked_before,
        "neither lag nor acknowledgements moved during the burst: {p}"
    );
    assert!(u(&p, "acked_set") > acked_before, "{p}");
    assert!(u(&p, "sent_bytes") > 0 && u(&p, "wire_bytes") > 0, "{p}");
    // On loopback, MTU discovery goes far beyond Ethernet's 1500 bytes: the data above crossed
    // in datagrams too large for quinn's 10-datagram batches to fit one UDP send, so it also
    // proves such batches are split, not lost.
    assert!(u(&p["quic"], "mtu") > 9000, "{p}");
    assert!(u(&m, "durable_seq") > 0 && u(&m, "applied_seq") > 0, "{m}");
    let p = cli_status(&rig.primary.control, "primary");
    assert_eq!(p["volumes"][0]["lag_bytes"], 0);
    assert_eq!(p["volumes"][0]["link"], "up");
    cli_status(&rig.mirror.control, "mirror");
    rig.finish_and_compare();
    assert_eq!(rig.full_copies(), 1);
    eprintln!(
        "status: initial copy progress seen: {seen_copy_progress:?}; mirror seen copying: \
         {seen_mirror_copying}; max lag_bytes during the burst: {max_lag}"
    );
}

// ------------------------------------------------------------------------------------------
// 9. `status` exit code: 6 while a volume is not replicating, 0 once it is.
// ------------------------------------------------------------------------------------------

/// `blkmirror status [--json]`: (exit code, stdout, stderr).
fn status_exit(control: &Path, json: bool) -> (Option<i32>, String, String) {
    let mut args = vec!["status", "--control", control.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let o = run_output(BIN, &args, None);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A primary whose mirror address has nobody listening is not replicating: `status` exits 6
/// and names the volume and why, in both forms, and `--json` still prints the document. So
/// does the mirror before any primary came. Once the mirror is up and the copy done, both
/// exit 0.
#[test]
fn status_exits_6_until_volumes_replicate() {
    let mut rig = rig(PairOptions::default());
    let (code, out, err) = status_exit(&rig.mirror.control, false);
    assert_eq!(code, Some(6), "mirror, no primary yet:\n{out}{err}");
    assert!(err.contains(&format!("not replicating: {VOL} (")), "{err}");
    rig.mirror.stop();

    // Nothing listens at the primary's --mirror address.
    rig.primary.start();
    for json in [false, true] {
        let (code, out, err) = status_exit(&rig.primary.control, json);
        assert_eq!(code, Some(6), "json={json}:\n{out}{err}");
        assert!(
            err.contains(&format!("not replicating: {VOL} (link down)")),
            "json={json}: {err}"
        );
        if json {
            let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
            assert_eq!(v["volumes"][0]["link"], "down", "{v}");
        } else {
            assert!(out.starts_with("role: primary\n"), "{out}");
        }
    }

    rig.mirror.start();
    rig.wait_synced();
    for control in [&rig.primary.control, &rig.mirror.control] {
        for json in [false, true] {
            let (code, out, err) = status_exit(control, json);
            assert_eq!(
                code,
                Some(0),
                "{} json={json}:\n{out}{err}",
                control.display()
            );
            assert!(err.is_empty(), "{err}");
        }
    }
    rig.stop_both();
}

// ------------------------------------------------------------------------------------------
// 9. Writes that wait for journal space are woken when the mirror frees it (no polling).
// ------------------------------------------------------------------------------------------

/// libnbd: write `count` MiB over the volume (wrapping), each MiB stamped with its number, then
/// flush; prints "done".
const NBD_FILL_WRAPPING: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
count = int(sys.argv[2])
size = h.get_size()
buf = bytearray(1 << 20)
for i in range(count):
    buf[0:8] = i.to_bytes(8, "little")
    h.pwrite(bytes(buf), (i << 20) % size)
h.flush()
print("done")
"#;

/// The mirror is away and the clients write more than the journal holds (the smallest
/// journal, 64 MiB in 16 MiB segments): writes wait (the journal says full) without failing;
/// once the mirror is back, its acknowledgements free space and the waiting writes go on by
/// themselves, and the mirror ends byte-identical.
#[test]
fn writes_waiting_for_journal_space_resume_when_the_mirror_returns() {
    let mut rig = Pair::running(PairOptions {
        primary_extra: blocking_journal("64M"),
        ..Default::default()
    });
    assert!(rig.mirror.stop().is_some_and(|s| s.success()));
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-c", NBD_FILL_WRAPPING, &rig.uri(), "200"]);
    let mut writer = Background::spawn("a 200 MiB writer", c, &rig.dir().join("fill.out"));
    rig.wait("the journal full, writes waiting", LONG, |_, p| {
        p["journal_full"] == true
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        writer.is_running(),
        "the writer should wait: {}",
        writer.output()
    );
    rig.mirror.start();
    writer.wait_success();
    assert!(writer.output().contains("done"));
    let (_, p) = rig.wait_synced();
    assert_eq!(p["journal_full"], false, "{p}");
    rig.finish_and_compare();
}

/// A pair with a 64 MiB journal whose mirror is stopped while a client writes 200 MiB: the
/// writer finishes by itself and the journal folds into the dirty map. Returns the pair (its
/// mirror stopped) and the primary's status then.
fn pair_with_a_folded_journal() -> (Pair, Value) {
    let mut rig = Pair::running(PairOptions {
        primary_extra: vec!["--journal-size".into(), "64M".into()],
        ..Default::default()
    });
    assert!(rig.mirror.stop().is_some_and(|s| s.success()));
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-c", NBD_FILL_WRAPPING, &rig.uri(), "200"]);
    let mut writer = Background::spawn("a 200 MiB writer", c, &rig.dir().join("fill.out"));
    // No mirror: the writer must finish by itself.
    writer.wait_success();
    assert!(writer.output().contains("done"));
    let (_, p) = rig.wait("the journal folded", LONG, |_, p| {
        p["journal_tracking"] == true
    });
    (rig, p)
}

/// The mirror is away and the clients write three times what the journal holds, with the
/// default `--on-journal-full track`: the journal folds into the dirty map and the writer
/// finishes without waiting for the mirror (status says the journal is tracking, and how much
/// is dirty). Once the mirror is back, the dirty regions are resynced (staged at the mirror)
/// and the mirror ends byte-identical; the map is empty and the journal journals again. The
/// mirror says it is consistent at every sample meanwhile, while the staged resync is
/// applied too (status `committing_to_set`).
#[test]
fn a_full_journal_folds_into_the_dirty_map_and_writes_go_on() {
    let (mut rig, p) = pair_with_a_folded_journal();
    assert_eq!(p["journal_full"], false, "{p}");
    assert!(p["journal_folds"].as_u64().unwrap() >= 1, "{p}");
    let dirty = p["dirty_bytes"].as_u64().unwrap();
    assert!(
        dirty >= 64 << 20,
        "the dirty map covers what was written: {p}"
    );
    rig.mirror.start();
    let (mut inconsistent, mut committing) = (Vec::new(), 0);
    let (_, p) = rig.wait("the dirty regions resynced", LONG, |m, p| {
        if m["consistent"] == false {
            inconsistent.push(m.clone());
        }
        committing += usize::from(!m["committing_to_set"].is_null());
        synced(m, p)
    });
    assert!(
        inconsistent.is_empty(),
        "the mirror said it was not consistent during the resync: {inconsistent:?}"
    );
    assert_eq!(p["dirty_bytes"], 0, "{p}");
    assert_eq!(p["journal_tracking"], false, "{p}");
    eprintln!("samples while the staged resync was applied: {committing}");
    rig.finish_and_compare();
}

/// `--pace-above 50` with the mirror away: writes are held back while the journal fills past
/// half (status `journal_paced_writes`), never stopped: the journal still folds when it is
/// full and a 200 MiB writer finishes without the mirror; back, the mirror converges. A
/// percentage outside 1..=99 is a usage error (exit 2) naming the flag.
#[test]
fn pacing_holds_writes_back_but_never_stops_them() {
    let o = run_output(
        BIN,
        &[
            "primary",
            "--volume",
            "v=/nonexistent",
            "--pace-above",
            "100",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--pace-above"),
        "{o:?}"
    );
    let mut rig = Pair::running(PairOptions {
        primary_extra: ["--journal-size", "64M", "--pace-above", "50"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    assert!(rig.mirror.stop().is_some_and(|s| s.success()));
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-c", NBD_FILL_WRAPPING, &rig.uri(), "200"]);
    let mut writer = Background::spawn("a 200 MiB writer", c, &rig.dir().join("fill.out"));
    writer.wait_success();
    let (_, p) = rig.wait("the journal folded", LONG, |_, p| {
        p["journal_tracking"] == true
    });
    assert!(u(&p, "journal_paced_writes") > 0, "writes were paced: {p}");
    assert!(u(&p, "journal_folds") >= 1, "{p}");
    rig.mirror.start();
    rig.wait_synced();
    rig.finish_and_compare();
}

/// The overflow ladder end to end, with crashes in the resync (issue 14's acceptance, at the
/// scale of a test): the mirror is away while the workload writes three times the journal
/// (64 MiB) over a 512 MiB volume; the writer finishes without it and the journal folds. The
/// mirror comes back and the dirty regions are resynced, staged at the mirror: kill -9 of the
/// mirror, then of the primary, while a resync is staged (`staged_resync` in the mirror's
/// status) each leave a mirror that `recover` makes a prefix state of the workload
/// (tools/crashcheck.py) no older than what it held before the outage. At the end the mirror
/// is byte-identical and holds every write.
#[test]
fn kill9_during_a_staged_resync_keeps_a_valid_crash_state() {
    const VOLUME: u64 = 512 * MIB;
    let blocks = VOLUME / BLOCK;
    let seed = 0x5EED_0014;
    let (before, total) = (2_000, 12_000);
    let mut rig = Pair::running(PairOptions {
        size: VOLUME,
        primary_extra: vec!["--journal-size".into(), "64M".into()],
        ..Default::default()
    });
    rig.workload_over(seed, 1, before, blocks).wait_success();
    let (m, _) = rig.wait_synced();
    // The point the mirror is a copy of, named in its status.
    let point = m["consistent_at"].clone();
    assert!(
        u(&point, "seq") > 0 && !point["generation"].is_null(),
        "{m}"
    );
    assert!(rig.mirror.stop().is_some_and(|s| s.success()));
    // The mirror is away: the writer must finish by itself.
    let outage = Instant::now();
    rig.workload_over(seed, before + 1, total, blocks)
        .wait_success();
    let outage_writes = outage.elapsed();
    let (_, p) = rig.wait("the journal folded", LONG, |_, p| {
        p["journal_tracking"] == true
    });
    let dirty = u(&p, "dirty_bytes");
    assert!(dirty > 64 * MIB, "{p}");
    // The link lost, the primary took writes its mirror has not seen: a new generation.
    assert_ne!(p["generation"], point["generation"], "{p}");
    assert!(p["generation"].is_string(), "{p}");
    let check = |rig: &Pair, when: &str| {
        let report = rig.recover();
        let prefix = crashcheck_over(&rig.mirror_img, seed, total, Some(before), blocks)
            .unwrap_or_else(|out| {
                panic!(
                    "{when}: the mirror after kill -9 + recover is not a prefix state no older \
                 than before the outage:\n{out}\nrecover: {report}\nmirror log:\n{}",
                    tail_lines(&rig.mirror.log(), 30)
                )
            });
        assert_eq!(report["consistent"], true, "{when}: {report}");
        (prefix, u(&report, "staged_sets"))
    };
    let staged = |m: &Value, _: &Value| !m["staged_resync"].is_null();
    rig.mirror.start();
    // While the resync is staged the mirror stays consistent at the point it held before the
    // outage and says so; the primary shows the resync of the dirty regions with its
    // progress.
    let (m, p) = rig.wait(
        "a dirty resync running, staged at the mirror",
        LONG,
        |m, p| staged(m, p) && p["state"] == "resyncing",
    );
    assert_eq!(m["consistent"], true, "{m}");
    assert_eq!(m["consistent_at"], point, "the mirror's point moved: {m}");
    let progress = &p["initial_copy"];
    assert_eq!(progress["kind"], "dirty", "{p}");
    let (left, resync_bytes) = (u(progress, "left_bytes"), u(progress, "total_bytes"));
    assert!(
        left > 0 && left <= resync_bytes && resync_bytes >= dirty,
        "{p}"
    );
    for key in ["rate_bytes_per_second", "eta_seconds"] {
        assert!(progress.get(key).is_some(), "{key} missing: {p}");
    }
    rig.mirror.kill9();
    let (prefix_1, staged_1) = check(&rig, "mirror killed");
    rig.mirror.start();
    // The restarted mirror keeps the staged sets; the primary dies once more have come.
    let kept = staged_1;
    rig.wait("the resync going on, staged", LONG, |m, _| {
        let s = &m["staged_resync"];
        !s.is_null() && u(s, "last_set") + 1 - u(s, "first_set") > kept
    });
    rig.primary.kill9();
    assert!(rig.mirror.stop().is_some_and(|s| s.success()));
    let (prefix_2, staged_2) = check(&rig, "primary killed");
    rig.mirror.start();
    rig.primary.start();
    let (_, p) = rig.wait_synced();
    assert_eq!(u(&p, "dirty_bytes"), 0, "{p}");
    rig.finish_and_compare();
    let last = crashcheck_over(&rig.mirror_img, seed, total, Some(total), blocks)
        .unwrap_or_else(|out| panic!("the final mirror image fails crashcheck:\n{out}"));
    assert_eq!(last, total);
    assert_eq!(rig.full_copies(), 1, "a resync became a full copy");
    eprintln!(
        "staged resync: {} writes in {:.1} s with the mirror away, {} MiB dirty; mirror \
         killed: prefix {prefix_1}, {staged_1} staged sets kept; primary killed: prefix \
         {prefix_2}, {staged_2} staged sets kept",
        total - before,
        outage_writes.as_secs_f64(),
        dirty >> 20
    );
}

/// The primary is killed while the mirror stages the resync from its dirty map, and its map
/// is lost with it (deleted, as a restore of the state directory from an older backup would).
/// Restarted, it has no open resync: nobody knows which regions the staged part still lacks.
/// The mirror must not finish the staged sets as if they were the whole resync (I1): it drops
/// them, says so in its log, and is compared; at the end it is byte-identical. (Here the
/// journal alone already shows the gap; the simulator's `a_dirty_map_lost_mid_resync_…`
/// covers staged sets that reach past it.)
#[test]
fn a_dirty_map_lost_during_a_staged_resync_is_compared_not_resumed() {
    let (mut rig, _) = pair_with_a_folded_journal();
    rig.mirror.start();
    rig.wait("a resync staged at the mirror", LONG, |m, _| {
        !m["staged_resync"].is_null()
    });
    rig.primary.kill9();
    let map = rig
        .primary_state
        .join("journal")
        .join(VOL)
        .join("dirty.map");
    std::fs::remove_file(&map).unwrap_or_else(|e| panic!("{}: {e}", map.display()));
    rig.primary.start();
    let (_, p) = rig.wait_synced();
    assert_eq!(u(&p, "dirty_bytes"), 0, "{p}");
    let log = rig.mirror.log();
    assert!(
        log.contains("a staged resync is abandoned for a Compare"),
        "the mirror should drop the staged sets and compare:\n{}",
        tail_lines(&log, 30)
    );
    rig.finish_and_compare();
}

/// `blkmirror verify` against the primary's control socket: its exit code and JSON report.
fn verify(rig: &Pair, args: &[&str]) -> (i32, Value) {
    let control = rig.primary_state.join("control.sock");
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = verify_at(&control, &all);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (o.status.code().unwrap_or(-1), report)
}

/// `blkmirror verify --control CONTROL ARGS...`, as run.
fn verify_at(control: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["verify", "--control", control.to_str().unwrap()];
    all.extend_from_slice(args);
    run_output(BIN, &all, None)
}

/// Online verify (issue 14): a chunk of the mirror's volume overwritten behind the mirror's
/// back is found by `verify` and mended by `verify --repair`, while fio writes at queue depth
/// 16 (500 IOPS) to other parts of the volume; the writes in flight are never taken for differences (the
/// report names exactly the corrupted chunk). Exit codes: 0 identical, 8 differences found
/// (also when repaired), 6 when the mirror is away, 2 for an unknown volume, 4 when no daemon
/// answers. At the end the images are identical.
#[test]
fn verify_finds_and_repairs_a_corrupted_mirror_chunk_while_writes_go_on() {
    const VOLUME: u64 = 256 * MIB;
    let mut rig = Pair::running(PairOptions {
        size: VOLUME,
        ..Default::default()
    });
    rig.workload_over(0x5EED_0015, 1, 2_000, 128 * MIB / BLOCK)
        .wait_success();
    rig.wait_synced();
    let (code, r) = verify(&rig, &[]);
    assert_eq!(code, 0, "identical sides: {r}");
    assert_eq!(r["differences"], false, "{r}");
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["volumes"][0]["compared_bytes"], VOLUME, "{r}");
    assert_eq!(r["volumes"][0]["state"], "done", "{r}");

    // 4 KiB of garbage in the mirror's image, where the writes below never go.
    let bad_at = 200 * MIB + 12 * 1024;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&rig.mirror_img)
            .unwrap();
        f.write_all_at(&pseudo_random(4096, 99), bad_at).unwrap();
        f.sync_all().unwrap();
    }
    let mut fio = Command::new("fio");
    fio.args([
        "--name=busy",
        "--ioengine=nbd",
        &format!("--uri={}", rig.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=128M",
        // Busy, but within what a debug build ships: a journal that overflows would fold,
        // and a fold ends the session and the verify with it.
        "--rate_iops=500",
        "--time_based",
        "--runtime=600",
        // One process: killing it ends the writes.
        "--thread",
    ]);
    let mut writer = Background::spawn("fio writing", fio, &rig.dir().join("fio.out"));
    std::thread::sleep(Duration::from_secs(1));
    let chunk = json!([{ "offset": 200 * MIB, "length": MIB }]);
    for round in 0..3 {
        let (code, r) = verify(&rig, &[]);
        assert_eq!(
            code, 8,
            "round {round}: the corrupted chunk must be found: {r}"
        );
        assert_eq!(
            r["volumes"][0]["differing_ranges"], chunk,
            "round {round}: exactly the corrupted chunk differs, writes in flight do not: {r}"
        );
        assert_eq!(r["volumes"][0]["repaired_bytes"], 0, "{r}");
    }
    let (code, r) = verify(&rig, &["--repair"]);
    assert_eq!(
        code, 8,
        "differences found (and repaired) still say so: {r}"
    );
    assert_eq!(r["volumes"][0]["differing_ranges"], chunk, "{r}");
    assert_eq!(r["volumes"][0]["repaired_bytes"], MIB, "{r}");
    assert!(
        writer.is_running(),
        "fio ran all along: {}",
        writer.output()
    );
    // (Killed: its writes so far are what the images must agree on. Stopped before the last
    // verify, which must see every chunk settle.)
    drop(writer);
    let (code, r) = verify(&rig, &[]);
    assert_eq!(code, 0, "repaired: {r}");

    // Bad requests: an unknown volume (2), no daemon (4), the mirror away (6).
    let control = rig.primary_state.join("control.sock");
    let o = verify_at(&control, &["--volume", "nope"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = verify_at(&rig.dir().join("none.sock"), &[]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    rig.wait_synced();
    assert!(rig.mirror.stop().is_some_and(|s| s.success()));
    rig.wait("the link is down", LONG, |_, p| p["link"] == "down");
    let o = verify_at(&control, &[]);
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not connected to the mirror"),
        "{o:?}"
    );
    // A script reading --json gets a document on stdout even then.
    let (code, r) = verify(&rig, &[]);
    assert_eq!(code, 6);
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("not connected")),
        "{r}"
    );
    // An empty volume name (an unset $VOL) is refused, not taken for "all".
    let o = verify_at(&control, &["--volume", ""]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    rig.mirror.start();
    rig.finish_and_compare();
}

/// `blkmirror history --json` on the mirror.
fn history_of(rig: &Pair) -> Value {
    let control = rig.mirror_state.join("control.sock");
    let out = run(
        BIN,
        &["history", "--control", control.to_str().unwrap(), "--json"],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("history --json printed {out:?}: {e}"))
}

/// `blkmirror mirror --history 1h` with `extra` is a usage error (exit 2) whose message says
/// `says`, before anything is opened.
fn mirror_usage_error(extra: &[&str], says: &str) {
    let mut args = vec![
        "mirror",
        "--listen",
        "127.0.0.1:1",
        "--volume",
        "v=/nonexistent",
        "--state-dir",
        "/nonexistent",
        "--history",
        "1h",
    ];
    args.extend_from_slice(extra);
    let o = run_output(BIN, &args, None);
    assert_eq!(o.status.code(), Some(2), "{extra:?}: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(says),
        "{extra:?}: {o:?}"
    );
}

/// `--history-thin 2s:1s,4s:2s`: while writes come in for 8 s, the mirror keeps every point
/// of the last 2 s, one per second of those older, one per 2 s of those older than 4 s
/// (measured from its newest point, when it last thinned); bad tiers are a usage error
/// naming the flag.
#[test]
fn older_history_points_are_thinned_by_tier() {
    mirror_usage_error(&["--history-thin", "4s:2s,2s:1s"], "--history-thin");
    let mut rig = Pair::new(PairOptions::default());
    rig.mirror
        .push_args(&["--history", "1h", "--history-thin", "2s:1s,4s:2s"]);
    rig.mirror.start();
    rig.primary.start();
    rig.wait_consistent();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(8) {
        rig.nbd_write((i % 256) * 4096, &[(i % 250) as u8 + 1; 4096]);
        i += 1;
    }
    rig.wait_synced();
    let newest = newest_point_at_applied(&rig);
    let h = history_of(&rig);
    let points = h["volumes"][0]["points"].as_array().unwrap();
    let time =
        |p: &Value| blkmirror::repl::mirror::parse_time(p["time"].as_str().unwrap()).unwrap();
    let now = time(&newest);
    let tier = |lo: u64, hi: u64| -> Vec<u64> {
        points
            .iter()
            .map(time)
            .filter(|t| (lo..hi).contains(&(now - t)))
            .collect()
    };
    let young = tier(0, 2000);
    for (every, times) in [(1000, tier(2000, 4000)), (2000, tier(4000, u64::MAX))] {
        let mut slices: Vec<u64> = times.iter().map(|t| t / every).collect();
        let n = slices.len();
        slices.dedup();
        assert_eq!(slices.len(), n, "one point per {every} ms: {h}");
    }
    assert!(
        young.len() >= 2 && tier(4000, u64::MAX).len() >= 2,
        "{i} writes in 8 s should leave points in every tier: {h}"
    );
}

/// The newest point once it holds everything the mirror applied (points come at most once a
/// second while sets stream in, and at every checkpoint).
fn newest_point_at_applied(rig: &Pair) -> Value {
    let deadline = Instant::now() + LONG;
    loop {
        let m = vol0(&rig.mirror.status());
        let h = history_of(rig);
        let last = h["volumes"][0]["points"]
            .as_array()
            .and_then(|p| p.last().cloned())
            .unwrap_or(Value::Null);
        if !last.is_null() && last["seq"] == m["applied_seq"] {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "no point reached the applied seq: {h}\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `blkmirror recover` on the stopped mirror with extra arguments: exit code, stdout, stderr.
fn recover_with(rig: &Pair, extra: &[&str]) -> (Option<i32>, String, String) {
    let vol = format!("{VOL}={}", rig.mirror_img.display());
    let mut args = vec![
        "recover",
        "--volume",
        &vol,
        "--state-dir",
        rig.mirror_state.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = run_output(BIN, &args, None);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// History at the safe (issue 14, part 3): a mirror started with `--history 1h` lists
/// recoverable points oldest to newest (`blkmirror history`), stamped by its own clock, each
/// with the bytes kept for going back to it; status shows the history. With the mirror
/// stopped, `recover --at` the time of the newest point is the state after the whole
/// workload, and `recover --set` an older point brings the volume back to exactly the state
/// after the first half of it (tools/crashcheck.py). Without `--history` a mirror that has a
/// history refuses to start (exit 2, naming the flag); with it, the later points are gone
/// and the primary's next connect compares the rolled-back mirror up to date: identical.
/// Unknown points are refused (exit 5).
#[test]
fn history_lists_points_and_recover_brings_back_an_earlier_one() {
    let seed = 0x5EED_0016;
    let mut rig = Pair::new(PairOptions::default());
    rig.mirror
        .push_args(&["--history", "1h", "--history-size", "1G"]);
    // A primary whose clock runs ten years ahead: the history's times are the mirror's.
    rig.primary.envs.push((
        "BLKMIRROR_TEST_CLOCK_SKEW_MS".into(),
        (10 * 365 * 86_400_000u64).to_string(),
    ));
    let t0 = std::time::SystemTime::now();
    rig.mirror.start();
    rig.primary.start();
    rig.wait_consistent();
    rig.workload(seed, 1, 1_500).wait_success();
    rig.wait_synced();
    let a = newest_point_at_applied(&rig);
    rig.workload(seed, 1_501, 3_000).wait_success();
    rig.wait_synced();
    let b = newest_point_at_applied(&rig);
    assert!(u(&b, "set") > u(&a, "set"), "{a} {b}");

    let h = history_of(&rig);
    let points = h["volumes"][0]["points"].as_array().unwrap().clone();
    assert_eq!(h["volumes"][0]["name"], VOL, "{h}");
    assert!(
        points
            .iter()
            .any(|p| p["set"] == a["set"] && p["time"] == a["time"]),
        "the older point is still listed: {h}"
    );
    for w in points.windows(2) {
        assert!(u(&w[0], "set") < u(&w[1], "set"), "oldest first: {h}");
        assert!(
            w[0]["time"].as_str() <= w[1]["time"].as_str(),
            "times in order: {h}"
        );
        assert!(
            u(&w[0], "bytes") >= u(&w[1], "bytes"),
            "older points need more: {h}"
        );
    }
    let a_now = points.iter().find(|p| p["set"] == a["set"]).unwrap();
    let (from, to) = (
        blkmirror::repl::core::primary::unix_ms(t0),
        blkmirror::repl::core::primary::unix_ms(std::time::SystemTime::now()),
    );
    for p in &points {
        let t = blkmirror::repl::mirror::parse_time(p["time"].as_str().unwrap()).unwrap();
        assert!(
            (from..=to).contains(&t),
            "a point's time comes from the mirror's clock, not the primary's: {p}"
        );
    }
    assert!(
        u(a_now, "bytes") > 0,
        "going back to the first half rewrites its blocks: {a_now}"
    );
    let status = vol0(&rig.mirror.status());
    assert!(u(&status["history"], "points") >= 2, "{status}");
    let claimed = blkmirror::repl::mirror::parse_time(status["newest_write_at"].as_str().unwrap());
    assert!(
        claimed.unwrap() > to + 365 * 86_400_000,
        "the primary's clock did lie: {status}"
    );
    let human = run(
        BIN,
        &[
            "history",
            "--control",
            rig.mirror_state.join("control.sock").to_str().unwrap(),
        ],
    );
    assert!(
        human.contains("SET") && human.contains(&a["set"].to_string()),
        "{human}"
    );
    // One volume by name: the same listing; an unknown name is a usage error (exit 2).
    let control_arg = rig.mirror_state.join("control.sock");
    let control_arg = control_arg.to_str().unwrap();
    let one: Value = serde_json::from_str(&run(
        BIN,
        &[
            "history",
            "--control",
            control_arg,
            "--volume",
            VOL,
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(one["volumes"].as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one["volumes"][0]["name"], VOL, "{one}");
    let o = run_output(
        BIN,
        &["history", "--control", control_arg, "--volume", "nosuch"],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no volume named"),
        "{o:?}"
    );

    // Exports while replication goes on (a third part of the workload meanwhile): point A
    // read-only is exactly the first half; point B writable takes writes that read back and
    // never reach the mirror.
    let control = rig.mirror_state.join("control.sock");
    // A point by set number, or (`--at`) by the time of a point.
    let export = |point: [&str; 2], sock: &Path, writable: bool| {
        let mut c = Command::new(BIN);
        c.args([
            "export",
            "--control",
            control.to_str().unwrap(),
            "--volume",
            VOL,
        ])
        .args(point)
        .args(["--nbd-unix", sock.to_str().unwrap()]);
        if writable {
            c.arg("--writable");
        }
        let bg = Background::spawn("export", c, &sock.with_extension("out"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no export socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        bg
    };
    let (sock_a, sock_b) = (rig.dir().join("a.sock"), rig.dir().join("b.sock"));
    let sock_at = rig.dir().join("at.sock");
    let mut ex_a = export(["--set", &a["set"].to_string()], &sock_a, false);
    let mut ex_b = export(["--set", &b["set"].to_string()], &sock_b, true);
    let mut ex_at = export(["--at", b["time"].as_str().unwrap()], &sock_at, false);
    let mut more = rig.workload(seed, 3_001, 4_000);
    // The prefix of the workload an export serves (nbdcopy of it, then crashcheck).
    let prefix_served = |sock: &Path, name: &str| {
        let img = rig.dir().join(name);
        run("nbdcopy", &[&uri_of(sock), img.to_str().unwrap()]);
        crashcheck(&img, seed, 4_000, None)
    };
    assert_eq!(
        prefix_served(&sock_a, "a.img"),
        Ok(1_500),
        "the export of point A is the state after the first half"
    );
    assert_eq!(
        prefix_served(&sock_at, "at.img"),
        Ok(3_000),
        "the export at point B's time is the longer prefix, the state after both parts"
    );
    signal(ex_at.child_for_test(), Signal::SIGTERM);
    assert!(ex_at.wait().success(), "{}", ex_at.output());
    let garbage = pseudo_random(1 << 20, 7);
    nbd_write_to(&uri_of(&sock_b), rig.dir(), 0, &garbage);
    let img_b = rig.dir().join("b.img");
    run("nbdcopy", &[&uri_of(&sock_b), img_b.to_str().unwrap()]);
    assert!(
        read_at(&img_b, 0, 1 << 20) == garbage,
        "the overlay holds the writes"
    );
    assert!(
        read_at(&rig.mirror_img, 0, 1 << 20) != garbage,
        "the live mirror never sees them"
    );
    more.wait_success();
    signal(ex_a.child_for_test(), Signal::SIGTERM);
    assert!(ex_a.wait().success(), "{}", ex_a.output());
    assert!(!sock_a.exists(), "the socket goes with the export");
    // A killed export process: the mirror notices and ends its export.
    let _ = ex_b.child_for_test().kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sock_b.exists() {
        assert!(
            Instant::now() < deadline,
            "the export of a killed process lingers"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    rig.wait_synced();

    rig.stop_both();
    let (code, _, err) = recover_with(&rig, &["--set", "999999"]);
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("no such point"), "{err}");
    let (code, _, err) = recover_with(&rig, &["--at", "1970-01-02T00:00:00Z"]);
    assert_eq!(code, Some(5), "{err}");
    let (code, out, err) = recover_with(&rig, &["--at", b["time"].as_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r[0]["restored_to_set"], b["set"], "{r}");
    assert_eq!(crashcheck(&rig.mirror_img, seed, 4_000, None), Ok(3_000));
    let (code, out, err) = recover_with(&rig, &["--set", &a["set"].to_string()]);
    assert_eq!(code, Some(0), "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r[0]["restored_to_set"], a["set"], "{r}");
    assert_eq!(r[0]["applied_seq"], a["seq"], "{r}");
    assert_eq!(
        crashcheck(&rig.mirror_img, seed, 4_000, None),
        Ok(1_500),
        "the volume is exactly as after the first half of the workload"
    );

    // Without --history the history would be left describing nothing: refused.
    rig.mirror.drop_arg_with_value("--history");
    rig.mirror.drop_arg_with_value("--history-size");
    let args = rig.mirror.args_for_test();
    let o = run_output(BIN, &args, None);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("remove that directory to drop it"),
        "{o:?}"
    );
    rig.mirror
        .push_args(&["--history", "1h", "--history-size", "1G"]);
    rig.mirror.start();
    let h = history_of(&rig);
    assert_eq!(
        h["volumes"][0]["points"]
            .as_array()
            .unwrap()
            .last()
            .map(|p| &p["set"]),
        Some(&a["set"]),
        "the points after the restored one are gone: {h}"
    );
    rig.primary.start();
    rig.wait_synced();
    rig.finish_and_compare();
}

/// With `--history-full drop-oldest`, the history's file system (the mirror's state
/// directory) fills up: the oldest points are dropped to make room (logged), replication goes
/// on without a failure that sticks, the newest points stay, and the mirror ends
/// byte-identical.
#[test]
fn a_full_state_directory_makes_the_history_drop_its_oldest_points() {
    let seed = 0x5EED_0017;
    let mut rig = Pair::new(PairOptions {
        mirror_tmpfs: Some("200M"),
        ..Default::default()
    });
    rig.mirror
        .push_args(&["--history", "1h", "--history-full", "drop-oldest"]);
    rig.mirror.start();
    rig.primary.start();
    rig.wait_consistent();
    rig.workload(seed, 1, 2_000).wait_success();
    rig.wait_synced();
    newest_point_at_applied(&rig);
    // Leave 16 MiB free: far less than the before-images still to come.
    let filler = rig.tmpfs[0].dir.join("filler");
    let filled = fill_file_system(&filler);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(filled.saturating_sub(16 * MIB))
        .unwrap();
    rig.workload(seed, 2_001, 12_000).wait_success();
    rig.wait_synced();
    assert!(
        rig.mirror.log().contains("dropped to make room"),
        "{}",
        tail_lines(&rig.mirror.log(), 30)
    );
    let last = newest_point_at_applied(&rig);
    let m = vol0(&rig.mirror.status());
    assert_eq!(m["consistent"], true, "{m}");
    assert!(u(&m["history"], "points") >= 1, "{m}");
    assert!(u(&last, "set") > 0);
    std::fs::remove_file(&filler).unwrap();
    rig.finish_and_compare();
}

/// A history at its cap with the default `--history-full wait` (a primary overwriting its
/// whole volume, as ransomware encrypting it would): the mirror stops applying rather than
/// drop a point younger than `--history` (status: still consistent, at its older point,
/// `applying_waits` says why; the primary's writes go on), the oldest point stays; restarted with a larger `--history-size` it catches up, the oldest
/// point still there, and ends byte-identical. A cap under 64M is a usage error.
#[test]
fn a_history_at_its_cap_waits_rather_than_dropping_a_point() {
    mirror_usage_error(&["--history-size", "1M"], "64M");
    let mut rig = Pair::new(PairOptions {
        size: 128 * MIB,
        ..Default::default()
    });
    rig.mirror
        .push_args(&["--history", "1h", "--history-size", "64M"]);
    rig.mirror.start();
    rig.primary.start();
    rig.wait_consistent();
    let fill = |rig: &Pair, mib: &str| {
        let mut c = Command::new("/usr/bin/python3");
        c.args(["-c", NBD_FILL_WRAPPING, &rig.uri(), mib]);
        Background::spawn("a writer", c, &rig.dir().join("fill.out")).wait_success();
    };
    // The whole volume once (over zeroes: its before-images cost nothing), then twice over.
    fill(&rig, "128");
    rig.wait_synced();
    // The oldest point's set and time (its `bytes`, what going back to it costs, grows).
    let oldest = |rig: &Pair| {
        let p = history_of(rig)["volumes"][0]["points"][0].clone();
        (p["set"].clone(), p["time"].clone())
    };
    let first = oldest(&rig);
    assert!(!first.0.is_null());
    fill(&rig, "256");
    let (m, _) = rig.wait(
        "the mirror waiting on its history, the primary told",
        LONG,
        |m, p| {
            m["applying_waits"]
                .as_str()
                .is_some_and(|d| d.contains("history full"))
                && p["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("history full"))
        },
    );
    assert!(u(&m["history"], "bytes") <= 64 * MIB, "{m}");
    assert_eq!(m["consistent"], true, "at its older point: {m}");
    assert!(
        m["state_detail"]
            .as_str()
            .is_some_and(|d| d.contains("consistent at an older point")),
        "{m}"
    );
    assert_eq!(oldest(&rig), first, "no point was dropped: {m}");
    assert!(rig.mirror.stop().is_some_and(|s| s.success()));
    rig.mirror.drop_arg_with_value("--history-size");
    rig.mirror.push_args(&["--history-size", "1G"]);
    rig.mirror.start();
    rig.wait_synced();
    assert_eq!(oldest(&rig), first, "the oldest point is still there");
    rig.finish_and_compare();
}

/// The mirror's process stopped and continued again and again (SIGSTOP / SIGCONT, as a
/// debugger or a frozen VM does) while TRIMs and WRITE_ZEROES are applied through its
/// io_uring: an interrupted wait is waited again, never taken for a failed volume (which
/// left completions unreaped and the applier dead, issue 14's adversarial round). The mirror
/// keeps applying and ends identical.
#[test]
fn a_mirror_stopped_and_continued_keeps_applying_trims() {
    let mut rig = Pair::running(PairOptions::default());
    let mut fio = Command::new("fio");
    fio.args([
        "--name=trims",
        "--ioengine=nbd",
        &format!("--uri={}", rig.uri()),
        "--rw=randtrim",
        "--bs=4k-1m",
        "--iodepth=16",
        "--size=64M",
        "--time_based",
        "--runtime=12",
        "--thread",
    ]);
    let mut trims = Background::spawn("fio trimming", fio, &rig.dir().join("fio.out"));
    let mut zeroer = Command::new("fio");
    zeroer.args([
        "--name=writes",
        "--ioengine=nbd",
        &format!("--uri={}", rig.uri()),
        "--rw=randwrite",
        "--bs=4k-256k",
        "--iodepth=8",
        "--size=64M",
        "--zero_buffers",
        "--time_based",
        "--runtime=12",
        "--thread",
    ]);
    let mut writes = Background::spawn("fio writing", zeroer, &rig.dir().join("fio2.out"));
    let pid = nix::unistd::Pid::from_raw(rig.mirror.pid().unwrap() as i32);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let _ = nix::sys::signal::kill(pid, Signal::SIGSTOP);
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
    assert!(trims.wait().success(), "{}", trims.output());
    assert!(writes.wait().success(), "{}", writes.output());
    rig.wait_synced();
    assert!(
        !rig.mirror.log().contains("panicked"),
        "{}",
        tail_lines(&rig.mirror.log(), 20)
    );
    rig.finish_and_compare();
}
