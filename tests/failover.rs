//! Roles that change without a restart (docs/FAILOVER.md), with real processes: a planned
//! switchover under a running write workload and back, the commands' "already" and wrong-state
//! answers and exit codes, and a daemon started on a state directory of the other role.
//!
//! No timed assertions: every wait is for a condition, with a generous timeout.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running pair whose mirror can be promoted (it has an NBD socket to serve on).
fn switchable_pair() -> (Pair, PathBuf) {
    let mut p = Pair::new(PairOptions::default());
    let sock = p.dir().join("mirror-nbd.sock");
    p.mirror.push_args(&["--nbd-unix", sock.to_str().unwrap()]);
    p.mirror.start();
    p.primary.start();
    p.wait_consistent();
    (p, sock)
}

/// `blkmirror ARGS --json`: (exit code, the JSON printed, stderr).
fn json_cmd(args: &[&str]) -> (i32, Value, String) {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = cli(&all);
    let v = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    (code.expect("exited"), v, err)
}

fn demote(control: &Path) -> (i32, Value, String) {
    json_cmd(&[
        "demote",
        "--control",
        control.to_str().unwrap(),
        "--timeout",
        "60",
    ])
}

fn promote(control: &Path, extra: &[&str]) -> (i32, Value, String) {
    let mut a = vec!["promote", "--control", control.to_str().unwrap()];
    a.extend_from_slice(extra);
    json_cmd(&a)
}

/// tools/workload.py writing seqs `start..=end` of plan `seed` through `sock`, a FLUSH after
/// every write, its acknowledged point logged to `log`.
fn workload(p: &Pair, sock: &Path, seed: u64, start: u64, end: u64, log: &Path) -> Background {
    let mut c = Command::new("/usr/bin/python3");
    c.arg(tool("workload.py"))
        .args(["--uri", &uri_of(sock)])
        .args(["--seed", &seed.to_string()])
        .args(["--writes", &end.to_string()])
        .args(["--start-seq", &start.to_string()])
        .args(["--blocks", &BLOCKS.to_string()])
        .args(["--block-size", &BLOCK.to_string()])
        .args(["--flush-every", "1"])
        .args(["--log", log.to_str().unwrap()]);
    Background::spawn(
        &format!("workload seqs {start}..={end}"),
        c,
        &p.dir().join(format!("workload-{start}.out")),
    )
}

/// The last write the workload's log says was acknowledged (0: none).
fn acknowledged(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["flushed_upto"].as_u64())
        .max()
        .unwrap_or(0)
}

/// tools/crashcheck.py: the image is the state after writes 1..=P of plan `seed` for some P
/// of at least `min_seq`; returns P.
fn prefix_of(image: &Path, seed: u64, writes: u64, min_seq: u64) -> u64 {
    let o = run_output(
        "/usr/bin/python3",
        &[
            tool("crashcheck.py").to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--seed",
            &seed.to_string(),
            "--writes",
            &writes.to_string(),
            "--blocks",
            &BLOCKS.to_string(),
            "--min-seq",
            &min_seq.to_string(),
        ],
        None,
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && out.starts_with("OK"),
        "{} is not a prefix state of at least seq {min_seq}: {out}{}",
        image.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("prefix="))
        .and_then(|p| p.parse().ok())
        .expect("crashcheck prints prefix=")
}

/// Wait until daemon `d`'s volume is `role` (`primary`, `secondary`) and replicating; its
/// status then.
fn wait_role(d: &Daemon, role: &str) -> Value {
    let v = wait_for(
        &format!("{} running as {role}, replicating", d.label),
        LONG,
        &[d],
        |v| v[0]["role"] == role && v[0]["state"] == "replicating",
    );
    v[0].clone()
}

/// Stop both daemons (exit 0 each), and return the one image both volumes hold, asserting
/// they are byte-identical (`when` names the moment for the message).
fn identical_images(p: &mut Pair, when: &str) -> Vec<u8> {
    p.stop_both();
    let (a, b) = (
        std::fs::read(&p.primary_img).unwrap(),
        std::fs::read(&p.mirror_img).unwrap(),
    );
    assert!(a == b, "the two images differ {when}");
    a
}

/// Every byte of MiB `mib` of `image` is `byte`.
fn mib_is(image: &[u8], mib: u64, byte: u8) -> bool {
    image[(mib * MIB) as usize..((mib + 1) * MIB) as usize]
        .iter()
        .all(|&b| b == byte)
}

/// After a failover, the old primary a secondary of the promoted safe: once it holds every
/// write, a planned switchover brings the roles back (`demote` on the safe, `promote` on
/// the old primary, which serves on its NBD socket again).
fn switch_back(p: &mut Pair) {
    wait_for(
        "the old primary to hold every write",
        LONG,
        &[&p.primary, &p.mirror],
        |v| synced(&v[0], &v[1]),
    );
    let (code, v, err) = demote(&p.mirror.control.clone());
    assert_eq!(code, 0, "demote: {v} {err}");
    p.primary.nbd_socket = Some(p.nbd_sock.clone());
    let (code, v, err) = promote(&p.primary.control.clone(), &[]);
    assert_eq!(code, 0, "promote back: {v} {err}");
}

