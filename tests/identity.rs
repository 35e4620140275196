//! Volumes that know who they are (issue 13's table of cases, promise I6 of docs/DESIGN.md),
//! tried as an admin would: a `blkmirror mirror` and a `blkmirror primary` (real processes,
//! QUIC with mutual TLS on 127.0.0.1), real NBD clients (libnbd through /usr/bin/python3,
//! nbdsh, nbdfuse + a loop device), and what an admin checks: `status` (its keys, `state`,
//! exit code), the logs, `accept-volume`, and at the end a mirror byte-identical to the primary
//! after `blkmirror recover`.
//!
//! No timed assertions: every wait is for a condition, polled with a generous timeout, and a
//! timeout fails with the last status documents and log lines of every daemon involved.
//! (Case 12 of the table, `status` exiting 6 with every link down, is
//! `status_exits_6_until_volumes_replicate` in tests/replication.rs.)

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// `blkmirror status --control SOCK` (human form): (exit code, stdout, stderr).
fn status_cli(control: &Path) -> (Option<i32>, String, String) {
    cli(&["status", "--control", control.to_str().unwrap()])
}

/// `blkmirror status` must exit 6 and name the volume as not replicating.
fn assert_status_exits_6(d: &Daemon) {
    let (code, out, err) = status_cli(&d.control);
    assert_eq!(
        code,
        Some(6),
        "{}: status should exit 6 (degraded):\n{out}{err}",
        d.label
    );
    assert!(
        err.contains(&format!("not replicating: {VOL} (")),
        "{}: status does not name the volume: {err}",
        d.label
    );
}

/// `blkmirror accept-volume --control SOCK --volume vol1 [--json]`.
fn accept_volume(d: &Daemon, json: bool) -> (Option<i32>, String, String) {
    let mut args = vec![
        "accept-volume",
        "--control",
        d.control.to_str().unwrap(),
        "--volume",
        VOL,
    ];
    if json {
        args.push("--json");
    }
    cli(&args)
}

/// The log a daemon wrote after byte `mark` of its log file (one run of it).
fn log_since(d: &Daemon, mark: usize) -> String {
    d.log().get(mark..).unwrap_or_default().to_string()
}

