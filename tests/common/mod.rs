//! Shared helpers for the end-to-end tests: a `blkmirror primary` process in a fresh temporary
//! directory, a runner for real NBD clients, Drop guards that undo mounts, loop devices and
//! FUSE mounts even when a test fails, and (in `pair`) a replicating primary + mirror pair.

#![allow(dead_code)]

mod pair;
// Like the dead code above: only the replication tests use the pair.
#[allow(unused_imports)]
pub(crate) use pair::*;

pub(crate) use nix::sys::signal::Signal;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_blkmirror");

pub(crate) const MIB: u64 = 1 << 20;

/// One `--volume` of the server under test.
#[derive(Clone, Debug)]
struct VolumeDef {
    name: String,
    size: u64,
    read_only: bool,
    /// Contents written to the backing file before the server starts (read-only volumes must
    /// exist beforehand: the server only creates writable ones).
    fill: Option<Vec<u8>>,
}

/// Describes a server to start; see [`Server::builder`].
#[derive(Default)]
pub(crate) struct ServerBuilder {
    volumes: Vec<VolumeDef>,
    faults: Vec<String>,
    log_level: Option<String>,
    tcp: Option<String>,
    extra: Vec<String>,
    /// Run the daemon as this (uid, gid), without root's capabilities (`setpriv`).
    user: Option<(u32, u32)>,
}

impl ServerBuilder {
    /// A writable volume whose backing file does not exist yet: the server creates it sparse.
    pub(crate) fn volume(mut self, name: &str, size: u64) -> Self {
        self.volumes.push(VolumeDef {
            name: name.into(),
            size,
            read_only: false,
            fill: None,
        });
        self
    }

    /// A read-only volume backed by an existing file holding `contents`.
    pub(crate) fn ro_volume(mut self, name: &str, contents: Vec<u8>) -> Self {
        self.volumes.push(VolumeDef {
            name: name.into(),
            size: contents.len() as u64,
            read_only: true,
            fill: Some(contents),
        });
        self
    }

    /// `--inject-fault RULE`.
    pub(crate) fn fault(mut self, rule: &str) -> Self {
        self.faults.push(rule.into());
        self
    }

    /// `--nbd-tcp ADDR:PORT`.
    pub(crate) fn tcp(mut self, addr: &str) -> Self {
        self.tcp = Some(addr.into());
        self
    }