/// `blkmirror divergent --state-dir STATE --json` (exit 0): what it lists.
fn divergent_json(state: &Path) -> Value {
    let (code, out, err) = cli(&[
        "divergent",
        "--state-dir",
        state.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0), "{out} {err}");
    serde_json::from_str(out.trim()).unwrap()
}

/// Wait until the primary behind `control` holds its clients back for a split brain.
fn wait_split_brain_held(control: &Path) {
    wait_for("the old primary to say split brain", LONG, &[], |_| {
        query_status(control).is_some_and(|d| {
            d["not_serving_why"]
                .as_str()
                .is_some_and(|w| w.contains("split brain"))
        })
    });
}

/// A planned switchover under a running workload loses nothing and copies nothing: `demote`
/// returns once the mirror holds every write (the workload's acknowledged writes are all in
/// the new primary's image, which is exactly a prefix state), the mirror is promoted, the
/// replication reverses and resumes without a copy or comparison; writes go on at the new
/// primary, and a second switchover brings the roles back. Both images are identical at the
/// end. Each command asked twice answers "already" with exit 0.
#[test]
fn a_planned_switchover_under_load_loses_and_copies_nothing_and_switches_back() {
    let (mut p, mirror_sock) = switchable_pair();
    let (pc, mc) = (p.primary.control.clone(), p.mirror.control.clone());
    let seed = 15;
    let log1 = p.dir().join("load1.log");
    let mut load = workload(&p, &p.nbd_sock.clone(), seed, 1, 1_000_000, &log1);
    wait_for("the workload to have written 300 writes", LONG, &[], |_| {
        acknowledged(&log1) >= 300
    });
    let (code, v, err) = demote(&pc);
    assert_eq!(code, 0, "demote: {v} {err}");
    assert_eq!(v["result"], "demoted", "{v}");
    assert_eq!(v["role"], "secondary", "{v}");
    // Its exports are closed: the workload's connection ends with an error.
    let _ = load.wait();
    let acked = acknowledged(&log1);
    assert!(acked >= 300, "{acked}");
    // Asked again: already.
    let (code, v, _) = demote(&pc);
    assert_eq!((code, v["result"].as_str()), (0, Some("already")), "{v}");
    let (code, v, err) = promote(&mc, &[]);
    assert_eq!(code, 0, "promote: {v} {err}");
    assert_eq!(v["result"], "promoted", "{v}");
    let (code, v, _) = promote(&mc, &[]);
    assert_eq!((code, v["result"].as_str()), (0, Some("already")), "{v}");
    // The new primary holds every acknowledged write, as an exact prefix state; the reverse
    // direction resumes (no copy, no comparison).
    let first = prefix_of(&p.mirror_img, seed, 1_000_000, acked);
    let np = wait_role(&p.mirror, "primary");
    let op = wait_role(&p.primary, "secondary");
    assert_eq!(np["last_decision"], "same data: resuming", "{np}");
    assert!(np["initial_copy"].is_null(), "{np}");
    assert_eq!(np["peer_role"], "secondary", "{np}");
    assert_eq!(op["consistent"], true, "{op}");
    assert_eq!(op["disk_state"], "UpToDate", "{op}");
    // Writes go on at the new primary and reach the old one.
    let log2 = p.dir().join("load2.log");
    let mut load = workload(&p, &mirror_sock, seed, first + 1, first + 400, &log2);
    load.wait_success();
    let end = first + 400;
    wait_for(
        "the old primary to hold the new writes",
        LONG,
        &[&p.primary, &p.mirror],
        |v| synced(&v[0], &v[1]),
    );
    // And back.
    let (code, v, err) = demote(&mc);
    assert_eq!(code, 0, "demote back: {v} {err}");
    let (code, v, err) = promote(&pc, &[]);
    assert_eq!(code, 0, "promote back: {v} {err}");
    assert_eq!(prefix_of(&p.primary_img, seed, end, end), end);
    wait_role(&p.primary, "primary");
    wait_role(&p.mirror, "secondary");
    identical_images(&mut p, "after switching back");
}