/// A file's inode number: logs and messages name a volume's disk "file inode N born ...".
fn inode_of(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

/// libnbd: `total` bytes of random writes of `piece` bytes at piece-aligned offsets below
/// `span` (seed `seed`), a FLUSH every 16 writes; a failed request is counted, not fatal (a
/// dead connection is opened again). Prints `ok=N errors=N last_error=...`.
const NBD_WRITER: &str = r#"
import nbd, sys, random
uri, seed, total, piece, span = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
def connect():
    h = nbd.NBD()
    h.connect_uri(uri)
    return h
h = connect()
ok = errors = 0
last = ''
done = 0
while done < total:
    off = rng.randrange(0, span // piece) * piece
    data = rng.randbytes(piece)
    done += piece
    try:
        if h.aio_is_dead():
            h = connect()
        h.pwrite(data, off)
        ok += 1
        if ok % 16 == 0:
            h.flush()
    except nbd.Error as e:
        errors += 1
        last = str(e)
try:
    h.flush()
    h.shutdown()
except nbd.Error as e:
    errors += 1
    last = str(e)
print(f"ok={ok} errors={errors} last_error={last}", flush=True)
"#;

// ------------------------------------------------------------------------------------------
// The pair (tests/common/pair.rs): certificates, one mirror, one primary (both described,
// neither started).
// ------------------------------------------------------------------------------------------

impl Pair {
    /// Start `NBD_WRITER` in the background (see there).
    fn writer(&self, seed: u64, total: u64, piece: u64) -> Background {
        let mut c = Command::new("/usr/bin/python3");
        c.arg("-c").arg(NBD_WRITER).args([
            self.uri(),
            seed.to_string(),
            total.to_string(),
            piece.to_string(),
            self.size.to_string(),
        ]);
        Background::spawn(
            &format!("writer seed {seed}"),
            c,
            &self.dir().join(format!("writer-{seed}.out")),
        )
    }
}

// ------------------------------------------------------------------------------------------
// 1. The primary restarted with a blank volume file, same state directory.
// ------------------------------------------------------------------------------------------

/// Tried: a pair replicates 8 MiB; the primary is stopped, its volume file deleted, and the
/// primary started again with the same state directory (it creates a blank file at the same
/// path); a client writes 2 MiB to the blank volume.
///
/// Expected: the primary ships nothing: `state` volume_changed, `last_error` says the volume
/// is not the disk its state describes (both disks named in the log) and how to accept it,
/// `lag_seconds` null, `status` exits 6, `retry` does not change that, and the mirror's image
/// and positions stay as they were. After `accept-volume` (exit 0, "accepted") the mirror is
/// compared (not fully copied) and ends byte-identical to the blank + new writes; the pair
/// keeps its UUID under a new generation. `accept-volume` again answers "already", exit 0;
/// for an unknown volume it exits 2 (usage), with the primary stopped 4 (not running).
#[test]
fn blank_primary_volume_is_refused_until_accepted() {
    let mut p = Pair::running(PairOptions::default());
    p.nbd_write(0, &pseudo_random(4 * MIB as usize, 101));
    p.nbd_write(20 * MIB, &pseudo_random(4 * MIB as usize, 102));
    let (_, pv) = p.wait_synced();
    let uuid = pv["uuid"].clone();
    let generation = pv["generation"].clone();
    assert!(uuid.is_string(), "the pair has a UUID: {pv}");

    stop_ok(&mut p.primary);
    p.wait("mirror sees the primary gone", LONG, |m, _| {
        m["link"] == "down"
    });
    let before = p.mirror_holds();
    let old_ino = inode_of(&p.primary_img);
    std::fs::remove_file(&p.primary_img).unwrap();
    let mark = p.primary.log().len();
    let decisions = p.mirror.log().matches("decision on connect").count();
    p.primary.start();
    let new_ino = inode_of(&p.primary_img);
    let (_, pv) = p.wait(
        "the primary refuses to ship: volume_changed",
        LONG,
        |_, pv| pv["state"] == "volume_changed",
    );
    let err = s(&pv, "last_error");
    assert!(
        err.contains("not the disk this state describes") && err.contains("accept-volume"),
        "last_error should say why and what to do: {pv}"
    );
    assert_eq!(pv["link"], "down", "{pv}");
    assert!(
        pv["lag_seconds"].is_null(),
        "no RPO for a refused volume: {pv}"
    );
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains(&format!("it was file inode {old_ino} "))
            && log.contains(&format!("it is file inode {new_ino} "))
            && log.contains("nothing is shipped until an admin accepts the volume"),
        "the primary's log does not name both disks:\n{log}"
    );
    assert_status_exits_6(&p.primary);

    // Clients may use the new volume; nothing of it reaches the mirror, even on `retry`.
    p.nbd_write(8 * MIB, &pseudo_random(2 * MIB as usize, 103));
    let (code, out, err) = cli(&["retry", "--control", p.primary.control.to_str().unwrap()]);
    assert_eq!(code, Some(0), "retry: {out}{err}");
    std::thread::sleep(Duration::from_secs(2));
    let (_, pv) = p.vols();
    assert_eq!(pv["state"], "volume_changed", "after retry: {pv}");
    assert_eq!(
        p.mirror_holds(),
        before,
        "the mirror changed before accept-volume"
    );
    assert_eq!(
        p.mirror.log().matches("decision on connect").count(),
        decisions,
        "a primary whose volume changed connected to the mirror"
    );

    let (code, out, err) = accept_volume(&p.primary, false);
    assert_eq!(code, Some(0), "accept-volume: {out}{err}");
    assert!(
        out.contains("accepted") && out.contains("comparison"),
        "accept-volume: {out}"
    );
    let (m, pv) = p.wait_synced();
    assert_eq!(pv["uuid"], uuid, "accepting a disk keeps the pair: {pv}");
    assert_eq!(m["uuid"], uuid, "{m}");
    assert_ne!(pv["generation"], generation, "a new generation: {pv}");
    assert!(
        s(&pv, "last_decision").contains("break"),
        "the decision should be a comparison after the accepted break: {pv}"
    );
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains("mode=Compare") && !log.contains("mode=FullCopy"),
        "the accepted volume should be compared, not copied:\n{log}"
    );
    let (code, out, err) = accept_volume(&p.primary, true);
    assert_eq!(code, Some(0), "accept-volume again: {out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(v["result"], "already", "{v}");
    let (code, out, err) = accept_volume(&p.primary, false);
    assert_eq!(code, Some(0), "accept-volume again: {out}{err}");
    assert!(out.contains("already"), "{out}");
    let (code, out, err) = cli(&[
        "accept-volume",
        "--control",
        p.primary.control.to_str().unwrap(),
        "--volume",
        "no-such-volume",
    ]);
    assert_eq!(
        code,
        Some(2),
        "accept-volume of an unknown volume: {out}{err}"
    );
    p.finish_and_compare();
    let (code, out, err) = accept_volume(&p.primary, false);
    assert_eq!(
        code,
        Some(4),
        "accept-volume with the primary stopped: {out}{err}"
    );
}

// ------------------------------------------------------------------------------------------
// 2. The primary restarted with a fresh state directory, its old volume.
// ------------------------------------------------------------------------------------------

/// Tried: a pair replicates 8 MiB; the primary is stopped, its state directory deleted
/// (journal, identity, all), and the primary started again on the same volume file; a client
/// writes 2 MiB at once (during the comparison), and 2 MiB more once it is done.
///
/// Expected: no trim or skip on the mirror's word: the mirror recognises the disk and
/// decides a comparison, which the primary's log and status (`last_decision`) explain ("its
/// state was lost"); the primary adopts the pair's UUID; the mirror ends byte-identical,
/// with every write made after the restart.
#[test]
fn lost_primary_state_is_compared() {
    let mut p = Pair::running(PairOptions::default());
    p.nbd_write(MIB, &pseudo_random(4 * MIB as usize, 201));
    p.nbd_write(30 * MIB, &pseudo_random(4 * MIB as usize, 202));
    let (m, _) = p.wait_synced();
    let uuid = m["uuid"].clone();

    stop_ok(&mut p.primary);
    std::fs::remove_dir_all(&p.primary_state).unwrap();
    let mark = p.primary.log().len();
    p.primary.start();
    // Written at once: the journal of the new state holds it, the comparison races with it.
    p.nbd_write(2 * MIB, &pseudo_random(2 * MIB as usize, 203));
    let mut seen = Vec::new();
    p.wait("the comparison is done", LONG, |m, pv| {
        if pv["state"] == "resyncing" || pv["initial_copy"]["compare"] == true {
            seen.push(pv.clone());
        }
        m["consistent"] == true && pv["state"] == "replicating"
    });
    p.nbd_write(40 * MIB, &pseudo_random(2 * MIB as usize, 204));
    let (_, pv) = p.wait_synced();
    let log = log_since(&p.primary, mark);
    assert!(
        s(&pv, "last_decision").contains("its state was lost"),
        "status should say why the mirror was compared: {pv}"
    );
    assert!(
        log.contains("mode=Compare") && log.contains("its state was lost"),
        "the primary's log should say a comparison and why:\n{log}"
    );
    assert!(!log.contains("mode=Resume"), "resumed on a guess:\n{log}");
    // Both sides log the decision with both identities: the mirror names the primary's
    // (no UUID any more, a new generation) and its own; the primary its own and the mirror's
    // answer.
    let mlog = p.mirror.log();
    let decided = mlog
        .lines()
        .rfind(|l| l.contains("decision on connect"))
        .expect("the mirror logs its decision");
    for part in [
        "primary_uuid=None",
        "primary_gen=Some(",
        "mirror_uuid=Some(",
        "mirror_gen=Some(",
        "mirror_position=Some(",
        "Compare",
    ] {
        assert!(decided.contains(part), "{part} missing: {decided}");
    }
    let up = log
        .lines()
        .find(|l| l.contains("replication link up"))
        .expect("the primary logs the link up");
    for part in ["generation=Some(", "mirror_durable_seq=", "mode=Compare"] {
        assert!(up.contains(part), "{part} missing: {up}");
    }
    assert_eq!(pv["uuid"], uuid, "the primary adopts the pair's UUID: {pv}");
    assert!(
        log.contains("volume identity adopted from the mirror"),
        "{log}"
    );
    for v in &seen {
        assert!(
            v["lag_seconds"].is_null(),
            "RPO shown during a comparison: {v}"
        );
    }
    eprintln!(
        "lost_primary_state: {} status samples during the comparison",
        seen.len()
    );
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 3. Two different primaries, the same certificate name, one after the other.
// ------------------------------------------------------------------------------------------

/// Primary B: another volume file of the pair's size (8 MiB of data from `seed` at its start,
/// or blank), a new state directory, the same certificate name, pointed at the pair's mirror;
/// described, not started. Returns it and its volume file.
fn primary_b(p: &Pair, seed: Option<u64>) -> (Daemon, PathBuf) {
    let d = p.dir();
    let img = d.join("b.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(p.size).unwrap();
    if let Some(seed) = seed {
        std::os::unix::fs::FileExt::write_all_at(&f, &pseudo_random(8 * MIB as usize, seed), 0)
            .unwrap();
    }
    let b = p.primary_daemon(
        "primary B",
        &img,
        &d.join("b-state"),
        &d.join("b.sock"),
        p.port,
        &[],
    );
    (b, img)
}

/// Tried: primary A replicates 8 MiB and stops. Then (a) primary B, another volume file with
/// data of its own and a new state directory, same certificate name, connects to the mirror;
/// then (b) primary C, which first paired with a second mirror of its own (so it has a
/// volume UUID), is pointed at the first mirror. At last A starts again.
///
/// Expected: B and C are refused as unrelated data: their `state` is `unrelated`, `last_error`
/// and the mirror's log say "unrelated data" and name both disks (B, which has no UUID) or
/// both UUIDs (C); `lag_seconds` null, `status` exits 6; the refusal is not retried on its
/// own, `retry` tries again at once and gets the same refusal; the mirror's image and
/// positions do not change. A then resumes (no new copy or comparison), and the mirror ends
/// byte-identical to A.
#[test]
fn unrelated_primaries_are_refused() {
    let mut p = Pair::running(PairOptions::default());
    p.nbd_write(0, &pseudo_random(8 * MIB as usize, 301));
    let (m, _) = p.wait_synced();
    let uuid_m = s(&m, "uuid").to_string();
    stop_ok(&mut p.primary);
    p.wait("mirror sees A gone", LONG, |m, _| m["link"] == "down");
    let before = p.mirror_holds();
    let ino_a = inode_of(&p.primary_img);
    let d = p.dir().to_path_buf();

    // (a) B: no record of any pair.
    let (mut b, img_b) = primary_b(&p, Some(302));
    let ino_b = inode_of(&img_b);
    b.start();
    // Both sides: the two status documents are read one after the other, and the refusal may
    // fall between them.
    let v = wait_for("B refused as unrelated", LONG, &[&p.mirror, &b], |v| {
        v[0]["state"] == "unrelated" && v[1]["state"] == "unrelated"
    });
    let (mv, bv) = (&v[0], &v[1]);
    let err = s(bv, "last_error");
    assert!(
        err.contains("unrelated data")
            && err.contains(&uuid_m)
            && err.contains(&format!("file inode {ino_a} "))
            && err.contains(&format!("file inode {ino_b} ")),
        "B's last_error should say unrelated data, the mirror's UUID and both disks: {bv}"
    );
    assert_eq!(bv["link"], "down", "{bv}");
    assert!(
        bv["lag_seconds"].is_null(),
        "no RPO for a refused volume: {bv}"
    );
    assert_eq!(mv["state"], "unrelated", "the mirror's state: {mv}");
    assert!(
        p.mirror
            .log()
            .contains("unrelated data: the mirror holds volume"),
        "the mirror's log does not say unrelated data:\n{}",
        tail_lines(&p.mirror.log(), 20)
    );
    assert_status_exits_6(&b);
    // A permanent refusal is not retried on its own (the backoff of a transient failure is
    // at most 2 s); `blkmirror retry` tries again at once.
    let refusals = p.mirror.log().matches("unrelated data").count();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        p.mirror.log().matches("unrelated data").count(),
        refusals,
        "a permanent refusal is retried without an admin"
    );
    let (code, out, err) = cli(&["retry", "--control", b.control.to_str().unwrap()]);
    assert_eq!(code, Some(0), "retry: {out}{err}");
    assert!(
        p.mirror
            .wait_for_log_count("unrelated data", refusals + 1, LONG),
        "retry did not try again"
    );
    let bv = vol0(&b.status());
    assert_eq!(bv["state"], "unrelated", "after retry: {bv}");
    stop_ok(&mut b);
    assert_eq!(p.mirror_holds(), before, "B changed the mirror");

    // (b) C: a pair of its own with a second mirror first.
    let port2 = free_udp_port();
    let mut mirror2 = p.mirror_daemon("mirror 2", &d.join("m2.img"), &d.join("m2-state"), port2);
    mirror2.start();
    let img_c = d.join("c.img");
    let (state_c, sock_c) = (d.join("c-state"), d.join("c.sock"));
    let mut c = p.primary_daemon("primary C", &img_c, &state_c, &sock_c, port2, &[]);
    c.start();
    nbd_write_to(
        &uri_of(&sock_c),
        &d,
        0,
        &pseudo_random(4 * MIB as usize, 303),
    );
    let v = wait_for("C replicates to mirror 2", LONG, &[&mirror2, &c], |v| {
        v[1]["state"] == "replicating" && v[1]["lag_bytes"] == 0 && v[0]["consistent"] == true
    });
    let uuid_c = s(&v[1], "uuid").to_string();
    assert!(!uuid_c.is_empty() && uuid_c != uuid_m, "{}", v[1]);
    stop_ok(&mut c);
    stop_ok(&mut mirror2);
    let mut c = p.primary_daemon(
        "primary C to mirror 1",
        &img_c,
        &state_c,
        &sock_c,
        p.port,
        &[],
    );
    c.start();
    let v = wait_for("C refused as unrelated", LONG, &[&p.mirror, &c], |v| {
        v[0]["state"] == "unrelated" && v[1]["state"] == "unrelated"
    });
    let cv = &v[1];
    let err = s(cv, "last_error");
    assert!(
        err.contains("unrelated data") && err.contains(&uuid_c) && err.contains(&uuid_m),
        "C's last_error should say unrelated data and name both UUIDs: {cv}"
    );
    assert!(cv["lag_seconds"].is_null(), "{cv}");
    assert_eq!(v[0]["state"], "unrelated", "the mirror's state: {}", v[0]);
    let mlog = p.mirror.log();
    assert!(
        mlog.lines()
            .any(|l| l.contains("unrelated data") && l.contains(&uuid_c) && l.contains(&uuid_m)),
        "the mirror's log has no line naming both UUIDs:\n{}",
        tail_lines(&mlog, 20)
    );
    assert_status_exits_6(&c);
    stop_ok(&mut c);
    assert_eq!(p.mirror_holds(), before, "C changed the mirror");

    // A again: it resumes.
    let mark = p.primary.log().len();
    p.primary.start();
    p.nbd_write(16 * MIB, &pseudo_random(2 * MIB as usize, 304));
    let (m, _) = p.wait_synced();
    assert_eq!(m["uuid"], uuid_m.as_str(), "{m}");
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains("mode=Resume") && !log.contains("full copy starts"),
        "A should resume, not copy or compare:\n{log}"
    );
    assert_eq!(p.full_copies(), 1, "only the initial copy");
    p.finish_and_compare();
}

/// Tried: while primary A replicates (and keeps writing), primary B (another volume file, a
/// new state directory, the same certificate name) connects to the mirror.
///
/// Expected: B is refused as unrelated data at once; A's session is not touched: its
/// `reconnects` does not move, its link stays up and its state `replicating`, the mirror's
/// state stays `replicating`, the mirror's log says why B was refused, and A's writes made
/// meanwhile arrive: byte-identical at the end.
#[test]
fn a_foreign_primary_does_not_disturb_the_running_pair() {
    let mut p = Pair::running(PairOptions::default());
    p.nbd_write(0, &pseudo_random(4 * MIB as usize, 311));
    let (_, a0) = p.wait_synced();
    let (mut b, _) = primary_b(&p, None);
    let mut writer = p.writer(312, 16 * MIB, 256 * 1024);
    b.start();
    let bv = wait_for("B refused as unrelated", LONG, &[&b], |v| {
        v[0]["state"] == "unrelated"
    })[0]
        .clone();
    assert!(
        s(&bv, "last_error").contains("unrelated data"),
        "B's last_error: {bv}"
    );
    let status = writer.wait();
    assert!(status.success(), "A's writer: {}", writer.output());
    stop_ok(&mut b);
    let (m, a1) = p.wait_synced();
    assert_eq!(
        a1["reconnects"], a0["reconnects"],
        "B's connection disturbed A's session: before {a0}, after {a1}"
    );
    assert_eq!(m["state"], "replicating", "the mirror's state: {m}");
    assert!(
        p.mirror
            .log()
            .contains("refused a primary holding another volume's data"),
        "the mirror's log does not say why B was refused:\n{}",
        tail_lines(&p.mirror.log(), 20)
    );
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 4. The mirror restarted with a blank volume file, same mirror state directory.
// ------------------------------------------------------------------------------------------

/// Tried: a pair replicates 8 MiB and both stop; the mirror's volume file is deleted and the
/// mirror started again with its state directory (it creates a blank file at the path); then
/// the primary. Then both stop again, 2 MiB are written into the mirror's volume file with
/// `dd conv=notrunc`, and both start again.
///
/// Expected: each time the mirror says NOT consistent (`consistent` false, `state` not
/// replicating, `state_detail` says why: the replaced disk, the change while stopped;
/// `lag_seconds` null, `status` exits 6) although its redo log and state say it was; once the
/// primary is back it is compared (not resumed), and only then consistent, byte-identical to
/// the primary.
#[test]
fn blank_mirror_volume_is_not_consistent_until_compared() {
    let mut p = Pair::running(PairOptions::default());
    p.nbd_write(3 * MIB, &pseudo_random(4 * MIB as usize, 401));
    p.nbd_write(50 * MIB, &pseudo_random(4 * MIB as usize, 402));
    p.wait_synced();
    p.stop_both();
    std::fs::remove_file(&p.mirror_img).unwrap();
    let mark = p.mirror.log().len();
    p.mirror.start();
    let m = vol0(&p.mirror.status());
    assert_eq!(m["consistent"], false, "a blank disk is not a copy: {m}");
    assert_ne!(m["state"], "replicating", "{m}");
    assert!(m["lag_seconds"].is_null(), "{m}");
    assert!(
        s(&m, "state_detail").contains("not the disk this state describes")
            && s(&m, "state_detail").contains("NOT consistent"),
        "state_detail should say why: {m}"
    );
    assert_status_exits_6(&p.mirror);
    assert!(
        log_since(&p.mirror, mark).contains("NOT consistent until the primary resyncs it"),
        "{}",
        p.mirror.log()
    );

    let pmark = p.primary.log().len();
    p.primary.start();
    let (_, pv) = p.wait_synced();
    let log = log_since(&p.primary, pmark);
    assert!(
        log.contains("mode=Compare") && s(&pv, "last_decision").contains("not a consistent copy"),
        "the mirror should be compared:\n{log}\n{pv}"
    );
    let mlog = log_since(&p.mirror, mark);
    assert!(
        mlog.lines().any(|l| l.contains("decision on connect")
            && l.contains("Compare")
            && l.contains("not a consistent copy")),
        "the mirror's log should show its decision to be compared:\n{mlog}"
    );

    // The mirror's volume written while the mirror was stopped (cleanly): the same.
    p.stop_both();
    let data = p.dir().join("offline.bin");
    std::fs::write(&data, pseudo_random(2 * MIB as usize, 403)).unwrap();
    run(
        "dd",
        &[
            &format!("if={}", data.display()),
            &format!("of={}", p.mirror_img.display()),
            "bs=1M",
            "seek=20",
            "conv=notrunc",
            "status=none",
        ],
    );
    let mark = p.mirror.log().len();
    p.mirror.start();
    let m = vol0(&p.mirror.status());
    assert_eq!(m["consistent"], false, "a changed disk is not a copy: {m}");
    assert!(
        s(&m, "state_detail").contains("changed while the mirror was not applying"),
        "state_detail should say why: {m}"
    );
    assert_status_exits_6(&p.mirror);
    p.primary.start();
    p.wait_synced();
    assert!(
        log_since(&p.mirror, mark)
            .lines()
            .any(|l| l.contains("decision on connect") && l.contains("Compare")),
        "{}",
        log_since(&p.mirror, mark)
    );
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 5. The primary's journal file system full (ENOSPC).
// ------------------------------------------------------------------------------------------

/// Tried: a pair replicates 2 MiB; the primary stops cleanly; its state directory's file
/// system (a 100 MiB tmpfs) is filled to the last byte by a filler file; the primary starts
/// again; then the filler goes and 1 MiB more is written.
///
/// Expected: the primary starts (the state it must save before taking writes goes into the
/// room of its 1 MiB reserve, and the log says the reserve was given back); replication
/// resumes (no copy, no comparison); after the filler is gone the reserve is made again at
/// the next start, and the mirror ends byte-identical. (Before: the start failed with exit 5,
/// "No space left on device", and nothing could be served until an admin freed space.)
#[test]
fn a_full_state_file_system_at_start_uses_the_reserve() {
    let mut p = Pair::running(PairOptions {
        primary_extra: vec!["--journal-size".into(), "64M".into()],
        primary_tmpfs: Some("100M"),
        ..Default::default()
    });
    p.nbd_write(0, &pseudo_random(2 * MIB as usize, 1501));
    p.wait_synced();
    let reserve = p.primary_state.join("reserve");
    assert!(reserve.exists(), "a reserve is kept in the state directory");
    stop_ok(&mut p.primary);
    let filler = p.tmpfs[0].dir.join("filler");
    let filled = fill_file_system(&filler);
    let mark = p.primary.log().len();
    p.primary.start();
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains("its reserve was given back"),
        "the start used the reserve (filler {filled} bytes):\n{log}"
    );
    let (_, pv) = p.wait_synced();
    assert_eq!(pv["state"], "replicating", "{pv}");
    assert_eq!(p.full_copies(), 1, "no new copy or comparison");
    std::fs::remove_file(&filler).unwrap();
    p.nbd_write(4 * MIB, &pseudo_random(MIB as usize, 1502));
    p.wait_synced();
    stop_ok(&mut p.primary);
    p.primary.start();
    assert!(reserve.exists(), "the reserve is made again");
    p.wait_synced();
    p.finish_and_compare();
}

/// Tried: the primary's state directory on a 200 MiB tmpfs, `--journal-size 128M`; while a
/// client writes 96 MiB of random 256 KiB writes (a FLUSH every 16), the tmpfs is filled up
/// by a filler file; the client goes on; the filler is removed; a client writes 1 MiB; the
/// primary is restarted (SIGTERM, start) and 4 MiB more are written.
///
/// Expected: clients' writes all succeed (the journal folds into the dirty map); the log
/// shows the journal ran out of space, and status names it (`journal_error`, `status` exits 6); once space is back a write succeeds and replication heals by itself (lag 0, the
/// images equal); after the restart the mirror ends byte-identical to the primary (no
/// sequence number given twice: the old bug left 65 blocks different with both sides saying
/// lag 0).
#[test]
fn primary_journal_enospc_ends_identical() {
    let mut p = Pair::running(PairOptions {
        primary_extra: vec!["--journal-size".into(), "128M".into()],
        primary_tmpfs: Some("200M"),
        ..Default::default()
    });
    let mut w = p.writer(501, 96 * MIB, 256 << 10);
    p.wait("the writer is under way", LONG, |_, pv| {
        u(pv, "journal_seq") >= 100
    });
    let filler = p.tmpfs[0].dir.join("filler");
    let filled = fill_file_system(&filler);
    let full = Instant::now();
    // Until the journal has hit the full file system (or the writer is done).
    while w.is_running() && !p.primary.log().contains("No space left on device") {
        assert!(full.elapsed() < LONG, "no ENOSPC in the primary's log");
        std::thread::sleep(Duration::from_millis(100));
    }
    // While full, status names the journal, and `status` says the volume is not replicating.
    // (The journal folds at each failure and may work again for a while in its recycled
    // segments, whose blocks are allocated: the failure shows whenever it recurs.)
    let names_failure = |pv: &Value| {
        let je = pv["journal_error"].as_str().unwrap_or_default();
        je.contains("journal") && je.contains("No space left on device")
    };
    let mut last = Value::Null;
    let shown = (0..200).any(|_| {
        last = vol0(&p.primary.status());
        let degraded = status_cli(&p.primary.control).0 == Some(6);
        std::thread::sleep(Duration::from_millis(25));
        names_failure(&last) && degraded
    });
    assert!(
        shown,
        "status should name the journal's failure, and exit 6, while its file system is \
         full: {last}"
    );
    assert_status_exits_6(&p.primary);
    std::fs::remove_file(&filler).unwrap();
    let status = w.wait();
    let out = w.output();
    let (m, pv) = p.vols();
    eprintln!(
        "journal_enospc: filler {filled} bytes; writer {status}: {out}\nprimary: {pv}\nmirror: {m}"
    );
    // `--on-journal-full track` (the default): a write that reached the disk succeeds, its
    // region goes into the dirty map.
    assert!(
        status.success() && out.contains(" errors=0 "),
        "a client write failed while the journal's file system was full: {out}"
    );
    assert!(
        p.primary.log().contains("No space left on device"),
        "the test did not make the journal run out of space:\n{}",
        tail_lines(&p.primary.log(), 30)
    );
    // Space is back: a client write succeeds, and replication heals without a restart.
    p.nbd_write(20 * MIB, &pseudo_random(MIB as usize, 503));
    let (_, pv) = p.wait_synced();
    assert!(
        pv["journal_error"].is_null(),
        "the journal's failure should clear once it works: {pv}"
    );
    if let Err(e) = compare_files(&p.primary_img, &p.mirror_img) {
        panic!("lag 0 on both sides after the full journal, yet: {e}");
    }
    stop_ok(&mut p.primary);
    p.primary.start();
    p.nbd_write(10 * MIB, &pseudo_random(4 * MIB as usize, 502));
    p.wait_synced();

    // Again, but the primary is killed (-9) while its file system is still full. The mirror
    // is away this time: acknowledged segments recycled in place (allocated blocks) could
    // otherwise keep the journal going on the full file system for the whole writer.
    let enospc = p.primary.log().matches("No space left on device").count();
    assert!(p.mirror.stop().is_some_and(|s| s.success()));
    let mut w = p.writer(504, 96 * MIB, 256 << 10);
    p.wait("the writer is under way", LONG, |_, pv| {
        u(pv, "journal_seq") >= 100
    });
    let filled = fill_file_system(&filler);
    assert!(
        p.primary
            .wait_for_log_count("No space left on device", enospc + 1, LONG),
        "the journal did not run out of space again"
    );
    p.primary.kill9();
    w.wait();
    eprintln!(
        "journal_enospc: again, filler {filled} bytes; writer: {}",
        w.output()
    );
    std::fs::remove_file(&filler).unwrap();
    p.primary.start();
    p.mirror.start();
    p.nbd_write(30 * MIB, &pseudo_random(4 * MIB as usize, 505));
    p.wait_synced();
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 5b. A log's disk fails: fsync or writes answer EIO (tools/faultyfs.py under the primary's
// STATE/journal or the mirror's STATE/redo; no device mapper here). Through FUSE the data
// reaches the backing file before fsync fails, so these tests try the error paths and what
// status and the logs say; the pages a failed writeback loses are the simulator's (MemFs).
// ------------------------------------------------------------------------------------------

/// The file system of the pair's [`PairOptions::faulty_log`] (FUSE).
fn log_fs(p: &Pair) -> &FaultyFs {
    p.faulty.as_ref().expect("a pair with faulty_log")
}

/// The admin's step after a mirror's log disk is fixed: SIGTERM, start, lag 0. Returns
/// whether the primary started a full copy or comparison meanwhile, and its log since.
fn restart_the_mirror(p: &mut Pair) -> (bool, String) {
    let copies = p.full_copies();
    stop_ok(&mut p.mirror);
    let mark = p.primary.log().len();
    p.mirror.start();
    p.wait_synced();
    (p.full_copies() != copies, log_since(&p.primary, mark))
}

/// A pair whose primary journals on tools/faultyfs.py: 2 MiB replicated (data of `seed`),
/// then the mirror stopped.
fn faulty_journal_and_mirror_away(seed: u64) -> Pair {
    let mut p = Pair::running(PairOptions {
        faulty_log: Some(FaultyLog::PrimaryJournal),
        ..Default::default()
    });
    p.nbd_write(0, &pseudo_random(2 * MIB as usize, seed));
    p.wait_synced();
    assert!(p.mirror.stop().is_some_and(|s| s.success()));
    p
}

/// Tried: the primary's journals on tools/faultyfs.py, no faults; the mirror stops; a client
/// writes 48 MiB at unaligned offsets (more than the journal's 32 MiB RAM ring); the mirror
/// starts again.
///
/// Expected: the records that left the RAM ring are read back from their segments (mapped
/// from files the file system created) and the mirror ends byte-identical: the file system
/// the failing-disk tests below stand on passes everything else through. (It once opened
/// created files write-only, and the primary died of SIGBUS reading them back.)
#[test]
fn records_read_back_from_segments_on_faultyfs_ship() {
    let mut p = Pair::running(PairOptions {
        faulty_log: Some(FaultyLog::PrimaryJournal),
        ..Default::default()
    });
    p.nbd_write(0, &pseudo_random(MIB as usize, 1701));
    p.wait_synced();
    assert!(p.mirror.stop().is_some_and(|s| s.success()));
    for i in 0..12u64 {
        let data = pseudo_random(4 * MIB as usize - 1024, 1702 + i);
        p.nbd_write(i * 4 * MIB + 512, &data);
    }
    p.mirror.start();
    p.wait_synced();
    assert!(
        p.primary.is_running(),
        "the primary died shipping from disk"
    );
    assert_eq!(log_fs(&p).failures(), 0, "{}", log_fs(&p).log());
    p.finish_and_compare();
}

/// Tried: the primary's journals on tools/faultyfs.py; a pair replicates 2 MiB; the mirror
/// stops and a client writes 4 MiB (journaled, unshipped). Then every fsync of a journal
/// segment fails (EIO) and a client writes 1 MiB and FLUSHes (libnbd). The primary is killed
/// (-9) with the faults still on; the faults end; both start again. Then, with the link up and
/// the journal in use again, every write to a journal segment fails (EIO) while a client writes
/// 4 MiB and FLUSHes; the faults end and a client writes 1 MiB more.
///
/// Expected: every client write and FLUSH succeeds (before, the FLUSH got EIO for writes that
/// were on the volume). The journal folds into the dirty map: the log says why,
/// `journal_tracking` is true and `journal_folds` moves; status names the failure
/// (`journal_error` "cannot sync the journal: Input/output error", `status` exits 6) while
/// the map stays saved (`dirty_map_error` null). After the kill the restart resyncs the map's
/// regions only (`mode=Resume`, no comparison or copy) and the images are equal. Failing
/// writes fold the same way; once writes work the failure clears by itself and the mirror ends
/// byte-identical after stop + recover.
#[test]
fn a_journal_disk_that_fails_syncs_or_writes_folds_and_clients_go_on() {
    let mut p = faulty_journal_and_mirror_away(1601);
    p.nbd_write(8 * MIB, &pseudo_random(4 * MIB as usize, 1602));
    let before = vol0(&p.primary.status());
    assert_eq!(before["journal_tracking"], false, "{before}");
    assert!(u(&before, "lag_bytes") >= 4 * MIB, "journaled: {before}");

    // fsync fails. `nbd_write` FLUSHes and fails the test if libnbd hears an error.
    log_fs(&p).fail("fsync EIO *.jnl\n");
    let mark = p.primary.log().len();
    p.nbd_write(16 * MIB, &pseudo_random(MIB as usize, 1603));
    let fs_log = log_fs(&p).log();
    assert!(
        fs_log.contains(&format!("fsync /{VOL}/")) && fs_log.contains(".jnl -> EIO"),
        "the test did not make a journal fsync fail:\n{fs_log}"
    );
    let pv = vol0(&p.primary.status());
    assert_eq!(
        pv["journal_tracking"], true,
        "the journal should fold: {pv}"
    );
    assert!(
        u(&pv, "journal_folds") > u(&before, "journal_folds"),
        "journal_folds should move: {pv}"
    );
    assert!(
        s(&pv, "journal_error").contains("cannot sync the journal")
            && s(&pv, "journal_error").contains("Input/output error"),
        "status should name the failed sync: {pv}"
    );
    assert!(pv["dirty_map_error"].is_null(), "the map is saved: {pv}");
    assert!(
        u(&pv, "dirty_bytes") >= 5 * MIB,
        "the unshipped 4 MiB and the new 1 MiB are in the map: {pv}"
    );
    assert!(
        log_since(&p.primary, mark)
            .contains("journal folded into the dirty map (cannot sync the journal"),
        "the log should say why the journal folded:\n{}",
        log_since(&p.primary, mark)
    );
    assert_status_exits_6(&p.primary);

    // A crash while the disk still fails: the map saved at the fold names every region.
    p.primary.kill9();
    log_fs(&p).heal();
    let copies = p.full_copies();
    let mark = p.primary.log().len();
    p.primary.start();
    p.mirror.start();
    let (_, pv) = p.wait_synced();
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains("mode=Resume") && p.full_copies() == copies,
        "only the map's regions should be resynced, no comparison or copy:\n{log}"
    );
    if let Err(e) = compare_files(&p.primary_img, &p.mirror_img) {
        panic!("lag 0 after the restart, yet: {e}\n{pv}");
    }

    // Writes to the journal fail, with the link up and the journal in use again.
    assert_eq!(pv["journal_tracking"], false, "the journal is back: {pv}");
    let folds = u(&pv, "journal_folds");
    let failed = log_fs(&p).failures();
    let mark = p.primary.log().len();
    log_fs(&p).fail("write EIO *.jnl\n");
    p.nbd_write(24 * MIB, &pseudo_random(4 * MIB as usize, 1604));
    let fs_log = log_fs(&p).log();
    assert!(
        log_fs(&p).failures() > failed && fs_log.contains(&format!("write /{VOL}/")),
        "the test did not make a journal write fail:\n{fs_log}"
    );
    let pv = vol0(&p.primary.status());
    assert!(
        u(&pv, "journal_folds") > folds,
        "a failed append folds: {pv}"
    );
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains("journal folded into the dirty map (an intent cannot be written")
            || log.contains("journal folded into the dirty map (a record cannot be written"),
        "the log should say a record could not be written:\n{log}"
    );
    log_fs(&p).heal();
    p.nbd_write(40 * MIB, &pseudo_random(MIB as usize, 1605));
    p.wait(
        "the failure to clear and the mirror to catch up",
        LONG,
        |m, pv| synced(m, pv) && pv["journal_error"].is_null() && pv["journal_tracking"] == false,
    );
    p.finish_and_compare();
}

/// Tried: the primary's journals on tools/faultyfs.py, the mirror away; every fsync there
/// fails (segments, the dirty map, the directory) and a client writes 2 MiB and FLUSHes. The
/// faults end and a client writes and FLUSHes again; they come back and a client writes once
/// more; the primary is killed (-9) with the faults on; they end; both start again.
///
/// Expected: every write and FLUSH succeeds. While the map cannot be saved, status says a full
/// comparison is due (`dirty_map_error`) and the map's file is gone (a restart must not trust
/// it); once syncs work, the next FLUSH saves it whole again (log "dirty map saved again",
/// `dirty_map_error` null). After the kill with the map lost again, the restart compares the
/// mirror (`mode=Compare`: the writes are nowhere but on the volume) and the mirror ends
/// byte-identical.
#[test]
fn a_journal_disk_whose_every_sync_fails_makes_the_restart_compare() {
    let mut p = faulty_journal_and_mirror_away(1611);
    let map = p.primary_state.join("journal").join(VOL).join("dirty.map");
    let all_syncs = "fsync EIO *\nfsyncdir EIO *\n";
    let map_lost = |pv: &Value| {
        let e = s(pv, "dirty_map_error");
        e.contains("cannot write the dirty map") && e.contains("full comparison")
    };

    log_fs(&p).fail(all_syncs);
    p.nbd_write(8 * MIB, &pseudo_random(2 * MIB as usize, 1612));
    let pv = vol0(&p.primary.status());
    assert_eq!(
        pv["journal_tracking"], true,
        "the journal should fold: {pv}"
    );
    assert!(map_lost(&pv), "status should say a comparison is due: {pv}");
    assert!(!map.exists(), "a map that lacks marks is removed: {pv}");
    assert!(
        log_fs(&p).log().contains("dirty.map -> EIO"),
        "the test did not make the map's sync fail:\n{}",
        log_fs(&p).log()
    );

    // Syncs work again: the next FLUSH saves the map whole.
    log_fs(&p).heal();
    let mark = p.primary.log().len();
    p.nbd_write(12 * MIB, &pseudo_random(MIB as usize, 1613));
    let pv = vol0(&p.primary.status());
    assert!(
        pv["dirty_map_error"].is_null() && map.exists(),
        "the map should be saved again: {pv}"
    );
    assert!(
        log_since(&p.primary, mark).contains("dirty map saved again"),
        "{}",
        log_since(&p.primary, mark)
    );

    // Lost again, then a crash: nothing on disk names the regions written meanwhile.
    log_fs(&p).fail(all_syncs);
    p.nbd_write(16 * MIB, &pseudo_random(MIB as usize, 1614));
    let pv = vol0(&p.primary.status());
    assert!(map_lost(&pv) && !map.exists(), "{pv}");
    p.primary.kill9();
    log_fs(&p).heal();
    let mark = p.primary.log().len();
    p.primary.start();
    p.mirror.start();
    p.wait_synced();
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains("mode=Compare"),
        "without a map the mirror must be compared:\n{log}"
    );
    p.finish_and_compare();
}

