//! The command line as a script or an operator meets it: what a daemon does with its state
//! directory, sockets and signals whatever its role, and what each command prints and exits
//! with when something is wrong (real `blkmirror` processes, no mocks).

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A command that must fail at once: run it (killed after 30 s, which fails the test), return
/// its exit status and stderr.
fn run_to_exit(args: &[&std::ffi::OsStr]) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("BLKMIRROR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn blkmirror");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "blkmirror {args:?} still running after 30 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `run_to_exit` with string arguments; asserts the exit code (README, "Exit codes") and that
/// stderr says `needle`; returns stderr.
fn exits_with(args: &[&str], code: i32, needle: &str) -> String {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let (status, stderr) = run_to_exit(&args);
    assert_eq!(
        status.code(),
        Some(code),
        "blkmirror {args:?} exited with {status}, not {code}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(needle),
        "blkmirror {args:?}: stderr does not say {needle:?}:\n{stderr}"
    );
    stderr
}

// The exit codes of README's "Exit codes".
const USAGE: i32 = 2;
const REFUSED: i32 = 3;
const NOT_RUNNING: i32 = 4;
const IO: i32 = 5;
const BUSY: i32 = 7;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A second daemon on a state directory that a running one holds is refused, whatever its
/// role, and the running one is not disturbed.
#[test]
fn a_locked_state_dir_refuses_a_second_daemon_of_either_role() {
    let srv = Server::with_volume(4 * MIB);
    let d = srv.dir();
    let state = srv.state_dir();
    exits_with(
        &[
            "primary",
            "--volume",
            &format!("other={},size=1M", d.join("other.img").display()),
            "--nbd-unix",
            s(&d.join("other.sock")),
            "--state-dir",
            s(&state),
        ],
        BUSY,
        "is in use by another blkmirror process",
    );
    let pki = d.join("pki");
    certs_init(&pki, &["mirror"]);
    let mut mirror = vec![
        "mirror".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--volume".into(),
        format!("m={},size=1M", d.join("m.img").display()),
        "--state-dir".into(),
        s(&state).to_string(),
        "--peer-name".into(),
        "primary".into(),
    ];
    for a in tls_args(&pki, "mirror") {
        mirror.push(a.into_string().unwrap());
    }
    let mirror: Vec<&str> = mirror.iter().map(String::as_str).collect();
    exits_with(&mirror, BUSY, "is in use by another blkmirror process");
    run("nbdinfo", &["--size", &srv.uri("vol1")]);
}

/// A primary that cannot take its NBD socket (a live server has it) stops, and leaves no
/// control socket behind in its own state directory; the live server keeps serving.
#[test]
fn failed_start_removes_the_control_socket_it_made() {
    let srv = Server::with_volume(4 * MIB);
    let d = srv.dir();
    let state = d.join("state2");
    exits_with(
        &[
            "primary",
            "--volume",
            &format!("v2={},size=1M", d.join("v2.img").display()),
            "--nbd-unix",
            s(&srv.socket),
            "--state-dir",
            s(&state),
        ],
        BUSY,
        "in use by a running server",
    );
    assert!(state.is_dir(), "the state directory was made");
    assert!(
        !state.join("control.sock").exists(),
        "a control socket was left behind"
    );
    run("nbdinfo", &["--size", &srv.uri("vol1")]);
}

/// A file that is not a socket at the --nbd-unix path is never deleted to make room.
#[test]
fn a_file_at_the_socket_path_is_kept() {
    let dir = tempfile::Builder::new()
        .prefix("bm-cli-")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let precious = d.join("precious");
    std::fs::write(&precious, b"not a socket").unwrap();
    exits_with(
        &[
            "primary",
            "--volume",
            &format!("v={},size=1M", d.join("v.img").display()),
            "--nbd-unix",
            s(&precious),
            "--state-dir",
            s(&d.join("state")),
        ],
        IO,
        "is not a socket",
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"not a socket");
}

const SIGHUP_LINE: &str = "SIGHUP received: ignored (blkmirror has no configuration to reload)";