/// Wrong states get a distinct exit code (9) and a sentence saying why: promoting a mirror
/// whose primary is connected; demoting a primary that replicates to nobody. A daemon started
/// on a state directory of the other role refuses, naming promote and demote.
#[test]
fn wrong_states_are_refused_with_exit_9_and_the_reason() {
    let (mut p, _sock) = switchable_pair();
    let (code, v, err) = promote(&p.mirror.control.clone(), &[]);
    assert_eq!(code, 9, "{v} {err}");
    assert!(err.contains("demote it first"), "{err}");
    let (code, v, err) = promote(&p.mirror.control.clone(), &["--force"]);
    assert_eq!(code, 9, "--force is for a primary that is gone: {v} {err}");
    p.stop_both();
    // A primary started on the mirror's state directory.
    let (code, _, err) = cli(&[
        "primary",
        "--volume",
        &format!("{VOL}={}", p.mirror_img.display()),
        "--nbd-unix",
        p.dir().join("x.sock").to_str().unwrap(),
        "--state-dir",
        p.mirror_state.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(9), "{err}");
    assert!(err.contains("blkmirror promote"), "{err}");
    // A standalone primary has nobody to hand over to.
    let state = p.dir().join("alone");
    let sock = p.dir().join("alone.sock");
    let mut alone = Daemon::new(
        "standalone primary",
        vec![
            "primary".into(),
            "--volume".into(),
            format!("v={},size=16M", p.dir().join("alone.img").display()).into(),
            "--nbd-unix".into(),
            sock.clone().into(),
            "--state-dir".into(),
            state.clone().into(),
        ],
        p.dir().join("alone.log"),
        state.join("control.sock"),
        Some(sock),
    );
    alone.start();
    let (code, v, err) = demote(&alone.control.clone());
    assert_eq!(code, 9, "{v} {err}");
    assert!(err.contains("nobody to take over"), "{err}");
    // Nor anybody to give its writes up for: refused, and it goes on serving.
    let (code, v, err) = json_cmd(&[
        "resolve",
        "--control",
        alone.control.to_str().unwrap(),
        "--discard-local",
    ]);
    assert_eq!(code, 9, "{v} {err}");
    assert!(err.contains("no peer"), "{err}");
    let wrote = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 1M"])
        .arg(format!(
            "nbd+unix:///v?socket={}",
            p.dir().join("alone.sock").display()
        ))
        .output()
        .unwrap();
    assert!(wrote.status.success(), "{wrote:?}");
    stop_ok(&mut alone);
}

/// `qemu-io` writes `len` bytes of `pattern` at `offset` through `sock`; whether it succeeded.
fn qemu_write(sock: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -P {pattern} {offset} {len}"))
        .arg(uri_of(sock))
        .output()
        .expect("qemu-io runs")
        .status
        .success()
}

/// Disaster and failback: the safe goes away and the primary writes on (a tail the safe never
/// gets), then the primary is killed. The safe is promoted with --force (its answer says how
/// many seconds of writes may be lost) and takes writes at once. The old primary, started
/// again with its own command line, asks its peer first: the peer was promoted from its data,
/// so it never serves; it saves its tail (listed, and served over NBD by `blkmirror
/// divergent`), becomes the new primary's secondary, and the resync sends only the regions
/// changed on either side (far below the volume's size). A planned switchover then brings the
/// roles back; both images are identical, the old tail replaced by the new primary's data.
#[test]
fn after_a_disaster_the_old_primary_fails_back_saving_its_tail_and_resyncing_only_the_difference() {
    let (mut p, mirror_sock) = switchable_pair();
    let mc = p.mirror.control.clone();
    assert!(qemu_write(&p.nbd_sock.clone(), 0x11, 0, 4 * MIB));
    p.wait_synced();
    stop_ok(&mut p.mirror);
    assert!(
        qemu_write(&p.nbd_sock.clone(), 0x55, 8 * MIB, MIB),
        "the primary writes on while the safe is away"
    );
    p.primary.kill9();
    p.mirror.start();
    let (code, v, err) = promote(&mc, &["--force"]);
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!(v["force"], true, "{v}");
    assert!(v["volumes"][0]["rpo_seconds"].is_number(), "{v}");
    assert!(
        qemu_write(&mirror_sock, 0x22, 4 * MIB, MIB),
        "the promoted side serves at once"
    );
    // The old primary comes back: it never serves, and becomes the secondary.
    p.primary.nbd_socket = None; // it will not serve: do not wait for its socket
    p.primary.start();
    assert!(
        !qemu_write(&p.nbd_sock.clone(), 0x33, 0, MIB),
        "the old primary took a write while its peer was promoted"
    );
    let op = wait_role(&p.primary, "secondary");
    assert_eq!(op["consistent"], true, "{op}");
    let np = wait_role(&p.mirror, "primary");
    assert_eq!(np["peer_role"], "secondary", "{np}");
    assert!(
        np["taken_over_bytes"].as_u64().unwrap() >= MIB,
        "the old primary's tail is resynced: {np}"
    );
    let wire = np["wire_bytes"].as_u64().unwrap();
    assert!(
        wire < 8 * MIB,
        "only the difference crosses the link ({wire} bytes for a 64 MiB volume): {np}"
    );
    // The tail is saved, listed, and served read-only.
    let saved = divergent_json(&p.primary_state);
    let saved = &saved["saved"];
    assert_eq!(saved.as_array().unwrap().len(), 1, "{saved}");
    assert_eq!(saved[0]["why"], "failback", "{saved}");
    assert!(saved[0]["bytes"].as_u64().unwrap() >= MIB, "{saved}");
    let id = saved[0]["id"].as_str().unwrap().to_string();
    let export_sock = p.dir().join("divergent.sock");
    let mut c = Command::new(BIN);
    c.args(["divergent", "--state-dir"])
        .arg(&p.primary_state)
        .args(["--export", &id, "--nbd-unix"])
        .arg(&export_sock);
    let mut export = Background::spawn("divergent export", c, &p.dir().join("divergent.out"));
    wait_for("the divergent export to serve", LONG, &[], |_| {
        probe(&export_sock).is_ok()
    });
    let read = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            &format!("read -P 0x55 {} {MIB}", 8 * MIB),
        ])
        .arg(uri_of(&export_sock))
        .output()
        .unwrap();
    assert!(
        read.status.success() && !String::from_utf8_lossy(&read.stdout).contains("mismatch"),
        "the saved tail holds the old primary's writes: {}",
        String::from_utf8_lossy(&read.stdout)
    );
    let pid = nix::unistd::Pid::from_raw(export.child_for_test().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(export.wait().success(), "{}", export.output());
    // The new primary goes on; then a planned switchover brings the roles back.
    assert!(qemu_write(&mirror_sock, 0x44, 5 * MIB, MIB));
    switch_back(&mut p);
    assert!(qemu_write(&p.nbd_sock.clone(), 0x66, 12 * MIB, MIB));
    wait_role(&p.primary, "primary");
    wait_role(&p.mirror, "secondary");
    wait_for(
        "the mirror to hold the last write",
        LONG,
        &[&p.mirror, &p.primary],
        |v| synced(&v[0], &v[1]),
    );
    let a = identical_images(&mut p, "after failing back");
    assert!(mib_is(&a, 0, 0x11));
    assert!(mib_is(&a, 4, 0x22));
    assert!(mib_is(&a, 5, 0x44));
    assert!(
        mib_is(&a, 8, 0),
        "the given-up tail is the new primary's data"
    );
    assert!(mib_is(&a, 12, 0x66));
    if std::env::var("SHOW_LOGS").is_ok() {
        eprintln!("{}", std::fs::read_to_string(&p.primary.log_path).unwrap());
        eprintln!(
            "=====\n{}",
            std::fs::read_to_string(&p.mirror.log_path).unwrap()
        );
    }
}