/// Tried: the mirror's redo logs on tools/faultyfs.py; a pair replicates 2 MiB; every fsync
/// there fails (EIO) while a client writes 4 MiB and FLUSHes; the faults end; a client
/// writes 1 MiB; the admin restarts the mirror (SIGTERM, start).
///
/// Expected: the clients' writes and FLUSHes succeed (the primary journals them: production
/// does not wait for the safe). The mirror acknowledges nothing past the failure and says
/// why (`state` failed, `state_detail` names the redo log's failed sync and asks for a
/// restart; the primary's `last_error` names it; `status` exits 6 on both), and stays so
/// after the faults end: a log whose sync failed is not trusted again (its pages may never
/// reach the disk). After the restart replication resumes without a copy or a comparison and
/// the mirror ends byte-identical.
#[test]
fn a_redo_log_disk_that_fails_syncs_stops_the_mirror_until_restarted() {
    let mut p = Pair::running(PairOptions {
        faulty_log: Some(FaultyLog::MirrorRedo),
        ..Default::default()
    });
    p.nbd_write(0, &pseudo_random(2 * MIB as usize, 1621));
    p.wait_synced();
    log_fs(&p).fail("fsync EIO *.redo\n");
    p.nbd_write(8 * MIB, &pseudo_random(4 * MIB as usize, 1622));
    let (m, pv) = p.wait("the mirror reports its failed redo log", LONG, |m, pv| {
        m["state"] == "failed" && s(pv, "last_error").contains("redo log")
    });
    eprintln!("redo_eio: mirror {m}\nprimary {pv}");
    assert!(
        log_fs(&p).log().contains(" -> EIO"),
        "the test did not make a redo sync fail:\n{}",
        log_fs(&p).log()
    );
    assert!(
        s(&m, "state_detail").contains("redo log failed: sync")
            && s(&m, "state_detail").contains("restart the mirror"),
        "the mirror's status should say what failed and what to do: {m}"
    );
    assert!(
        u(&pv, "lag_bytes") >= 4 * MIB,
        "the primary keeps the writes: {pv}"
    );
    assert_status_exits_6(&p.mirror);
    assert_status_exits_6(&p.primary);

    // Healed, but not trusted until restarted: nothing more is acknowledged.
    log_fs(&p).heal();
    let acked = u(&pv, "acked_seq");
    p.nbd_write(16 * MIB, &pseudo_random(MIB as usize, 1623));
    std::thread::sleep(Duration::from_secs(2));
    let (m, pv) = p.vols();
    assert_eq!(m["state"], "failed", "{m}");
    assert_eq!(
        u(&pv, "acked_seq"),
        acked,
        "nothing acknowledged past the failure: {pv}"
    );

    let (copied, log) = restart_the_mirror(&mut p);
    assert!(
        !copied && log.contains("mode=Resume"),
        "the restarted mirror should resume, not be copied or compared:\n{log}"
    );
    p.finish_and_compare();
}