    /// Any other argument of `blkmirror primary`.
    pub(crate) fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// Run the daemon as `uid`:`gid` (its directory is handed over to them), as a service
    /// without privileges runs.
    pub(crate) fn run_as(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// BLKMIRROR_LOG for the server (default `debug`, so tests can assert on detail).
    pub(crate) fn log_level(mut self, level: &str) -> Self {
        self.log_level = Some(level.into());
        self
    }

    pub(crate) fn start(self) -> Server {
        assert!(!self.volumes.is_empty(), "a server needs a volume");
        let dir = tempfile::Builder::new()
            .prefix("blkmirror-e2e-")
            .tempdir()
            .expect("create temp dir");
        let socket = dir.path().join("nbd.sock");
        // sun_path holds 108 bytes; fall back to /tmp if TMPDIR is very long.
        let dir = if socket.as_os_str().len() >= 100 {
            tempfile::Builder::new()
                .prefix("bm-")
                .tempdir_in("/tmp")
                .expect("create temp dir in /tmp")
        } else {
            dir
        };
        let socket = dir.path().join("nbd.sock");
        let state_dir = dir.path().join("state");
        let log_path = dir.path().join("server.log");
        let mut volumes = Vec::new();
        let mut cmd = match self.user {
            None => Command::new(BIN),
            Some((uid, gid)) => {
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(BIN);
                c
            }
        };
        cmd.arg("primary");
        for v in &self.volumes {
            let path = dir.path().join(format!("{}.img", v.name));
            let mut spec = format!("{}={}", v.name, path.display());
            if let Some(fill) = &v.fill {
                std::fs::write(&path, fill).expect("write volume contents");
            } else {
                spec.push_str(&format!(",size={}", v.size));
            }
            if v.read_only {
                spec.push_str(",ro");
            }
            cmd.arg("--volume").arg(spec);
            volumes.push((v.name.clone(), path, v.size));
        }
        cmd.arg("--nbd-unix").arg(&socket);
        cmd.arg("--state-dir").arg(&state_dir);
        if let Some(addr) = &self.tcp {
            cmd.arg("--nbd-tcp").arg(addr);
        }
        for f in &self.faults {
            cmd.arg("--inject-fault").arg(f);
        }
        cmd.args(&self.extra);
        let log = File::create(&log_path).expect("create log file");
        cmd.env(
            "BLKMIRROR_LOG",
            self.log_level.as_deref().unwrap_or("debug"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
        let child = cmd.spawn().expect("spawn blkmirror");
        let mut server = Server {
            dir,
            socket,
            log_path,
            volumes,
            child: Some(child),
        };
        server.wait_ready();
        server
    }
}

/// A running `blkmirror primary`; SIGTERM (then SIGKILL after 5 s) on Drop.
pub(crate) struct Server {
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    volumes: Vec<(String, PathBuf, u64)>,
    child: Option<Child>,
}

impl Server {
    pub(crate) fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// The common case: one writable, sparse volume called `vol1`.
    pub(crate) fn with_volume(size: u64) -> Server {
        Server::builder().volume("vol1", size).start()
    }

    /// A scratch directory that lives as long as the server (for client-side files).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its `--state-dir`.
    /// The daemon's process id (it must still run).
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Its control socket (the default, in the state directory).
    pub(crate) fn control(&self) -> PathBuf {
        self.state_dir().join("control.sock")
    }

    /// Send `sig` to the running server.
    pub(crate) fn signal(&self, sig: Signal) {
        let child = self.child.as_ref().expect("server is not running");
        signal(child, sig);
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub(crate) fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{}?socket={}", name, self.socket.display())
    }

    /// The backing file of volume `name`.
    pub(crate) fn volume_path(&self, name: &str) -> PathBuf {
        self.volumes
            .iter()
            .find(|v| v.0 == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .1
            .clone()
    }

    pub(crate) fn volume_size(&self, name: &str) -> u64 {
        self.volumes
            .iter()
            .find(|v| v.0 == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .2
    }

    /// Everything the server has written to stderr so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Wait (up to `timeout`) for a log line containing `needle`; returns whether it came.
    pub(crate) fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panic, showing the log, unless a line containing `needle` appears within 5 s.
    pub(crate) fn assert_log(&self, needle: &str) {
        assert!(
            self.wait_for_log(needle, Duration::from_secs(5)),
            "server log has no line containing {needle:?}; log:\n{}",
            self.log()
        );
    }

    /// Is the process still running?
    pub(crate) fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!(
                    "blkmirror exited during startup ({status}); log:\n{}",
                    self.log()
                );
            }
            if probe(&self.socket).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "socket {} never accepted a client; log:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait up to 5 s, then SIGKILL. Returns the exit status.
    pub(crate) fn stop(&mut self) -> Option<ExitStatus> {
        terminate(self.child.take()?, "blkmirror")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "---- blkmirror log ({}) last {} lines ----\n{}\n----",
                self.log_path.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Connect, check the greeting, and leave politely with NBD_OPT_ABORT.
pub(crate) fn probe(socket: &Path) -> std::io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    if &greeting[..8] != b"NBDMAGIC" || &greeting[8..16] != b"IHAVEOPT" {
        return Err(std::io::Error::other("not an NBD greeting"));
    }
    let mut msg = Vec::new();
    msg.extend_from_slice(&3u32.to_be_bytes());
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&2u32.to_be_bytes()); // NBD_OPT_ABORT
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&msg)?;
    let mut reply = [0u8; 20];
    let _ = s.read_exact(&mut reply);
    Ok(())
}

/// How long a client may run before it is considered hung and killed.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Run a client to completion (killed after [`CLIENT_TIMEOUT`]); returns its output whatever
/// the exit status.
pub(crate) fn run_output(cmd: &str, args: &[&str], cwd: Option<&Path>) -> Output {
    let mut c = Command::new(cmd);
    c.args(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    run_command(c)
}

/// Run a prepared command to completion (killed after [`CLIENT_TIMEOUT`]).
pub(crate) fn run_command(mut c: Command) -> Output {
    let what = format!("{c:?}");
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} still running after {CLIENT_TIMEOUT:?}; killed it (is the server hung?)"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn describe(cmd: &str, args: &[&str], o: &Output) -> String {
    format!(
        "{cmd} {args:?} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run a real client, assert it succeeded (showing its stderr if not), return its stdout.
pub(crate) fn run(cmd: &str, args: &[&str]) -> String {
    run_in(cmd, args, None)
}

/// [`run`] in working directory `cwd`.
pub(crate) fn run_in(cmd: &str, args: &[&str], cwd: Option<&Path>) -> String {
    let o = run_output(cmd, args, cwd);
    if !o.status.success() {
        panic!("{}", describe(cmd, args, &o));
    }
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a real client and assert it failed; returns stdout + stderr.
pub(crate) fn run_fails(cmd: &str, args: &[&str]) -> String {
    let o = run_output(cmd, args, None);
    assert!(
        !o.status.success(),
        "expected failure: {}",
        describe(cmd, args, &o)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A python script run by `/usr/bin/python3` (the interpreter with libnbd's `nbd` module).
pub(crate) fn python(script: &str, args: &[&str]) -> String {
    let mut a = vec!["-c", script];
    a.extend_from_slice(args);
    run("/usr/bin/python3", &a)
}

/// `nbdsh -u URI -c CMD...`, with /usr/bin first on PATH: nbdsh runs `python3 -m nbd`, and
/// only the distribution's python has the libnbd bindings.
pub(crate) fn nbdsh(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("nbdsh");
    c.arg("-u").arg(uri);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/bin:{path}"));
    let o = run_command(c);
    assert!(
        o.status.success(),
        "nbdsh {cmds:?} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Parse `key=value` lines (as the python helper scripts print them).
pub(crate) fn kv(out: &str) -> std::collections::HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// xorshift64*: deterministic randomness for tests (reproducible failures, no extra crate).
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// One byte of each draw (garbage datagrams).
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures are reproducible.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// `sha256sum FILE` -> hex digest.
pub(crate) fn sha256(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().unwrap()]);
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Read `len` bytes at `offset` of a file.
pub(crate) fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).expect("open file");
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).expect("read file");
    v
}

/// An nbdfuse process exposing an export as MOUNTDIR/nbd; unmounted and reaped on Drop.
pub(crate) struct FuseFile {
    mountdir: PathBuf,
    child: Option<Child>,
}

impl FuseFile {
    pub(crate) fn start(mountdir: &Path, uri: &str) -> FuseFile {
        std::fs::create_dir_all(mountdir).expect("create fuse mount dir");
        let pidfile = mountdir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(mountdir.join("nbd"))
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = FuseFile {
            mountdir: mountdir.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(pidfile.exists() && f.file().exists()) {
            if let Some(s) = f.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdfuse exited early: {s}");
            }
            assert!(Instant::now() < deadline, "nbdfuse never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }

    pub(crate) fn file(&self) -> PathBuf {
        self.mountdir.join("nbd")
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let unmounted = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountdir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Busy (a file system over it torn down lazily after its server died): detached
            // lazily, so that no dead mount outlives the test.
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountdir)
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = Command::new("fusermount3")
                        .args(["-u", "-z"])
                        .arg(&self.mountdir)
                        .stderr(Stdio::null())
                        .status();
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A loop device over a file; detached on Drop.
pub(crate) struct LoopDev {
    pub dev: String,
}

impl LoopDev {
    pub(crate) fn attach(file: &Path) -> LoopDev {
        let out = run(
            "losetup",
            &["-f", "--show", "--direct-io=off", file.to_str().unwrap()],
        );
        LoopDev {
            dev: out.trim().to_string(),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("losetup")
                .args(["-d", &self.dev])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not detach {}", self.dev);
    }
}

/// A mounted file system; unmounted on Drop (lazily if busy).
pub(crate) struct Mount {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    pub(crate) fn at(dev: &str, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).expect("create mount point");
        run("mount", &[dev, dir.to_str().unwrap()]);
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmount now, asserting success.
    pub(crate) fn umount(mut self) {
        run("umount", &[self.dir.to_str().unwrap()]);
        self.mounted = false;
    }
}

/// Unmount `dir` on the way out of a test: lazily if it is busy, errors ignored.
fn umount_quietly(dir: &Path) {
    let ok = Command::new("umount")
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("umount").arg("-l").arg(dir).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        umount_quietly(&self.dir);
    }
}

// ------------------------------------------------------------------------------------------
// Replication: certificates, daemons (mirror and primary), status, image comparison.
// ------------------------------------------------------------------------------------------

/// A free UDP port on 127.0.0.1 (bound, read, released: another process could take it in
/// between, which is unlikely enough for tests).
pub(crate) fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    s.local_addr().expect("local address").port()
}

/// `blkmirror certs init --dir DIR` followed by `certs issue --dir DIR NAME` for each name.
pub(crate) fn certs_init(dir: &Path, names: &[&str]) {
    run(BIN, &["certs", "init", "--dir", dir.to_str().unwrap()]);
    for n in names {
        certs_issue(dir, n, &[]);
    }
}

/// `blkmirror certs issue --dir DIR [EXTRA...] NAME`.
pub(crate) fn certs_issue(dir: &Path, name: &str, extra: &[&str]) {
    let mut args = vec!["certs", "issue", "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(name);
    run(BIN, &args);
}

/// The `--ca --cert --key` arguments for certificate NAME of the CA in `dir`.
pub(crate) fn tls_args(dir: &Path, name: &str) -> Vec<std::ffi::OsString> {
    vec![
        "--ca".into(),
        dir.join("ca.crt").into(),
        "--cert".into(),
        dir.join(format!("{name}.crt")).into(),
        "--key".into(),
        dir.join(format!("{name}.key")).into(),
    ]
}

/// Ask a daemon's control socket for its status document (None if it does not answer).
pub(crate) fn query_status(control: &Path) -> Option<serde_json::Value> {
    let s = UnixStream::connect(control).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut w = s.try_clone().ok()?;
    w.write_all(b"status\n").ok()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// The last `n` lines of a text.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A `blkmirror` daemon (`mirror` or `primary`) with a fixed command line that can be stopped,
/// killed and started again; every run appends to the same log file. SIGTERM (then SIGKILL
/// after 5 s) on Drop; the log tail is printed when the test is failing.
pub(crate) struct Daemon {
    pub label: String,
    args: Vec<std::ffi::OsString>,
    log_level: String,
    pub log_path: PathBuf,
    pub control: PathBuf,
    /// For a primary: its NBD socket, probed before [`Daemon::start`] returns.
    pub nbd_socket: Option<PathBuf>,
    child: Option<Child>,
    /// How many times the process was started.
    pub starts: u32,
    /// Environment variables of the process beside BLKMIRROR_LOG (test hooks), from the
    /// next start on.
    pub envs: Vec<(String, String)>,
}

impl Daemon {
    /// More arguments, from the next start on.
    pub(crate) fn push_args(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(std::ffi::OsString::from));
    }

    /// Its arguments as text (to run it in the foreground and see how it exits).
    pub(crate) fn args_for_test(&self) -> Vec<&str> {
        self.args
            .iter()
            .map(|a| a.to_str().expect("UTF-8"))
            .collect()
    }

    /// Arguments no longer given, from the next start on (each with the value after it).
    pub(crate) fn drop_arg_with_value(&mut self, flag: &str) {
        if let Some(i) = self.args.iter().position(|a| a == flag) {
            self.args.drain(i..(i + 2).min(self.args.len()));
        }
    }

    /// Describe a daemon (not started yet). `args` is everything after the binary name.
    pub(crate) fn new(
        label: &str,
        args: Vec<std::ffi::OsString>,
        log_path: PathBuf,
        control: PathBuf,
        nbd_socket: Option<PathBuf>,
    ) -> Daemon {
        Daemon {
            label: label.into(),
            args,
            log_level: "info,blkmirror=debug".into(),
            log_path,
            control,
            nbd_socket,
            child: None,
            starts: 0,
            envs: Vec::new(),
        }
    }

    /// Start the process (it must not be running) and wait until its control socket answers
    /// (and its NBD socket, for a primary). Panics with the log if it exits meanwhile.
    pub(crate) fn start(&mut self) {
        assert!(!self.is_running(), "{} is already running", self.label);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open daemon log");
        let child = Command::new(BIN)
            .args(&self.args)
            .env("BLKMIRROR_LOG", &self.log_level)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.label));
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "{} exited during startup ({status}); log:\n{}",
                    self.label,
                    tail_lines(&self.log(), 40)
                );
            }
            let nbd_ok = self.nbd_socket.as_deref().is_none_or(|s| probe(s).is_ok());
            if nbd_ok && query_status(&self.control).is_some() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} never became ready; log:\n{}",
                    self.label,
                    tail_lines(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub(crate) fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Send `sig` to the running process.
    pub(crate) fn signal(&self, sig: Signal) {
        signal(self.child.as_ref().expect("daemon is not running"), sig);
    }

    /// `kill -9` and reap.
    pub(crate) fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon is not running");
        signal(&child, Signal::SIGKILL);
        let _ = child.wait();
    }

    /// SIGTERM and wait up to 5 s, then SIGKILL. Returns the exit status (None if it was not
    /// running).
    pub(crate) fn stop(&mut self) -> Option<ExitStatus> {
        terminate(self.child.take()?, &self.label)
    }

    /// The status document from the control socket (None if the daemon does not answer).
    pub(crate) fn status(&self) -> Option<serde_json::Value> {
        query_status(&self.control)
    }

    /// Everything every run of this daemon has logged.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Wait (up to `timeout`) until the log contains `needle` at least `count` times.
    pub(crate) fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}), last 60 lines ----\n{}\n----",
                self.label,
                self.log_path.display(),
                tail_lines(&self.log(), 60)
            );
        }
    }
}

/// Compare two files byte for byte; Err describes the first difference.
pub(crate) fn compare_files(a: &Path, b: &Path) -> Result<(), String> {
    let mut fa = File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mut fb = File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let la = fa.metadata().map_err(|e| e.to_string())?.len();
    let lb = fb.metadata().map_err(|e| e.to_string())?.len();
    if la != lb {
        return Err(format!(
            "{} has {la} bytes, {} has {lb}",
            a.display(),
            b.display()
        ));
    }
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    let mut differing = 0u64;
    let mut first = None;
    while pos < la {
        let n = (la - pos).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).map_err(|e| e.to_string())?;
        fb.read_exact(&mut bb[..n]).map_err(|e| e.to_string())?;
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
                if x != y {
                    differing += 1;
                    first.get_or_insert(pos + (i as u64) * 4096);
                }
            }
        }
        pos += n as u64;
    }
    match first {
        None => Ok(()),
        Some(at) => Err(format!(
            "{} and {} differ: {differing} 4 KiB blocks, the first at offset {at}",
            a.display(),
            b.display()
        )),
    }
}