/// The disaster of issue 15 with a real file system: ext4 made and filled through nbdfuse +
/// loop on the primary's volume, a writer creating and fsyncing files on it when the primary
/// is killed (kill -9); the safe promoted with --force, its file system mounted (its journal
/// replays: a crash state) and written; the old primary started again: it never serves, saves
/// its tail, becomes the secondary with far less than the volume on the wire; a planned
/// switchover back, and the old primary's volume holds the safe's file system: fsck clean,
/// the files written before the disaster and the one written at the safe.
#[test]
fn a_disaster_under_a_file_system_fails_back_to_the_safes_file_system() {
    let (mut p, mirror_sock) = switchable_pair();
    let mc = p.mirror.control.clone();
    let mnt = p.dir().join("mnt");
    let fuse_dir = p.dir().join("fuse");
    let base: Vec<Vec<u8>> = (0..6)
        .map(|i| pseudo_random(MIB as usize, 300 + i))
        .collect();
    {
        let fuse = FuseFile::start(&fuse_dir, &p.uri());
        let lo = LoopDev::attach(&fuse.file());
        run("mkfs.ext4", &["-q", "-F", &lo.dev]);
        let m = Mount::at(&lo.dev, &mnt);
        for (i, data) in base.iter().enumerate() {
            std::fs::write(mnt.join(format!("base{i}")), data).unwrap();
        }
        run("sync", &[]);
        m.umount();
    }
    p.wait_synced();
    // A writer on the primary's file system when the primary is killed.
    {
        let fuse = FuseFile::start(&fuse_dir, &p.uri());
        let lo = LoopDev::attach(&fuse.file());
        let m = Mount::at(&lo.dev, &mnt);
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(format!(
            "i=0; while [ $i -lt 100000 ]; do dd if=/dev/urandom of={}/w$((i % 16)) bs=64k \
             count=2 conv=fsync status=none || exit 0; echo $i; i=$((i+1)); done",
            mnt.display()
        ));
        let out = p.dir().join("writer.out");
        let mut writer = Background::spawn("file writer", sh, &out);
        let written = || {
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .count()
        };
        wait_for("the writer to have written files", LONG, &[], |_| {
            written() >= 10
        });
        // The safe goes away first (its link, its site): the primary writes on, a tail the
        // safe never gets; then the primary's host is lost.
        stop_ok(&mut p.mirror);
        let before = written();
        wait_for("the writer to write on", LONG, &[], |_| {
            written() >= before + 10
        });
        p.primary.kill9();
        let _ = writer.child_for_test().kill();
        writer.wait();
        // The primary's mount is on a dead server: torn down (lazily).
        drop(m);
        drop(lo);
        drop(fuse);
    }
    // The safe's site is back, without its primary.
    p.mirror.start();
    let (code, v, err) = promote(&mc, &["--force"]);
    assert_eq!(code, 0, "{v} {err}");
    let from_safe = pseudo_random(3 * MIB as usize / 2, 399);
    {
        let fuse = FuseFile::start(&p.dir().join("fuse-safe"), &uri_of(&mirror_sock));
        let lo = LoopDev::attach(&fuse.file());
        let m = Mount::at(&lo.dev, &p.dir().join("mnt-safe"));
        for (i, data) in base.iter().enumerate() {
            assert!(
                std::fs::read(m.dir.join(format!("base{i}"))).unwrap() == *data,
                "base{i} at the safe"
            );
        }
        std::fs::write(m.dir.join("from-safe"), &from_safe).unwrap();
        run("sync", &[]);
        m.umount();
    }
    // The old primary comes back: it fails back.
    p.primary.nbd_socket = None;
    p.primary.start();
    wait_role(&p.primary, "secondary");
    let np = wait_for(
        "the old primary to hold the safe's data",
        LONG,
        &[&p.primary, &p.mirror],
        |v| synced(&v[0], &v[1]),
    );
    let np = &np[1];
    assert!(np["taken_over_bytes"].as_u64().unwrap() > 0, "{np}");
    let wire = np["wire_bytes"].as_u64().unwrap();
    assert!(
        wire < 32 * MIB,
        "{wire} bytes on the wire for a 64 MiB volume: {np}"
    );
    let saved = divergent_json(&p.primary_state);
    assert!(saved["saved"][0]["bytes"].as_u64().unwrap() > 0, "{saved}");
    eprintln!(
        "failback under ext4: {wire} bytes on the wire, {} taken over, {} saved",
        np["taken_over_bytes"], saved["saved"][0]["bytes"]
    );
    // And back: the old primary serves the safe's file system.
    switch_back(&mut p);
    {
        // A fresh FUSE mount point: the one over the killed primary was torn down lazily.
        let fuse = FuseFile::start(&p.dir().join("fuse-back"), &p.uri());
        let lo = LoopDev::attach(&fuse.file());
        let fsck = run_output("e2fsck", &["-fn", &lo.dev], None);
        assert!(
            fsck.status.success(),
            "e2fsck -fn on the old primary's volume ({}):\n{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout)
        );
        let m = Mount::at(&lo.dev, &p.dir().join("mnt-back"));
        assert!(std::fs::read(m.dir.join("from-safe")).unwrap() == from_safe);
        for (i, data) in base.iter().enumerate() {
            assert!(std::fs::read(m.dir.join(format!("base{i}"))).unwrap() == *data);
        }
        m.umount();
    }
    wait_role(&p.mirror, "secondary");
    p.stop_both();
    assert!(
        std::fs::read(&p.primary_img).unwrap() == std::fs::read(&p.mirror_img).unwrap(),
        "the two images differ after failing back"
    );
}

