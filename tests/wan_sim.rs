//! End-to-end tests of the WAN link emulator (`wan-sim`, docs/WAN-SIM.md): real namespaces,
//! TUN devices and the background forwarder. They need root (CI runs as root) and use their own
//! namespace prefix (`bmtest-pri` / `bmtest-mir`), so a developer's `bm-pri` / `bm-mir` instance
//! is left alone. Tests run one at a time (a static mutex) because they share that prefix, and
//! every test tears the emulator down on drop, also when it fails.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wan-sim");
const PREFIX: &str = "bmtest";
const PRI_NS: &str = "bmtest-pri";
const MIR_NS: &str = "bmtest-mir";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `wan-sim ARGS` against the test prefix.
fn ws(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("WAN_SIM_PREFIX", PREFIX)
        .env_remove("WAN_SIM_DIR")
        .output()
        .expect("run wan-sim")
}

fn ws_ok(args: &[&str]) -> String {
    let out = ws(args);
    assert!(
        out.status.success(),
        "wan-sim {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stats() -> Value {
    serde_json::from_str(&ws_ok(&["stats", "--json"])).expect("stats JSON")
}

/// `wan-sim ping --json`: the report (also when no reply came back, exit code 1).
fn ping(count: u32, interval_ms: u32, timeout_ms: u32) -> Value {
    let (c, i, t) = (
        count.to_string(),
        interval_ms.to_string(),
        timeout_ms.to_string(),
    );
    let out = ws(&[
        "ping",
        "--json",
        "-c",
        &c,
        "--interval-ms",
        &i,
        "--timeout-ms",
        &t,
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ping output: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        out.status.success(),
        v["received"].as_u64() > Some(0),
        "exit status follows replies"
    );
    v
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn counter(v: &Value, dir: &str, key: &str) -> u64 {
    v["directions"][dir][key]
        .as_u64()
        .unwrap_or_else(|| panic!("stats lack {dir}.{key}: {v}"))
}

/// A running emulator for one test; `down` on drop (also after a failed assertion).
struct Sim {
    _serial: MutexGuard<'static, ()>,
}

impl Sim {
    fn up(args: &[&str]) -> Sim {
        let serial = serial();
        ws(&["down"]); // leftovers of an earlier, killed run
        let mut all = vec!["up"];
        all.extend_from_slice(args);
        ws_ok(&all);
        Sim { _serial: serial }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let out = ws(&["down"]);
        if !out.status.success() {
            eprintln!("wan-sim down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Runs `f` with this thread inside network namespace `ns`; sockets made there stay there.
fn in_netns<T>(ns: &str, f: impl FnOnce() -> T) -> T {
    let home = File::open("/proc/thread-self/ns/net").unwrap();
    let target = File::open(format!("/run/netns/{ns}")).unwrap();
    // This thread returns home before leaving, so no other code runs in `ns` by accident.
    nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter netns");
    let out = f();
    nix::sched::setns(&home, nix::sched::CloneFlags::CLONE_NEWNET).expect("leave netns");
    out
}

#[test]
fn ping_sees_the_configured_rtt_and_a_cut_stops_then_restores_the_link() {
    let _sim = Sim::up(&["--rtt-ms", "10", "--loss", "0"]);
    let v = ping(5, 100, 1000);
    assert_eq!(v["received"], 5, "{v}");
    for rtt in v["rtts_ms"].as_array().unwrap() {
        let rtt = rtt.as_f64().unwrap();
        assert!(
            (10.0..=30.0).contains(&rtt),
            "rtt {rtt} ms not in [10, 30]: {v}"
        );
    }

    let cut_at = Instant::now();
    ws_ok(&["cut", "--secs", "2"]);
    // The command returns at once; during the cut nothing gets through.
    let during = ping(4, 150, 300);
    assert!(
        cut_at.elapsed() < Duration::from_millis(1900),
        "probe outlasted the cut"
    );
    assert_eq!(during["received"], 0, "{during}");
    let s = stats();
    assert!(counter(&s, "pri_to_mir", "dropped_cut") >= 4, "{s}");
    assert!(s["cut_remaining_s"].as_f64().unwrap() > 0.0);

    // The forwarder restores the link by itself.
    thread::sleep(Duration::from_millis(2300).saturating_sub(cut_at.elapsed()));
    let after = ping(3, 100, 1000);
    assert_eq!(after["received"], 3, "{after}");
    assert_eq!(stats()["cut_remaining_s"].as_f64(), Some(0.0));
}

#[test]
fn loss_one_drops_everything_and_stats_count_it() {
    let _sim = Sim::up(&["--rtt-ms", "2", "--loss", "0"]);
    assert_eq!(ping(2, 50, 500)["received"], 2);
    let before = stats();
    ws_ok(&["set", "--loss", "1.0"]);
    assert_eq!(stats()["params"]["loss"], 1.0);
    let v = ping(5, 50, 300);
    assert_eq!(v["received"], 0, "{v}");
    let after = stats();
    let dropped = counter(&after, "pri_to_mir", "dropped_loss")
        - counter(&before, "pri_to_mir", "dropped_loss");
    assert_eq!(dropped, 5, "{after}");
    assert_eq!(
        counter(&after, "pri_to_mir", "passed_packets"),
        counter(&before, "pri_to_mir", "passed_packets")
    );
    // `set` is live both ways: the link comes back without a restart.
    ws_ok(&["set", "--loss", "0"]);
    assert_eq!(ping(2, 50, 500)["received"], 2);
    // Out-of-range values are refused and change nothing.
    let bad = ws(&["set", "--loss", "1.5"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--loss"));
    assert_eq!(stats()["params"]["loss"], 0.0);
}

#[test]
fn set_changes_the_delay_live() {
    let _sim = Sim::up(&["--rtt-ms", "4", "--loss", "0"]);
    ws_ok(&["set", "--rtt-ms", "40"]);
    let v = ping(3, 100, 1000);
    assert_eq!(v["received"], 3, "{v}");
    let min = v["rtt_min_ms"].as_f64().unwrap();
    assert!((40.0..=60.0).contains(&min), "{v}");
    let s = stats();
    assert_eq!(s["params"]["rtt_ms"], 40.0);
    assert_eq!(
        s["params"]["rate_mbit"], 500.0,
        "untouched flags keep their value"
    );
}

#[test]
fn loss_and_duplication_counts_follow_the_configured_rates() {
    let _sim = Sim::up(&["--rtt-ms", "1", "--loss", "0.2", "--dup", "0.2"]);
    let v = ping(200, 5, 500);
    let s = stats();
    let d = "pri_to_mir";
    let received = counter(&s, d, "received_packets");
    assert_eq!(received, 200, "{s}");
    let lost = counter(&s, d, "dropped_loss");
    let dups = counter(&s, d, "duplicated");
    assert!((20..=70).contains(&lost), "lost {lost} of 200 at 20%: {s}");
    assert!(
        (15..=60).contains(&dups),
        "{dups} duplicates of ~160 at 20%: {s}"
    );
    assert_eq!(counter(&s, d, "passed_packets"), received - lost + dups);
    // Replies cross the other direction with its own losses and copies.
    let replies = v["received"].as_u64().unwrap();
    assert!((80..=160).contains(&replies), "{v}");
    assert!(v["duplicates"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn tcp_stream_survives_loss_duplication_reordering_and_jitter_intact() {
    let _sim = Sim::up(&[
        "--rtt-ms",
        "4",
        "--jitter-ms",
        "1",
        "--loss",
        "0.005",
        "--dup",
        "0.01",
        "--reorder",
        "0.05",
        "--rate-mbit",
        "200",
    ]);
    let listener = in_netns(MIR_NS, || TcpListener::bind("10.99.0.2:5201").unwrap());
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expect = data.clone();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let mut c = in_netns(PRI_NS, || {
        TcpStream::connect(SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 5201)).unwrap()
    });
    c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(&data).unwrap();
    drop(c);
    let got = server.join().unwrap();
    assert!(got == expect, "stream corrupted: {} bytes", got.len());
    let s = stats();
    let d = "pri_to_mir";
    assert!(counter(&s, d, "reordered") > 0, "{s}");
    assert!(counter(&s, d, "duplicated") > 0, "{s}");
    assert!(counter(&s, d, "dropped_loss") > 0, "{s}");
    assert!(counter(&s, d, "passed_bytes") > 4 << 20, "{s}");
}

#[test]
fn up_twice_fails_clearly_and_leaves_the_first_instance_running() {
    let _sim = Sim::up(&["--rtt-ms", "2", "--loss", "0"]);
    let pid = stats()["pid"].as_u64().unwrap();
    let again = ws(&["up", "--rtt-ms", "50"]);
    assert_eq!(again.status.code(), Some(3), "exit code 3 = already up");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already up"), "{err}");
    let s = stats();
    assert_eq!(s["pid"].as_u64(), Some(pid));
    assert_eq!(s["params"]["rtt_ms"], 2.0);
    assert_eq!(ping(2, 50, 500)["received"], 2);
}

#[test]
fn down_removes_everything_and_is_idempotent() {
    let sim = Sim::up(&["--loss", "0"]);
    let list = netns_list();
    assert!(list.contains(PRI_NS) && list.contains(MIR_NS), "{list}");
    ws_ok(&["down"]);
    let list = netns_list();
    assert!(!list.contains(PRI_NS) && !list.contains(MIR_NS), "{list}");
    assert!(!std::path::Path::new("/run/wan-sim/bmtest").exists());
    ws_ok(&["down"]);
    // Not up: the client commands say so with exit code 4.
    assert_eq!(ws(&["stats"]).status.code(), Some(4));
    assert_eq!(ws(&["cut", "--secs", "1"]).status.code(), Some(4));
    drop(sim);
}

#[test]
fn down_and_up_cope_with_a_partial_or_stale_instance() {
    let _serial = serial();
    ws(&["down"]);
    // Only one namespace, no daemon: down cleans it.
    let st = Command::new("ip")
        .args(["netns", "add", PRI_NS])
        .status()
        .unwrap();
    assert!(st.success());
    ws_ok(&["down"]);
    assert!(!netns_list().contains(PRI_NS));
    // Stale leftovers (namespace, dead pid file): up starts fresh over them.
    assert!(Command::new("ip")
        .args(["netns", "add", MIR_NS])
        .status()
        .unwrap()
        .success());
    std::fs::create_dir_all("/run/wan-sim/bmtest").unwrap();
    std::fs::write("/run/wan-sim/bmtest/wan-sim.pid", "999999\n").unwrap();
    let sim = Sim { _serial };
    ws_ok(&["up", "--rtt-ms", "2", "--loss", "0"]);
    assert_eq!(ping(2, 50, 500)["received"], 2);
    drop(sim);
    assert!(!netns_list().contains(MIR_NS));
}