impl LoopDev {
    /// A read-only loop device over a file.
    pub(crate) fn attach_ro(file: &Path) -> LoopDev {
        let out = run(
            "losetup",
            &["-f", "--show", "--read-only", file.to_str().unwrap()],
        );
        LoopDev {
            dev: out.trim().to_string(),
        }
    }
}

impl Mount {
    /// `mount -o OPTIONS DEV DIR`.
    pub(crate) fn with_options(dev: &str, dir: &Path, options: &str) -> Mount {
        std::fs::create_dir_all(dir).expect("create mount point");
        run("mount", &["-o", options, dev, dir.to_str().unwrap()]);
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }
}

/// Send `sig` to a child process (not yet reaped, so its pid is still its own).
pub(crate) fn signal(child: &Child, sig: Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, sig);
}

/// SIGTERM a child and wait up to 5 s, then SIGKILL it. Returns its exit status.
pub(crate) fn terminate(mut child: Child, label: &str) -> Option<ExitStatus> {
    if let Ok(None) = child.try_wait() {
        signal(&child, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{label} ignored SIGTERM for 5 s; killing it");
        let _ = child.kill();
    }
    child.wait().ok()
}

// ------------------------------------------------------------------------------------------
// Small generic helpers: a tmpfs, filling a file system, file modes, CLI exit codes, and a
// background client.
// ------------------------------------------------------------------------------------------

/// A tmpfs of a given size mounted at a directory (created); unmounted on Drop (lazily if
/// busy), so a failing test leaves no mount behind.
pub(crate) struct Tmpfs {
    pub dir: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE,mode=0755 tmpfs DIR` (SIZE as mount takes it: `160M`).
    pub(crate) fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create tmpfs mount point");
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// Bytes still free on it.
    pub(crate) fn free_bytes(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.dir).expect("statvfs");
        s.blocks_available() as u64 * s.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        umount_quietly(&self.dir);
    }
}

/// tools/faultyfs.py mounted at a directory (created): a pass-through FUSE file system over a
/// backing directory beside it that fails the operations its rules name (a log's disk that
/// fails fsync or writes, which these machines cannot make with a device mapper). Unmounted on
/// Drop, so a failing test leaves no mount behind.
pub(crate) struct FaultyFs {
    pub dir: PathBuf,
    rules: PathBuf,
    log: PathBuf,
    child: Child,
}

impl FaultyFs {
    /// Mount it at `dir`; its files live in `dir`.backing, its rules file and log beside it.
    pub(crate) fn mount(dir: &Path) -> FaultyFs {
        let side = |ext: &str| dir.with_extension(ext);
        let backing = side("backing");
        std::fs::create_dir_all(dir).expect("create the mount point");
        std::fs::create_dir_all(&backing).expect("create the backing directory");
        let log = side("faultyfs.log");
        let child = Command::new("/usr/bin/python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/faultyfs.py"))
            .arg(&backing)
            .arg(dir)
            .arg("--faults")
            .arg(side("rules"))
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the faultyfs log"))
            .spawn()
            .expect("start tools/faultyfs.py (python3-fusepy installed? tools/setup.sh)");
        let mut fs = FaultyFs {
            dir: dir.to_path_buf(),
            rules: side("rules"),
            log,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mount_point(dir) {
            if let Ok(Some(status)) = fs.child.try_wait() {
                panic!(
                    "faultyfs exited with {status} before mounting:\n{}",
                    fs.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "faultyfs did not mount:\n{}",
                fs.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        fs
    }

    /// Fail what `rules` names from now on (`OPERATION ERRNO GLOB` lines, tools/faultyfs.py),
    /// in place of any rules before.
    pub(crate) fn fail(&self, rules: &str) {
        let tmp = self.rules.with_extension("new");
        std::fs::write(&tmp, rules).unwrap();
        std::fs::rename(&tmp, &self.rules).unwrap();
    }

    /// No more faults.
    pub(crate) fn heal(&self) {
        let _ = std::fs::remove_file(&self.rules);
    }

    /// What it said: one `faultyfs: OPERATION PATH -> ERRNO` line per failed call.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many calls it failed so far.
    pub(crate) fn failures(&self) -> usize {
        self.log().lines().filter(|l| l.contains(" -> ")).count()
    }
}

impl Drop for FaultyFs {
    fn drop(&mut self) {
        umount_quietly(&self.dir);
        // Unmounted, the file system's process ends by itself.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `dir` is a mount point (in this process's mount table).
fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap_or_default()))
}

/// Write zeroes to a new file at `path` until its file system says ENOSPC (1 MiB writes, then
/// 4 KiB ones for the rest); returns the bytes written. Removing the file frees the space.
pub(crate) fn fill_file_system(path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).expect("create filler file");
    let mut at = 0u64;
    for piece in [1usize << 20, 4096] {
        let buf = vec![0u8; piece];
        loop {
            match f.write_at(&buf, at) {
                Ok(0) => break,
                Ok(n) => at += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    at
}

/// Permission bits (`mode & 0o777`) of a file or directory.
pub(crate) fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `blkmirror ARGS...`: (exit code, stdout, stderr), whatever the exit code.
pub(crate) fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let o = run_output(BIN, args, None);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A client running in the background, its stdout and stderr going to a file; killed on Drop
/// if still running.
pub(crate) struct Background {
    what: String,
    child: Option<Child>,
    out: PathBuf,
}

impl Background {
    pub(crate) fn spawn(what: &str, mut c: Command, out: &Path) -> Background {
        let f = File::create(out).expect("create output file");
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().expect("dup output file")))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Background {
            what: what.into(),
            child: Some(child),
            out: out.to_path_buf(),
        }
    }

    /// Its process, to signal it.
    pub(crate) fn child_for_test(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    /// What it printed so far.
    pub(crate) fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("try_wait").is_none())
    }

    /// Wait for its exit (killed, and panicking, after [`CLIENT_TIMEOUT`]).
    pub(crate) fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("already waited");
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} still running after {CLIENT_TIMEOUT:?}; output:\n{}",
                    self.what,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for its exit, which must be a success.
    pub(crate) fn wait_success(&mut self) {
        let s = self.wait();
        assert!(
            s.success(),
            "{} exited with {s}; output:\n{}",
            self.what,
            self.output()
        );
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