/// `blkmirror resolve --control CONTROL --discard-local --json`.
fn resolve(control: &Path) -> (i32, Value, String) {
    json_cmd(&[
        "resolve",
        "--control",
        control.to_str().unwrap(),
        "--discard-local",
    ])
}

/// A split brain made on purpose: both sides took writes as primaries and met. The pair
/// synced 0x11 at MiB 0..4; then the old primary wrote 0x55 at MiB 8 while the safe was
/// away, the safe was promoted (--force) and wrote 0x22 at MiB 4, and the old primary,
/// started while the safe was away, served and wrote 0x77 at MiB 10. Both now see the other
/// as a primary and serve.
fn split_brain_pair() -> (Pair, PathBuf) {
    let (mut p, mirror_sock) = served_beside_a_promoted_safe();
    // They meet: refused both ways, both go on serving.
    p.mirror.nbd_socket = Some(mirror_sock.clone());
    p.mirror.start();
    wait_for(
        "both sides to see the other as a primary",
        LONG,
        &[&p.primary, &p.mirror],
        |v| v[0]["state"] == "both_primary" && v[1]["peer_role"] == "primary",
    );
    (p, mirror_sock)
}

/// The first part of [`split_brain_pair`]: up to the old primary serving (and writing 0x77
/// at MiB 10) while the promoted safe is stopped; they have not met.
fn served_beside_a_promoted_safe() -> (Pair, PathBuf) {
    let (mut p, mirror_sock) = switchable_pair();
    let mc = p.mirror.control.clone();
    assert!(qemu_write(&p.nbd_sock.clone(), 0x11, 0, 4 * MIB));
    p.wait_synced();
    stop_ok(&mut p.mirror);
    assert!(qemu_write(&p.nbd_sock.clone(), 0x55, 8 * MIB, MIB));
    stop_ok(&mut p.primary);
    p.mirror.start();
    let (code, v, err) = promote(&mc, &["--force"]);
    assert_eq!(code, 0, "{v} {err}");
    assert!(qemu_write(&mirror_sock, 0x22, 4 * MIB, MIB));
    stop_ok(&mut p.mirror);
    // The old primary starts with its peer away: it serves after its check.
    p.primary.nbd_socket = None;
    p.primary.start();
    wait_for("the old primary to serve, its peer away", LONG, &[], |_| {
        p.primary.status().is_some_and(|d| d["serving"] == true)
    });
    assert!(qemu_write(&p.nbd_sock.clone(), 0x77, 10 * MIB, MIB));
    (p, mirror_sock)
}