/// Tried: a mirror with `--history 1h`, its history on tools/faultyfs.py; a pair replicates
/// 2 MiB twice (points are made); every fsync of a history segment fails (EIO) while a client
/// writes 2 MiB and FLUSHes; the faults end; the admin restarts the mirror.
///
/// Expected: the client's writes succeed (the primary journals them). The mirror applies
/// nothing without its before-images and says why (`state` failed, `state_detail` names the
/// history's failed sync and asks for a restart; `status` exits 6) and stays so after the
/// faults end (a log whose sync failed is appended to only once reopened). After the restart
/// it catches up without a copy or a comparison, `history` lists its points in order, and the
/// mirror ends byte-identical.
#[test]
fn a_history_disk_that_fails_syncs_stops_applying_until_the_mirror_restarts() {
    let mut p = Pair::new(PairOptions {
        faulty_log: Some(FaultyLog::MirrorHistory),
        ..Default::default()
    });
    p.mirror.push_args(&["--history", "1h"]);
    p.mirror.start();
    p.primary.start();
    p.wait_consistent();
    p.nbd_write(0, &pseudo_random(2 * MIB as usize, 1631));
    p.wait_synced();
    p.nbd_write(4 * MIB, &pseudo_random(2 * MIB as usize, 1632));
    p.wait_synced();
    log_fs(&p).fail("fsync EIO *.undo\n");
    p.nbd_write(0, &pseudo_random(2 * MIB as usize, 1633));
    let (m, _) = p.wait("the mirror reports its failed history", LONG, |m, _| {
        m["state"] == "failed"
    });
    assert!(
        log_fs(&p).log().contains(".undo -> EIO"),
        "the test did not make a history sync fail:\n{}",
        log_fs(&p).log()
    );
    let detail = s(&m, "state_detail");
    assert!(
        detail.contains("history")
            && detail.contains("failed a sync")
            && detail.contains("restart the mirror"),
        "the mirror's status should say what failed and what to do: {m}"
    );
    assert_status_exits_6(&p.mirror);

    log_fs(&p).heal();
    std::thread::sleep(Duration::from_secs(2));
    let m = vol0(&p.mirror.status());
    assert_eq!(
        m["state"], "failed",
        "healed, but not trusted before a restart: {m}"
    );

    let (copied, _) = restart_the_mirror(&mut p);
    assert!(!copied, "the restarted mirror resumes");
    let out = run(
        BIN,
        &[
            "history",
            "--control",
            p.mirror.control.to_str().unwrap(),
            "--json",
        ],
    );
    let doc: Value = serde_json::from_str(&out).unwrap();
    let sets: Vec<u64> = doc["volumes"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pt| pt["set"].as_u64().unwrap())
        .collect();
    assert!(
        sets.len() >= 2 && sets.windows(2).all(|w| w[0] < w[1]),
        "history lists its points in order: {doc}"
    );
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 6. The mirror's redo log file system full.
// ------------------------------------------------------------------------------------------

/// Tried: the mirror's state directory on a 96 MiB tmpfs; while a client writes 64 MiB of
/// random 1 MiB writes, the tmpfs is filled by a filler file; once the mirror reports the
/// failure, the filler is removed.
///
/// Expected: the mirror's status names the redo log or the state directory (`state` failed,
/// `state_detail` says so, not a failed volume) and the primary's `last_error` too; once
/// space is freed, replication resumes by itself (no restart of either daemon) and the mirror
/// ends byte-identical.
#[test]
fn mirror_redo_enospc_recovers_by_itself() {
    let mut p = Pair::running(PairOptions {
        mirror_tmpfs: Some("96M"),
        ..Default::default()
    });
    let mut w = p.writer(601, 64 * MIB, MIB);
    p.wait("the writer is under way", LONG, |m, _| {
        u(m, "acked_set") >= 3
    });
    let filler = p.tmpfs[0].dir.join("filler");
    let errors_before = p.mirror.log().matches(" ERROR ").count();
    let filled = fill_file_system(&filler);
    // Every state and error shown while the file system is full (until the failure, and for
    // 2 s more).
    let mut details = Vec::new();
    let mut errors = Vec::new();
    let mut seen = |m: &Value, pv: &Value| {
        for (list, v) in [
            (&mut details, s(m, "state_detail")),
            (&mut errors, s(pv, "last_error")),
        ] {
            if !v.is_empty() && !list.iter().any(|x| x == v) {
                list.push(v.to_string());
            }
        }
    };
    let (m, pv) = p.wait("the mirror reports the full file system", LONG, |m, pv| {
        seen(m, pv);
        m["state"] == "failed"
    });
    assert_eq!(m["consistent"], false, "{m}");
    let full = Instant::now();
    while full.elapsed() < Duration::from_secs(2) {
        let (m, pv) = p.vols();
        seen(&m, &pv);
        std::thread::sleep(Duration::from_millis(50));
    }
    let spam = p.mirror.log().matches(" ERROR ").count() - errors_before;
    eprintln!(
        "redo_enospc: filler {filled} bytes; {spam} ERROR lines; mirror states seen: \
         {details:#?}\nprimary errors seen: {errors:#?}\nmirror: {m}\nprimary: {pv}"
    );
    // The redo log and the volume's state file share the state directory's file system:
    // whichever write hit it first is named, never the volume (which is fine).
    let names_it = |d: &str| d.contains("redo log") || d.contains("state directory");
    for d in details.iter().filter(|d| d.contains("NOT being updated")) {
        assert!(
            names_it(d) && !d.contains("volume failed"),
            "the mirror's status should name the redo log or the state directory: {d}"
        );
    }
    assert!(
        errors.iter().any(|e| names_it(e)),
        "the primary's last_error never named the redo log: {errors:?}"
    );
    assert!(
        errors.iter().all(|e| !e.contains("volume failed")),
        "{errors:?}"
    );
    assert!(
        spam < 200,
        "{spam} ERROR lines in 2 s: a failure is logged at every retry"
    );
    let mark = p.mirror.log().len();
    std::fs::remove_file(&filler).unwrap();
    w.wait();
    eprintln!("redo_enospc: writer: {}", w.output());
    let (m, pv) = p.wait_synced();
    assert_eq!(p.mirror.starts, 1, "the mirror was restarted");
    assert_eq!(p.primary.starts, 1, "the primary was restarted");
    eprintln!("redo_enospc: after freeing space: mirror {m}\nprimary {pv}");
    assert!(
        log_since(&p.mirror, mark).contains("works again")
            || log_since(&p.mirror, mark).contains("retrying the redo log"),
        "{}",
        tail_lines(&p.mirror.log(), 30)
    );
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 7. Modes of journal and redo segments, state files, and their directories.
// ------------------------------------------------------------------------------------------

/// The modes of `dirs` and of the files directly in them, read while they may be changing
/// (a file that vanishes meanwhile is skipped): (path, mode, is a directory).
fn modes_in(dirs: &[PathBuf]) -> Vec<(PathBuf, u32, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        out.push((dir.clone(), mode_of(dir), true));
        for e in entries.flatten() {
            if let Ok(meta) = e.metadata() {
                if meta.is_file() {
                    out.push((e.path(), meta.permissions().mode() & 0o777, false));
                }
            }
        }
    }
    out
}

/// While `w` runs (and once after), check that every file in `dirs` is 0600 and every one of
/// `dirs` 0700; returns the problems and the file names seen.
fn watch_private_modes(
    dirs: &[PathBuf],
    w: &mut Background,
) -> (Vec<String>, std::collections::BTreeSet<String>) {
    let mut problems = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let running = w.is_running();
        for (path, mode, is_dir) in modes_in(dirs) {
            let want = if is_dir { 0o700 } else { 0o600 };
            if mode != want {
                problems.insert(format!("{} is {mode:o}, not {want:o}", path.display()));
            }
            if !is_dir {
                // STATE/journal/vol1/1.jnl -> journal/vol1/1.jnl
                let parts: Vec<_> = path.iter().rev().take(3).collect();
                let short: Vec<String> = parts
                    .iter()
                    .rev()
                    .map(|c| c.to_string_lossy().to_string())
                    .collect();
                seen.insert(short.join("/"));
            }
        }
        if !running {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (problems.into_iter().collect(), seen)
}

/// Tried: a pair replicates 48 MiB of 1 MiB writes while the modes of the primary's journal
/// segments (STATE/journal/vol1/*.jnl), the mirror's redo segments (STATE/redo/vol1/*.redo,
/// and spares), both state files (STATE/volumes/*.json) and their directories are watched.
/// Then, as an older release left them, the files are made 0644 and the directories 0755
/// (STATE/journal, STATE/redo, the state directories and their lock files too), both daemons
/// restart and replicate 32 MiB more, watched the same way.
///
/// Expected: files 0600 and their directories 0700 when created, and tightened to that after
/// the restart; the state directories, STATE/journal and STATE/redo 0700, and the lock files
/// 0600, both times.
#[test]
fn state_files_are_private() {
    let mut p = Pair::running(PairOptions::default());
    let dirs = [
        p.primary_state.join("journal").join(VOL),
        p.primary_state.join("volumes"),
        p.mirror_state.join("redo").join(VOL),
        p.mirror_state.join("volumes"),
    ];
    let parents = [
        p.primary_state.join("journal"),
        p.mirror_state.join("redo"),
        p.primary_state.clone(),
        p.mirror_state.clone(),
    ];
    let locks = [p.primary_state.join("lock"), p.mirror_state.join("lock")];
    let check = |when: &str, w: &mut Background| {
        let (mut problems, seen) = watch_private_modes(&dirs, w);
        for suffix in [".jnl", ".redo", ".json"] {
            if !seen.iter().any(|n| n.ends_with(suffix)) {
                problems.push(format!("{when}: no *{suffix} file was seen (saw {seen:?})"));
            }
        }
        for d in &parents {
            let m = mode_of(d);
            if m != 0o700 {
                problems.push(format!("{} is {m:o}, not 700", d.display()));
            }
        }
        for f in &locks {
            let m = mode_of(f);
            if m != 0o600 {
                problems.push(format!("{} is {m:o}, not 600", f.display()));
            }
        }
        eprintln!("private modes {when}: files seen {seen:?}");
        assert!(problems.is_empty(), "{when}:\n{}", problems.join("\n"));
    };
    let mut w = p.writer(701, 48 * MIB, MIB);
    check("as created", &mut w);
    assert!(w.output().contains("errors=0"), "{}", w.output());
    p.wait_synced();

    p.stop_both();
    use std::os::unix::fs::PermissionsExt;
    let loosen = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    for (path, _, is_dir) in modes_in(&dirs) {
        loosen(&path, if is_dir { 0o755 } else { 0o644 });
    }
    for d in &parents {
        loosen(d, 0o755);
    }
    for f in &locks {
        loosen(f, 0o644);
    }
    p.mirror.start();
    p.primary.start();
    let mut w = p.writer(702, 32 * MIB, MIB);
    check(
        "after a restart over files an older release left 0644",
        &mut w,
    );
    p.wait_synced();
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 8. A clean SIGTERM of the primary, then a restart.
// ------------------------------------------------------------------------------------------

/// Tried: a pair replicates 160 MiB of random 1 MiB writes over the 64 MiB volume (so the
/// journal recycles segments); the mirror stops, 4 MiB more are written (they stay in the
/// journal), the primary gets SIGTERM and starts again, then the mirror.
///
/// Expected: the stop logs "journal closed cleanly"; the restart's log says the last stop was
/// clean (`journal open ... last_stop=Clean`), with no torn record, no tail cut and no range
/// to re-read; the mirror resumes (no new copy or comparison) and ends byte-identical.
#[test]
fn clean_stop_leaves_a_clean_journal() {
    let mut p = Pair::running(PairOptions::default());
    let mut w = p.writer(801, 160 * MIB, MIB);
    let status = w.wait();
    assert!(status.success(), "writer: {}", w.output());
    assert!(w.output().contains("errors=0"), "{}", w.output());
    p.wait_synced();
    stop_ok(&mut p.mirror);
    p.nbd_write(5 * MIB, &pseudo_random(4 * MIB as usize, 802));
    let (_, pv) = p.wait("the journal holds unshipped writes", LONG, |_, pv| {
        u(pv, "lag_bytes") > 0
    });
    let mark = p.primary.log().len();
    stop_ok(&mut p.primary);
    let stop_log = log_since(&p.primary, mark);
    assert!(
        stop_log.contains("journal closed cleanly"),
        "the stop did not close the journal cleanly:\n{stop_log}"
    );
    let mark = p.primary.log().len();
    p.primary.start();
    let log = log_since(&p.primary, mark);
    let open = log
        .lines()
        .find(|l| l.contains("journal open"))
        .unwrap_or_else(|| panic!("no journal open line:\n{log}"));
    assert!(open.contains("last_stop=Clean"), "{open}");
    for bad in [
        "torn",
        "tail cut",
        "unexpected bytes",
        "writes were in flight",
        "does not continue the journal",
    ] {
        assert!(
            !log.to_lowercase().contains(bad),
            "the restart after a clean stop logs {bad:?}:\n{log}"
        );
    }
    let ident = log
        .lines()
        .find(|l| l.contains("volume identity"))
        .unwrap_or_else(|| panic!("no volume identity line:\n{log}"));
    assert!(ident.contains("continuous=Some(true)"), "{ident}");
    p.mirror.start();
    let (_, pv2) = p.wait_synced();
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains("mode=Resume") && !log.contains("full copy starts"),
        "the primary should resume after a clean stop:\n{log}"
    );
    assert_eq!(p.full_copies(), 1, "only the initial copy");
    eprintln!(
        "clean_stop: journal held {} bytes at the stop; {open}\nafter: {pv2}",
        pv["lag_bytes"]
    );
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 9. A TRIM larger than the journal.
// ------------------------------------------------------------------------------------------

/// Tried: a 256 MiB volume with `--journal-size 128M` holding data; a single 200 MiB TRIM
/// through libnbd (`h.trim`), a 200 MiB WRITE_ZEROES (`h.zero`), then `mkfs.ext4` (which
/// discards the whole device) through nbdfuse and a loop device. Then, with the mirror
/// stopped and a writer parked on the full journal, a 200 MiB TRIM and a 64 MiB
/// WRITE_ZEROES; then the mirror starts again.
///
/// Expected: each completes (each bounded: a client still running after 120 s fails the
/// test), even while the journal is full (the writer keeps waiting for space, not the TRIM);
/// `journal_full` is false afterwards, and the mirror ends byte-identical (the trimmed range
/// zero on both; mkfs's discard reached the volume).
#[test]
fn trim_larger_than_the_journal_completes() {
    let mut p = Pair::running(PairOptions {
        size: 256 * MIB,
        primary_extra: blocking_journal("128M"),
        ..Default::default()
    });
    for (i, at) in [16u64, 100, 200, 230].iter().enumerate() {
        p.nbd_write(at * MIB, &pseudo_random(4 * MIB as usize, 901 + i as u64));
    }
    p.wait_synced();
    let started = Instant::now();
    nbdsh(
        &p.uri(),
        &["h.trim(200 * 1024 * 1024, 16 * 1024 * 1024)", "h.flush()"],
    );
    let trim_took = started.elapsed();
    let (_, pv) = p.vols();
    assert_eq!(pv["journal_full"], false, "after the TRIM: {pv}");
    p.wait_synced();
    // A WRITE_ZEROES of the same size, over data.
    p.nbd_write(60 * MIB, &pseudo_random(4 * MIB as usize, 906));
    p.wait_synced();
    let started = Instant::now();
    nbdsh(
        &p.uri(),
        &["h.zero(200 * 1024 * 1024, 40 * 1024 * 1024)", "h.flush()"],
    );
    let zero_took = started.elapsed();
    let (_, pv) = p.vols();
    assert_eq!(pv["journal_full"], false, "after the WRITE_ZEROES: {pv}");
    p.wait_synced();
    assert!(
        read_at(&p.primary_img, 100 * MIB, 4096)
            .iter()
            .all(|&b| b == 0),
        "the TRIM did not zero the primary's range"
    );

    // Data inside the future file system's block group 1, away from its metadata: mkfs's
    // discard must zero it.
    p.nbd_write(180 * MIB, &pseudo_random(4 * MIB as usize, 905));
    p.wait_synced();
    let started = Instant::now();
    {
        let fuse = FuseFile::start(&p.dir().join("fuse"), &p.uri());
        let lo = LoopDev::attach(&fuse.file());
        run("mkfs.ext4", &["-q", "-F", &lo.dev]);
        drop(lo);
        drop(fuse);
    }
    let mkfs_took = started.elapsed();
    assert!(
        read_at(&p.primary_img, 181 * MIB, 4096)
            .iter()
            .all(|&b| b == 0),
        "mkfs.ext4's discard did not reach the volume"
    );
    let (_, pv) = p.vols();
    assert_eq!(pv["journal_full"], false, "after mkfs.ext4: {pv}");
    p.wait_synced();
    eprintln!(
        "trim: 200 MiB TRIM took {trim_took:?}, WRITE_ZEROES {zero_took:?}, mkfs.ext4 \
         {mkfs_took:?}"
    );

    // With the mirror away and the journal full (a writer parked on it), a TRIM and a
    // WRITE_ZEROES still complete.
    stop_ok(&mut p.mirror);
    let mut w = p.writer(907, 160 * MIB, MIB);
    p.wait("the journal is full", LONG, |_, pv| {
        pv["journal_full"] == true
    });
    let started = Instant::now();
    nbdsh(
        &p.uri(),
        &[
            "h.trim(200 * 1024 * 1024, 16 * 1024 * 1024)",
            "h.zero(64 * 1024 * 1024, 0)",
            "h.flush()",
        ],
    );
    let full_took = started.elapsed();
    assert!(w.is_running(), "the writer should wait for journal space");
    p.mirror.start();
    let status = w.wait();
    assert!(
        status.success() && w.output().contains("errors=0"),
        "{}",
        w.output()
    );
    let (_, pv) = p.wait_synced();
    assert_eq!(pv["journal_full"], false, "{pv}");
    eprintln!("trim: with the journal full, TRIM + WRITE_ZEROES took {full_took:?}");
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 10. A volume file written while its primary was not running.
// ------------------------------------------------------------------------------------------

/// Tried: a pair replicates 4 MiB; the primary stops cleanly; 2 MiB are written into its
/// volume file with `dd conv=notrunc`; the primary starts again. Then the mirror stops, the
/// admin runs `accept-volume`, a client writes 1 MiB, the primary restarts, and only then
/// the mirror starts again.
///
/// Expected: the primary ships nothing (`state` volume_changed, `last_error` says the volume
/// changed while the daemon was stopped, `lag_seconds` null, `status` exits 6) and the
/// mirror is untouched until `accept-volume`; the acceptance survives the restart, and when
/// the mirror is back a comparison (not a resume) brings it to the volume, byte-identical.
#[test]
fn volume_written_while_stopped_is_refused_until_accepted() {
    let mut p = Pair::running(PairOptions::default());
    p.nbd_write(0, &pseudo_random(4 * MIB as usize, 1001));
    p.wait_synced();
    stop_ok(&mut p.primary);
    p.wait("mirror sees the primary gone", LONG, |m, _| {
        m["link"] == "down"
    });
    let before = p.mirror_holds();
    let data = p.dir().join("offline.bin");
    std::fs::write(&data, pseudo_random(2 * MIB as usize, 1002)).unwrap();
    run(
        "dd",
        &[
            &format!("if={}", data.display()),
            &format!("of={}", p.primary_img.display()),
            "bs=1M",
            "seek=12",
            "conv=notrunc",
            "status=none",
        ],
    );
    let decisions = p.mirror.log().matches("decision on connect").count();
    let mark = p.primary.log().len();
    p.primary.start();
    let (_, pv) = p.wait(
        "the primary refuses to ship: volume_changed",
        LONG,
        |_, pv| pv["state"] == "volume_changed",
    );
    assert!(
        s(&pv, "last_error").contains("changed while the daemon was stopped")
            && s(&pv, "last_error").contains("accept-volume"),
        "{pv}"
    );
    assert!(pv["lag_seconds"].is_null(), "{pv}");
    assert_status_exits_6(&p.primary);
    assert!(
        log_since(&p.primary, mark).contains("nothing is shipped until an admin accepts"),
        "{}",
        p.primary.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        p.mirror_holds(),
        before,
        "the mirror changed before accept-volume"
    );
    assert_eq!(
        p.mirror.log().matches("decision on connect").count(),
        decisions,
        "a primary whose volume changed connected to the mirror"
    );
    // Accepted while the mirror is away; the primary writes on and restarts before the
    // mirror is back: the acceptance (a break in its history) survives the restart.
    stop_ok(&mut p.mirror);
    let (code, out, err) = accept_volume(&p.primary, false);
    assert_eq!(code, Some(0), "accept-volume: {out}{err}");
    p.wait("accepted: connecting", LONG, |_, pv| {
        pv["state"] == "connecting"
    });
    p.nbd_write(30 * MIB, &pseudo_random(MIB as usize, 1003));
    stop_ok(&mut p.primary);
    let mark = p.primary.log().len();
    p.primary.start();
    let (_, pv) = p.vols();
    assert_ne!(
        pv["state"], "volume_changed",
        "accepted before the restart: {pv}"
    );
    assert_eq!(p.mirror_holds().0, before.0, "the mirror's image changed");
    p.mirror.start();
    p.wait_synced();
    let log = log_since(&p.primary, mark);
    assert!(
        log.contains("mode=Compare") && !log.contains("mode=Resume"),
        "the mirror must be compared after the accepted change, not resumed:\n{log}"
    );
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 11. How old the mirror's data is, and RPO unknown while there is no usable copy.
// ------------------------------------------------------------------------------------------

/// Tried: the primary's 64 MiB volume holds random data before the mirror has seen it; the
/// pair starts (initial copy) while the primary's status is polled; a client writes; the
/// primary stops for good; later a foreign primary (another disk, no state) knocks.
///
/// Expected: during the initial copy the primary's `lag_seconds` is null (a number once the
/// mirror is consistent). With the primary gone, the mirror's status shows `newest_write_at`
/// and `received_at` (RFC 3339) and a `data_age_seconds` that matches when the write was made
/// and keeps growing. The refused foreign primary shows `lag_seconds` null. The original
/// primary then resumes, byte-identical.
#[test]
fn data_age_is_shown_and_rpo_unknown_without_a_copy() {
    let mut p = Pair::new(PairOptions::default());
    std::fs::write(&p.primary_img, pseudo_random(p.size as usize, 1101)).unwrap();
    p.mirror.start();
    p.primary.start();
    let mut during_copy = Vec::new();
    let deadline = Instant::now() + LONG;
    loop {
        let pv = vol0(&p.primary.status());
        if !pv["initial_copy"].is_null() || pv["state"] == "resyncing" {
            during_copy.push(pv.clone());
        }
        if pv["state"] == "replicating" && pv["initial_copy"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "no initial copy: {pv}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !during_copy.is_empty(),
        "the initial copy was never seen running"
    );
    for v in &during_copy {
        assert!(v["lag_seconds"].is_null(), "RPO shown during the copy: {v}");
    }
    let (_, pv) = p.wait_synced();
    assert!(
        pv["lag_seconds"].is_number(),
        "RPO known once consistent: {pv}"
    );
    eprintln!(
        "data_age: {} status samples during the initial copy",
        during_copy.len()
    );

    let t_before = std::time::SystemTime::now();
    p.nbd_write(MIB, &pseudo_random(MIB as usize, 1102));
    let t_after = std::time::SystemTime::now();
    p.wait_synced();
    stop_ok(&mut p.primary);
    let (m1, _) = p.wait("mirror sees the primary gone", LONG, |m, _| {
        m["link"] == "down"
    });
    let q = std::time::SystemTime::now();
    let secs = |a: std::time::SystemTime, b: std::time::SystemTime| {
        a.duration_since(b).map_or(0.0, |d| d.as_secs_f64())
    };
    let age1 = m1["data_age_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no data_age_seconds: {m1}"));
    assert!(
        m1["newest_write_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 24)
            && m1["received_at"].is_string(),
        "the mirror should say when its newest write was made and received: {m1}"
    );
    // The write completed between t_before and t_after; the status was taken before q.
    assert!(
        age1 >= secs(t_before, t_after) - 1.0 && age1 <= secs(q, t_before) + 1.0,
        "data_age_seconds {age1} does not match the write made {:.1}-{:.1} s ago: {m1}",
        secs(q, t_after),
        secs(q, t_before)
    );
    std::thread::sleep(Duration::from_millis(1500));
    let m2 = vol0(&p.mirror.status());
    let age2 = m2["data_age_seconds"].as_f64().unwrap_or(0.0);
    assert!(
        age2 >= age1 + 1.0,
        "data_age_seconds does not grow: {age1} then {age2}"
    );
    assert_eq!(m2["newest_write_at"], m1["newest_write_at"], "{m2}");
    assert_status_exits_6(&p.mirror);

    // A foreign primary is refused: no RPO for it.
    let d = p.dir().to_path_buf();
    let mut f = p.primary_daemon(
        "primary F",
        &d.join("f.img"),
        &d.join("f-state"),
        &d.join("f.sock"),
        p.port,
        &[],
    );
    f.start();
    let v = wait_for("F refused", LONG, &[&p.mirror, &f], |v| {
        v[1]["state"] == "unrelated"
    });
    assert!(
        v[1]["lag_seconds"].is_null(),
        "RPO shown for a refused volume: {}",
        v[1]
    );
    assert!(
        v[0]["data_age_seconds"].as_f64().unwrap_or(0.0) >= age2,
        "a refused primary refreshed the mirror's age: {}",
        v[0]
    );
    stop_ok(&mut f);

    p.primary.start();
    p.wait_synced();
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 13. (Found while testing the cases above.) Many restarts with no write in between.
// ------------------------------------------------------------------------------------------

/// Tried: a pair replicates 1 MiB; then the primary is stopped cleanly and started again 34
/// times with no write in between (as a service manager restarting it, or a flapping link,
/// would: every start and every lost peer mints a generation, all at the same sequence
/// number, and a primary remembers 64); then a client writes.
///
/// Expected: every reconnection resumes or, once the generation of the mirror's data is
/// forgotten, compares (and resumes again after); the genuine primary is never refused (the
/// bug: it was refused for good as a "split brain" after 31 restarts); the mirror ends
/// byte-identical.
#[test]
fn idle_restarts_never_make_a_split_brain() {
    let mut p = Pair::running(PairOptions::default());
    p.nbd_write(0, &pseudo_random(MIB as usize, 1301));
    p.wait_synced();
    let mut modes = Vec::new();
    for i in 0..34 {
        stop_ok(&mut p.primary);
        let mark = p.primary.log().len();
        p.primary.start();
        let refused = ["refused", "split_brain", "unrelated"];
        let (_, pv) = p.wait(&format!("restart {i}: synced or refused"), LONG, |m, pv| {
            let done = pv["state"] == "replicating"
                && pv["lag_bytes"] == 0
                && m["consistent"] == true
                && m["applied_set"] == pv["acked_set"];
            done || refused.iter().any(|r| pv["state"] == *r)
        });
        assert_eq!(
            pv["state"], "replicating",
            "restart {i}: the genuine primary was refused: {pv}"
        );
        let log = log_since(&p.primary, mark);
        let mode = ["mode=Resume", "mode=Compare", "mode=FullCopy"]
            .into_iter()
            .find(|m| log.contains(m))
            .unwrap_or("?");
        modes.push(mode);
    }
    eprintln!("idle_restarts: decisions {modes:?}");
    assert!(
        modes
            .iter()
            .all(|m| *m == "mode=Resume" || *m == "mode=Compare"),
        "{modes:?}"
    );
    assert_eq!(
        modes.last(),
        Some(&"mode=Resume"),
        "after a comparison, restarts resume again: {modes:?}"
    );
    p.nbd_write(8 * MIB, &pseudo_random(MIB as usize, 1302));
    p.wait_synced();
    p.finish_and_compare();
}

// ------------------------------------------------------------------------------------------
// 14. A 64 MiB journal, full, with writes parked on it.
// ------------------------------------------------------------------------------------------

/// libnbd: four 32 MiB writes at argv[2] sent at once, then the client dies (SIGKILL) without
/// a word, its writes still parked on the full journal.
const NBD_PARK_AND_DIE: &str = r#"
import nbd, sys, os, time, signal
h = nbd.NBD()
h.connect_uri(sys.argv[1])
off = int(sys.argv[2])
for i in range(4):
    h.aio_pwrite(os.urandom(32 << 20), off)
t = time.time()
while time.time() - t < 2:
    h.poll(100)
os.kill(os.getpid(), signal.SIGKILL)
"#;

/// The primary's NBD connection threads still alive (`nbd-conn-N`).
fn nbd_conn_threads(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap_or_default();
        if comm.starts_with("nbd-conn") {
            names.push(comm.trim().to_string());
        }
    }
    names
}

/// Tried: `--journal-size 64M`; the mirror stops; a writer of 1 MiB pieces fills the journal
/// and waits (`journal_full` true); the primary gets SIGTERM while the writer's requests are
/// parked on the journal (not admitted: nothing of them reached the disk or the journal).
///
/// Expected: the stop is clean (exit 0, "journal closed cleanly"; a parked request is dropped,
/// not waited for: it would wait for the mirror); the restart says `last_stop=Clean`; the
/// mirror, started again, ends byte-identical. (Found: the parked requests kept their
/// connections busy, the shutdown gave up after 10 s, "NBD connections still busy at
/// shutdown", the journal was not closed and the restart said `last_stop=ProcessCrash`.)
#[test]
fn clean_stop_while_writes_wait_on_a_full_64m_journal() {
    let mut p = Pair::new(PairOptions {
        size: 256 * MIB,
        primary_extra: blocking_journal("64M"),
        ..Default::default()
    });
    p.mirror.start();
    p.primary.start();
    p.wait_consistent();
    stop_ok(&mut p.mirror);
    let mut w = p.writer(1401, 160 * MIB, MIB);
    p.wait("the journal is full", LONG, |_, pv| {
        pv["journal_full"] == true
    });
    assert!(w.is_running(), "the writer should wait for journal space");
    let mark = p.primary.log().len();
    stop_ok(&mut p.primary);
    let stop_log = log_since(&p.primary, mark);
    assert!(
        stop_log.contains("journal closed cleanly"),
        "the stop did not close the journal cleanly:\n{stop_log}"
    );
    let _ = w.wait();
    let mark = p.primary.log().len();
    p.primary.start();
    let log = log_since(&p.primary, mark);
    let open = log
        .lines()
        .find(|l| l.contains("journal open"))
        .unwrap_or_else(|| panic!("no journal open line:\n{log}"));
    assert!(open.contains("last_stop=Clean"), "{open}");
    p.mirror.start();
    p.wait_synced();
    p.finish_and_compare();
}

/// Tried: `--journal-size 64M`, the mirror stopped, the journal full; a client sends four
/// 32 MiB writes to one offset and is killed -9 while they are parked. Then the mirror starts
/// again, the pair catches up, and a 1 MiB write goes through.
///
/// Expected: once the journal has room the dead client's connection goes (its thread ends,
/// "client detached"), as the connections of dead clients with one parked write do. (Found:
/// "cannot send replies (Broken pipe); dropping the connection", then the connection's
/// thread, socket and slot stayed for good, after the mirror was back and later writes
/// acknowledged; each held up to 64 MiB of buffers while parked: 20 such clients took the
/// primary from 25 MB to 1.35 GB of RSS, and 256 would use up `--nbd-max-connections`.)
#[test]
fn a_dead_client_with_writes_parked_on_a_full_journal_is_released() {
    let mut p = Pair::new(PairOptions {
        size: 256 * MIB,
        primary_extra: blocking_journal("64M"),
        ..Default::default()
    });
    p.mirror.start();
    p.primary.start();
    p.wait_consistent();
    stop_ok(&mut p.mirror);
    // Fill the journal: one 32 MiB write fits, the next waits.
    let mut w = p.writer(1402, 64 * MIB, 32 * MIB);
    p.wait("the journal is full", LONG, |_, pv| {
        pv["journal_full"] == true
    });
    let uri = p.uri();
    let out = Command::new("/usr/bin/python3")
        .args(["-c", NBD_PARK_AND_DIE, &uri, &(128 * MIB).to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the client should have died");
    p.mirror.start();
    let status = w.wait();
    assert!(status.success(), "writer: {}", w.output());
    p.wait_synced();
    p.nbd_write(200 * MIB, &pseudo_random(MIB as usize, 1403));
    p.wait_synced();
    let pid = p.primary.pid().expect("primary running");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = nbd_conn_threads(pid);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections of dead clients still held 60 s after the journal had room: {left:?}\n{}",
            tail_lines(&p.primary.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p.finish_and_compare();
}

/// Tried: a real primary against a mirror that holds the pair's volume at another size, then
/// one that has no volume by that name.
///
/// Expected: each is refused for good: the primary's status says `refused` with the reason
/// (both sizes; the unknown name), no RPO, `status` exits 6, and the primary does not try
/// again by itself (no new refusal in the mirror's log for longer than a transient failure's
/// backoff); the mirror's volume is untouched. Once the mirror is fixed, `blkmirror retry`
/// makes the primary connect and the pair converges.
#[test]
fn a_size_or_name_the_mirror_does_not_have_is_refused_for_good() {
    let mut p = Pair::new(PairOptions::default());
    let mirror_img = p.mirror_img.display().to_string();
    let dir = p.dir().to_path_buf();
    let scratch = |name: &str| dir.join(name).display().to_string();
    let cases = [
        (
            format!("{VOL}={},size=65M", scratch("m65.img")),
            "primary has 67108864 bytes, mirror has 68157440",
            "size",
        ),
        (
            format!("other={},size=64M", scratch("other.img")),
            "no volume named",
            "name",
        ),
    ];
    // Each mirror of the test its own: a fresh state directory.
    let fresh_mirror_state = |dir: &Path| {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
    };
    for (spec, says, what) in cases {
        fresh_mirror_state(&p.mirror_state);
        p.mirror.drop_arg_with_value("--volume");
        p.mirror.push_args(&["--volume", &spec]);
        p.mirror.start();
        if !p.primary.is_running() {
            p.primary.start();
        } else {
            let (code, out, err) =
                cli(&["retry", "--control", p.primary.control.to_str().unwrap()]);
            assert_eq!(code, Some(0), "retry: {out}{err}");
        }
        let pv = wait_for(&format!("the {what} refused"), LONG, &[&p.primary], |v| {
            v[0]["state"] == "refused"
                && v[0]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(says))
        })[0]
            .clone();
        assert_eq!(pv["link"], "down", "{pv}");
        assert!(pv["lag_seconds"].is_null(), "no RPO while refused: {pv}");
        assert_status_exits_6(&p.primary);
        let refusals = p.mirror.log().matches(says).count();
        assert!(
            refusals >= 1,
            "the mirror's log says why: {}",
            tail_lines(&p.mirror.log(), 20)
        );
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(
            p.mirror.log().matches(says).count(),
            refusals,
            "{what}: a permanent refusal is retried without an admin"
        );
        stop_ok(&mut p.mirror);
    }
    // The mirror as it should be: after `retry` the pair replicates and converges.
    fresh_mirror_state(&p.mirror_state);
    p.mirror.drop_arg_with_value("--volume");
    p.mirror
        .push_args(&["--volume", &format!("{VOL}={mirror_img},size=64M")]);
    p.mirror.start();
    let (code, out, err) = cli(&["retry", "--control", p.primary.control.to_str().unwrap()]);
    assert_eq!(code, Some(0), "retry: {out}{err}");
    p.nbd_write(MIB, &pseudo_random(MIB as usize, 301));
    p.wait_synced();
    p.finish_and_compare();
}