/// SIGHUP (a closed terminal, a service manager's "reload") is logged and ignored: the primary
/// keeps serving clients and its control socket; SIGTERM then stops it with status 0 and
/// removes its NBD and control sockets.
#[test]
fn primary_ignores_sighup_then_stops_cleanly_on_sigterm() {
    let mut srv = Server::builder()
        .volume("vol1", 4 * MIB)
        .log_level("info")
        .start();
    srv.signal(Signal::SIGHUP);
    srv.assert_log(SIGHUP_LINE);
    srv.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.log().matches(SIGHUP_LINE).count() < 2 {
        assert!(Instant::now() < deadline, "second SIGHUP:\n{}", srv.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let size = run("nbdinfo", &["--size", &srv.uri("vol1")]);
    assert_eq!(size.trim(), (4 * MIB).to_string());
    assert!(query_status(&srv.control()).is_some(), "control socket");
    assert!(srv.is_running());
    let status = srv.stop().expect("was running");
    assert_eq!(status.code(), Some(0), "SIGTERM: {status}\n{}", srv.log());
    assert!(!srv.socket.exists(), "NBD socket left behind");
    assert!(!srv.control().exists(), "control socket left behind");
}

/// The mirror handles SIGHUP the same way (the signal handling is not the primary's).
#[test]
fn mirror_ignores_sighup_then_stops_cleanly_on_sigterm() {
    let dir = tempfile::Builder::new()
        .prefix("bm-cli-")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    certs_init(&pki, &["mirror"]);
    let state = d.join("mstate");
    let mut args: Vec<std::ffi::OsString> = vec![
        "mirror".into(),
        "--listen".into(),
        format!("127.0.0.1:{}", free_udp_port()).into(),
        "--volume".into(),
        format!("vol1={},size=4M", d.join("m.img").display()).into(),
        "--state-dir".into(),
        state.clone().into(),
        "--peer-name".into(),
        "primary".into(),
    ];
    args.extend(tls_args(&pki, "mirror"));
    let mut mirror = Daemon::new(
        "mirror",
        args,
        d.join("mirror.log"),
        state.join("control.sock"),
        None,
    );
    mirror.start();
    mirror.signal(Signal::SIGHUP);
    assert!(
        mirror.wait_for_log_count(SIGHUP_LINE, 1, Duration::from_secs(5)),
        "{}",
        mirror.log()
    );
    assert!(mirror.status().is_some(), "control socket");
    assert!(mirror.is_running());
    let status = mirror.stop().expect("was running");
    assert_eq!(status.code(), Some(0), "SIGTERM: {status}");
    assert!(
        !state.join("control.sock").exists(),
        "control socket left behind"
    );
}

/// `certs issue` never replaces an existing private key or certificate unasked: a second issue
/// for the same name is refused with a message naming the file and `--force`, and leaves both
/// files byte for byte; with `--force` (renewal) a new key and certificate replace them.
#[test]
fn certs_issue_refuses_to_replace_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs_init(&pki, &["primary"]);
    let key = pki.join("primary.key");
    let crt = pki.join("primary.crt");
    let (key_before, crt_before) = (std::fs::read(&key).unwrap(), std::fs::read(&crt).unwrap());
    let issue = ["certs", "issue", "--dir", s(&pki), "primary"];
    let stderr = exits_with(&issue, REFUSED, "--force");
    assert!(stderr.contains(s(&key)), "{stderr}");
    assert_eq!(std::fs::read(&key).unwrap(), key_before, "key changed");
    assert_eq!(
        std::fs::read(&crt).unwrap(),
        crt_before,
        "certificate changed"
    );

    // A certificate alone (its key moved away) is protected too.
    std::fs::rename(&key, pki.join("saved.key")).unwrap();
    let stderr = exits_with(&issue, REFUSED, "--force");
    assert!(stderr.contains(s(&crt)), "{stderr}");
    assert!(
        !key.exists(),
        "a key was written although the issue was refused"
    );
    std::fs::rename(pki.join("saved.key"), &key).unwrap();

    let out = run(
        BIN,
        &["certs", "issue", "--dir", s(&pki), "--force", "primary"],
    );
    assert!(out.contains("wrote"), "{out}");
    assert_ne!(
        std::fs::read(&key).unwrap(),
        key_before,
        "--force kept the old key"
    );
    assert_ne!(std::fs::read(&crt).unwrap(), crt_before);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

/// Every mistake a script or an operator can make at start exits with its documented code and
/// a message that says what is wrong: usage (2), refused by local state (3), not running (4),
/// files (5).
#[test]
fn each_failure_has_its_exit_code() {
    let dir = tempfile::Builder::new()
        .prefix("bm-cli-")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let (sock, state) = (d.join("nbd.sock"), d.join("state"));
    let path = |name: &str| d.join(name).display().to_string();
    let primary = |extra: &[&str]| {
        let mut a = vec!["primary", "--nbd-unix", s(&sock), "--state-dir", s(&state)];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let check = |args: &[String], code: i32, needle: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        exits_with(&args, code, needle);
    };
    let strings = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // Checked before the TLS files are read: these need not exist.
    let none = path("none");
    let replicating = |addr: &str, journal: &str, vol: &str| {
        primary(&[
            "--volume",
            vol,
            "--mirror",
            addr,
            "--journal-size",
            journal,
            "--ca",
            &none,
            "--cert",
            &none,
            "--key",
            &none,
            "--peer-name",
            "mirror",
        ])
    };

    // 2: what was typed is wrong.
    check(&primary(&["--bogus"]), USAGE, "--bogus");
    // A dirty-map region the map cannot use: said at once, not when the journal first folds.
    for bad in ["3K", "48K", "2K"] {
        check(
            &primary(&["--volume", "v=/nonexistent", "--dirty-region", bad]),
            USAGE,
            "--dirty-region",
        );
    }
    let (a1, a2) = (
        format!("a={},size=1M", path("a1")),
        format!("a={},size=1M", path("a2")),
    );
    check(
        &primary(&["--volume", &a1, "--volume", &a2]),
        USAGE,
        "volume name \"a\" given twice",
    );
    let j = format!("j={},size=1M", path("j"));
    check(
        &replicating("127.0.0.1:9", "63M", &j),
        USAGE,
        "--journal-size must be at least 64 MiB",
    );
    check(
        &replicating("no-port-here", "1G", &j),
        USAGE,
        "--mirror \"no-port-here\"",
    );
    let t = format!("t={},size=1M", path("t"));
    check(
        &primary(&["--volume", &t, "--nbd-tcp", "not an address"]),
        USAGE,
        "--nbd-tcp \"not an address\"",
    );
    check(
        &strings(&["certs", "issue", "--dir", s(d), "../evil"]),
        USAGE,
        "invalid peer name",
    );

    // 3: refused to protect what is on disk.
    std::fs::write(d.join("small"), vec![0u8; 1 << 20]).unwrap();
    let small = format!("small={},size=2M", path("small"));
    check(
        &primary(&["--volume", &small]),
        REFUSED,
        "refusing to resize",
    );
    let pki = d.join("pki");
    certs_init(&pki, &[]);
    check(
        &strings(&["certs", "init", "--dir", s(&pki)]),
        REFUSED,
        "already exists",
    );

    // 4: no daemon answers, whether there is no socket or a stale one.
    let nothing = path("nothing.sock");
    check(
        &strings(&["status", "--control", &nothing]),
        NOT_RUNNING,
        "no daemon answers",
    );
    let stale = d.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    check(
        &strings(&["status", "--control", s(&stale), "--json"]),
        NOT_RUNNING,
        "no daemon answers",
    );

    // 5: files and directories.
    let in_missing_dir = format!("m={},size=1M", path("missing-dir/m.img"));
    check(
        &primary(&["--volume", &in_missing_dir]),
        IO,
        "No such file or directory",
    );
    let absent = format!("absent={}", path("absent"));
    check(&primary(&["--volume", &absent]), IO, "does not exist");
    let no_ca = path("no-ca");
    check(
        &strings(&["certs", "issue", "--dir", &no_ca, "primary"]),
        IO,
        "certs init",
    );
    let (mstate, mv, ca) = (
        path("mstate"),
        format!("mv={},size=1M", path("mv")),
        path("ca.crt"),
    );
    check(
        &strings(&[
            "mirror",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            &mstate,
            "--volume",
            &mv,
            "--ca",
            &ca,
            "--cert",
            &none,
            "--key",
            &none,
            "--peer-name",
            "primary",
        ]),
        IO,
        &ca,
    );
}

/// What another process holds exits 7 (busy): a volume served by a running primary (for a
/// second primary and for `recover`), a TCP address in use.
#[test]
fn resources_held_elsewhere_exit_busy() {
    let srv = Server::with_volume(4 * MIB);
    let d = srv.dir();
    let served = format!("vol1={}", srv.volume_path("vol1").display());
    exits_with(
        &[
            "primary",
            "--volume",
            &served,
            "--nbd-unix",
            s(&d.join("b.sock")),
            "--state-dir",
            s(&d.join("b-state")),
        ],
        BUSY,
        "in use by another process",
    );
    exits_with(
        &[
            "recover",
            "--volume",
            &served,
            "--state-dir",
            s(&d.join("r-state")),
        ],
        BUSY,
        "in use by another process",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    exits_with(
        &[
            "primary",
            "--volume",
            &format!("t={},size=1M", d.join("t.img").display()),
            "--nbd-unix",
            s(&d.join("t.sock")),
            "--state-dir",
            s(&d.join("t-state")),
            "--nbd-tcp",
            &addr,
        ],
        BUSY,
        &format!("cannot listen on {addr}"),
    );
    run("nbdinfo", &["--size", &srv.uri("vol1")]);
}

/// A primary without --mirror replicates nothing, so nothing is missing: `status` exits 0.
#[test]
fn status_of_a_primary_without_mirror_exits_0() {
    let srv = Server::with_volume(4 * MIB);
    let o = run_output(BIN, &["status", "--control", s(&srv.control())], None);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(
        out.starts_with("role: primary\n")
            && out
                .lines()
                .any(|l| l.starts_with("vol1 ") && l.contains("standalone") && l.contains("none")),
        "{out}"
    );
}

/// The nice value of each thread of `pid` whose name is `name` (field 19 of its stat).
fn thread_nices(pid: u32, name: &str) -> Vec<i32> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis start at field 3 (state).
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        nices.push(after.split(' ').nth(16).unwrap().parse().unwrap());
    }
    nices
}

/// Tried: a primary with one volume, one with four (as root), one with four run as `nobody`
/// (no CAP_SYS_NICE).
///
/// Expected: one volume leaves every thread at nice 0; with four, the runtime's two workers
/// (the threads that drive QUIC for every volume, named `repl`) run at nice -3 (README,
/// "Replicate to a mirror"; `daemon::network_nice`) and the NBD threads stay at 0; without
/// the right, the log says once that the priority cannot be raised and why, and the daemon
/// serves all the same.
#[test]
fn network_threads_priority_scales_with_the_volume_count() {
    let nices_after = |srv: &Server, want_raised: usize, nice: i32| {
        let pid = srv.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let repl = thread_nices(pid, "repl");
            if repl.iter().filter(|&&n| n == nice).count() >= want_raised {
                return repl;
            }
            assert!(
                Instant::now() < deadline,
                "repl threads' nice values: {repl:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let one = Server::builder().volume("vol1", 4 * MIB).start();
    let repl = nices_after(&one, 2, 0);
    assert!(repl.iter().all(|&n| n == 0), "one volume: {repl:?}");

    let mut four = Server::builder();
    for i in 0..4 {
        four = four.volume(&format!("vol{i}"), 4 * MIB);
    }
    let four = four.start();
    let repl = nices_after(&four, 2, -3);
    assert_eq!(repl.iter().filter(|&&n| n == -3).count(), 2, "{repl:?}");
    let nbd = thread_nices(four.pid(), "nbd-unix-accept");
    assert_eq!(nbd, vec![0], "the NBD acceptor keeps the default priority");

    let mut unprivileged = Server::builder();
    for i in 0..4 {
        unprivileged = unprivileged.volume(&format!("vol{i}"), 4 * MIB);
    }
    let unprivileged = unprivileged.run_as(65534, 65534).start();
    const NO_RIGHT: &str = "cannot raise the network threads' priority";
    assert!(
        unprivileged.wait_for_log(NO_RIGHT, Duration::from_secs(10)),
        "{}",
        unprivileged.log()
    );
    let size = run("nbdinfo", &["--size", &unprivileged.uri("vol3")]);
    assert_eq!(size.trim(), (4 * MIB).to_string());
    let log = unprivileged.log();
    assert_eq!(log.matches(NO_RIGHT).count(), 1, "said once:\n{log}");
    assert!(
        log.contains("CAP_SYS_NICE"),
        "says what would grant it:\n{log}"
    );
    let repl = thread_nices(unprivileged.pid(), "repl");
    assert!(repl.iter().all(|&n| n == 0), "without the right: {repl:?}");
}