/// An old primary that served its clients without its peer's word (started while the safe
/// was away, `--peer-unreachable serve`) and stopped before ever meeting the promoted safe
/// does not fail back when it meets it later: its writes were its clients', made knowingly
/// as a primary, not a tail. It holds its clients back and says split brain; its data stays.
#[test]
fn an_old_primary_that_served_without_its_peers_word_does_not_fail_back_on_its_own() {
    let (mut p, mirror_sock) = served_beside_a_promoted_safe();
    let pc = p.primary.control.clone();
    stop_ok(&mut p.primary);
    p.mirror.nbd_socket = Some(mirror_sock.clone());
    p.mirror.start();
    p.primary.start();
    wait_split_brain_held(&pc);
    let d = query_status(&pc).unwrap();
    assert_eq!(d["volumes"][0]["role"], "primary", "{d}");
    assert!(!qemu_write(&p.nbd_sock.clone(), 0x78, 0, MIB));
    p.stop_both();
    let old = std::fs::read(&p.primary_img).unwrap();
    assert!(
        old[(10 * MIB) as usize..(11 * MIB) as usize]
            .iter()
            .all(|&b| b == 0x77),
        "its clients' write is still on its volume"
    );
}

/// A side that gave its writes up (resolve) is promoted with --force before its peer's data
/// reached it (the peer went away: what two resolves at once also leave): it serves the data
/// it holds, its given-up writes included, and resyncs those to the peer with its own
/// changes, so the pair converges on its data byte for byte (never an UpToDate peer that
/// lacks them); the peer, a primary that served in the split brain, is resolved in turn and
/// its writes saved.
#[test]
fn a_side_promoted_before_taking_its_peers_data_resyncs_the_writes_it_had_given_up() {
    let (mut p, mirror_sock) = split_brain_pair();
    let (pc, mc) = (p.primary.control.clone(), p.mirror.control.clone());
    stop_ok(&mut p.primary);
    let (code, v, err) = resolve(&mc);
    assert_eq!(
        code, 0,
        "resolve with the peer's word from seconds ago: {v} {err}"
    );
    wait_for(
        "the resolved side to hold its old data",
        LONG,
        &[&p.mirror],
        |v| v[0]["role"] == "secondary" && v[0]["disk_state"] == "Outdated",
    );
    let (code, v, err) = promote(&mc, &[]);
    assert_eq!(
        code, 9,
        "holding writes it gave up, only --force: {v} {err}"
    );
    let (code, v, err) = promote(&mc, &["--force"]);
    assert_eq!(code, 0, "{v} {err}");
    assert!(qemu_write(&mirror_sock, 0x33, 12 * MIB, MIB));
    // The old primary is back: a split brain it saw while serving, resolved by the admin.
    p.primary.start();
    wait_split_brain_held(&pc);
    let (code, v, err) = resolve(&pc);
    assert_eq!(code, 0, "{v} {err}");
    wait_for(
        "the pair to converge on the promoted side's data",
        LONG,
        &[&p.primary, &p.mirror],
        |v| synced(&v[0], &v[1]),
    );
    let x = identical_images(&mut p, "at the end");
    assert!(mib_is(&x, 0, 0x11), "the data both held");
    assert!(
        mib_is(&x, 4, 0x22),
        "the write the promoted side had given up, then kept"
    );
    assert!(mib_is(&x, 12, 0x33), "its write since");
    assert!(
        mib_is(&x, 8, 0) && mib_is(&x, 10, 0),
        "the other side's writes, given up (saved)"
    );
    let saved = divergent_json(&p.primary_state);
    assert!(
        saved["saved"][0]["bytes"].as_u64().unwrap() >= 2 * MIB,
        "{saved}"
    );
}

/// Split brain on purpose: the safe is promoted while the old primary is down, then the old
/// primary starts while the safe is away and serves (`--peer-unreachable serve`, the
/// default): both take writes. Once they meet, each refuses the other (`both_primary`) and
/// both keep serving. `resolve --discard-local` on the side the admin names (here the
/// promoted one) saves its writes, makes it the other's secondary, and the pair converges on
/// the kept side's data; asked again it says "already"; asked on a primary whose peer is a
/// secondary it is refused (exit 9).
#[test]
fn a_split_brain_is_refused_and_resolve_keeps_the_named_sides_data_saving_the_other() {
    let (mut p, mirror_sock) = split_brain_pair();
    let (pc, mc) = (p.primary.control.clone(), p.mirror.control.clone());
    assert!(qemu_write(&mirror_sock, 0x23, 6 * MIB, MIB));
    assert!(qemu_write(&p.nbd_sock.clone(), 0x78, 11 * MIB, MIB));
    // A restart of the old primary does not settle it on its own (its writes since are its
    // clients', not a tail): it stays a primary, holding its clients back, and says why.
    stop_ok(&mut p.primary);
    p.primary.start();
    wait_split_brain_held(&pc);
    assert_eq!(query_status(&pc).unwrap()["volumes"][0]["role"], "primary");
    // The peer gone quiet: nothing is given up on what it said a while ago.
    stop_ok(&mut p.mirror);
    std::thread::sleep(std::time::Duration::from_secs(16));
    let (code, v, err) = resolve(&pc);
    assert_eq!(code, 9, "resolve with the peer gone: {v} {err}");
    assert!(err.contains("not known to be a primary now"), "{err}");
    p.mirror.start();
    wait_for(
        "both sides to see the other as a primary again",
        LONG,
        &[&p.primary, &p.mirror],
        |v| v[0]["state"] == "both_primary" && v[1]["peer_role"] == "primary",
    );
    // The admin keeps the old primary's data: the promoted side gives its writes up.
    let (code, v, err) = resolve(&mc);
    assert_eq!(code, 0, "resolve: {v} {err}");
    assert_eq!(v["result"], "resolved", "{v}");
    assert_eq!(v["role"], "secondary", "{v}");
    assert!(
        v["volumes"][0]["saved_bytes"].as_u64().unwrap() >= 2 * MIB,
        "{v}"
    );
    let (code, v, _) = resolve(&mc);
    assert_eq!((code, v["result"].as_str()), (0, Some("already")), "{v}");
    let kept = wait_role(&p.primary, "primary");
    assert!(
        kept["taken_over_bytes"].as_u64().unwrap() >= 2 * MIB,
        "{kept}"
    );
    assert!(kept["wire_bytes"].as_u64().unwrap() < 16 * MIB, "{kept}");
    let (code, v, _) = resolve(&pc);
    assert_eq!(
        code, 9,
        "resolve on a primary whose peer is a secondary: {v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("not known to be a primary"),
        "{v}"
    );
    wait_for(
        "the pair to converge",
        LONG,
        &[&p.mirror, &p.primary],
        |v| synced(&v[0], &v[1]),
    );
    let saved = divergent_json(&p.mirror_state);
    assert_eq!(
        saved["saved"][0]["why"], "resolve --discard-local",
        "{saved}"
    );
    let image = std::fs::read(
        p.mirror_state
            .join("divergent")
            .join(saved["saved"][0]["id"].as_str().unwrap())
            .join("vol1.img"),
    )
    .unwrap();
    assert!(
        mib_is(&image, 4, 0x22) && mib_is(&image, 6, 0x23),
        "the given-up writes are saved"
    );
    let a = identical_images(&mut p, "after resolving");
    for (at, byte) in [(0, 0x11), (4, 0), (6, 0), (8, 0x55), (10, 0x77), (11, 0x78)] {
        assert!(mib_is(&a, at, byte), "MiB {at} should hold {byte:#x}");
    }
}

/// `--peer-unreachable wait`: a primary that replicated before, started while its peer is
/// away, serves nobody until the peer answers or the admin says so (`promote --force`, which
/// then answers "serving"); plain `promote` says why not (exit 9).
#[test]
fn a_primary_told_to_wait_for_its_peer_serves_only_when_the_admin_says() {
    let (mut p, _sock) = switchable_pair();
    assert!(qemu_write(&p.nbd_sock.clone(), 0x11, 0, MIB));
    p.wait_synced();
    stop_ok(&mut p.primary);
    stop_ok(&mut p.mirror);
    p.primary.push_args(&["--peer-unreachable", "wait"]);
    let sock = p.nbd_sock.clone();
    p.primary.nbd_socket = None;
    p.primary.start();
    let control = p.primary.control.clone();
    // Past the 5 s any answer would take: still waiting.
    wait_for(
        "the primary to say it waits for its peer",
        LONG,
        &[],
        |_| {
            query_status(&control).is_some_and(|d| {
                d["not_serving_why"]
                    .as_str()
                    .is_some_and(|w| w.contains("--peer-unreachable wait"))
            })
        },
    );
    assert!(
        !qemu_write(&sock, 0x22, 0, MIB),
        "served before its peer answered"
    );
    // A demotion that cannot happen (no peer to hold the writes) leaves it as it was: still
    // waiting, not serving.
    let (code, v, err) = json_cmd(&[
        "demote",
        "--control",
        control.to_str().unwrap(),
        "--timeout",
        "2",
    ]);
    assert_eq!(code, 10, "{v} {err}");
    // Past its 5 s check again: it says it waits, as before.
    wait_for("the primary to wait for its peer again", LONG, &[], |_| {
        query_status(&control).is_some_and(|d| {
            d["role"] == "primary"
                && d["not_serving_why"]
                    .as_str()
                    .is_some_and(|w| w.contains("--peer-unreachable wait"))
        })
    });
    let d = query_status(&control).expect("status");
    assert_eq!(d["serving"], false, "a failed demotion made it serve: {d}");
    assert!(
        !qemu_write(&sock, 0x22, 0, MIB),
        "served after a failed demotion while its peer never answered"
    );
    let (code, v, err) = promote(&control, &[]);
    assert_eq!(code, 9, "{v} {err}");
    let (code, v, err) = promote(&control, &["--force"]);
    assert_eq!(
        (code, v["result"].as_str()),
        (0, Some("serving")),
        "{v} {err}"
    );
    wait_for("the primary to serve", LONG, &[], |_| {
        query_status(&control).is_some_and(|d| d["serving"] == true)
    });
    assert!(qemu_write(&sock, 0x22, 0, MIB));
    stop_ok(&mut p.primary);
}

/// `blkmirror events`: a script waits on a line instead of polling. `--now` prints a line per
/// item as it is and exits 0; followed through a switchover, the new primary's events say its
/// role changed to primary and its peer became a secondary; when the daemon stops, a last
/// `gone` line and exit 4.
#[test]
fn events_follow_a_switchover_line_by_line() {
    let (mut p, _sock) = switchable_pair();
    let mc = p.mirror.control.clone();
    let (code, out, err) = cli(&["events", "--control", mc.to_str().unwrap(), "--now"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(lines.iter().all(|l| l["type"] == "exists"), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l["key"] == "role" && l["volume"] == VOL && l["value"] == "secondary"),
        "{out}"
    );
    let mut c = Command::new(BIN);
    c.args(["events", "--control", mc.to_str().unwrap()]);
    let mut follow = Background::spawn("events", c, &p.dir().join("events.out"));
    let (code, v, err) = demote(&p.primary.control.clone());
    assert_eq!(code, 0, "{v} {err}");
    let (code, v, err) = promote(&mc, &[]);
    assert_eq!(code, 0, "{v} {err}");
    let has = |out: &str, key: &str, value: &str| {
        out.lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|l| {
                l["type"] == "change"
                    && l["volume"] == VOL
                    && l["key"] == key
                    && l["value"] == value
            })
        })
    };
    wait_for("events of the promotion", LONG, &[], |_| {
        let out = follow.output();
        has(&out, "role", "primary") && has(&out, "peer_role", "secondary")
    });
    stop_ok(&mut p.mirror);
    let status = follow.wait();
    assert_eq!(status.code(), Some(4), "{}", follow.output());
    assert!(follow
        .output()
        .lines()
        .last()
        .unwrap_or("")
        .contains("\"gone\""));
}

/// What a peer said of itself is not trusted once it has gone quiet (found in review: a
/// secondary restarted after its peer was promoted, took writes and was lost, promoted itself
/// without --force from a notice of the peer's older days, and the acknowledged writes were
/// gone). Here: a switchover, the old primary stopped; the new primary takes a write and is
/// killed; the old primary, started again, may not be promoted without --force (exit 9), and
/// with --force says it may lose writes.
#[test]
fn a_peer_gone_quiet_is_not_taken_for_a_demoted_one() {
    let (mut p, mirror_sock) = switchable_pair();
    assert!(qemu_write(&p.nbd_sock.clone(), 0x11, 0, MIB));
    let (code, v, err) = demote(&p.primary.control.clone());
    assert_eq!(code, 0, "{v} {err}");
    let (code, v, err) = promote(&p.mirror.control.clone(), &[]);
    assert_eq!(code, 0, "{v} {err}");
    stop_ok(&mut p.primary);
    assert!(qemu_write(&mirror_sock, 0x22, MIB, MIB));
    p.mirror.kill9();
    p.primary.nbd_socket = None;
    p.primary.start();
    let (code, v, err) = promote(&p.primary.control.clone(), &[]);
    assert_eq!(code, 9, "promoted from a stale notice: {v} {err}");
    assert!(err.contains("not known to be demoted"), "{err}");
    let (code, v, err) = promote(&p.primary.control.clone(), &["--force"]);
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!(v["force"], true, "{v}");
    stop_ok(&mut p.primary);
}
