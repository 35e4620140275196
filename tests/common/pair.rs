//! A replicating pair on this machine: certificates, one `blkmirror mirror` and one `blkmirror
//! primary` (real processes, QUIC with mutual TLS on 127.0.0.1) for volume [`VOL`], their
//! images and state directories in a fresh temporary directory, and what the replication tests
//! check with: status documents, waits on conditions, `blkmirror recover` and a byte-for-byte
//! comparison of the images.
//!
//! No timed assertions: every wait is for a condition (polled every 100 ms with a generous
//! timeout) and a timeout fails with the last status documents and log lines of every daemon
//! involved.

use super::*;
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The volume every pair replicates.
pub(crate) const VOL: &str = "vol1";

/// Generous bound for conditions that normally take a few seconds (debug build, 2 cores, other
/// tests running at the same time).
/// tools/workload.py's block size, and the blocks of the default 64 MiB volume.
pub(crate) const BLOCK: u64 = 4096;
pub(crate) const BLOCKS: u64 = 64 * MIB / BLOCK;

/// A script of tools/.
pub(crate) fn tool(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join(name)
}

pub(crate) const LONG: Duration = Duration::from_secs(180);

pub(crate) fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

/// volumes[0] of a status document (Null when the daemon does not answer).
pub(crate) fn vol0(status: &Option<Value>) -> Value {
    status
        .as_ref()
        .map(|s| s["volumes"][0].clone())
        .unwrap_or(Value::Null)
}

/// A number of a status document (0 when it is missing or null).
pub(crate) fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Poll the daemons every 100 ms until `cond(their volumes[0])` holds; on timeout, panic with
/// each one's last status and log tail.
pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    daemons: &[&Daemon],
    mut cond: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let vols: Vec<Value> = daemons.iter().map(|d| vol0(&d.status())).collect();
        if cond(&vols) {
            return vols;
        }
        if Instant::now() > deadline {
            let mut msg = format!("timed out after {timeout:?} waiting for: {what}\n");
            for (d, v) in daemons.iter().zip(&vols) {
                msg.push_str(&format!(
                    "--- last {} status ---\n{}\n--- {} log (last 30 lines) ---\n{}\n",
                    d.label,
                    serde_json::to_string_pretty(v).unwrap(),
                    d.label,
                    tail_lines(&d.log(), 30)
                ));
            }
            panic!("{msg}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM a daemon; it must exit with status 0 (if it was running).
pub(crate) fn stop_ok(d: &mut Daemon) {
    if let Some(status) = d.stop() {
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM; log:\n{}",
            d.label,
            tail_lines(&d.log(), 30)
        );
    }
}

/// `nbd+unix:///vol1?socket=SOCK`.
pub(crate) fn uri_of(sock: &Path) -> String {
    format!("nbd+unix:///{VOL}?socket={}", sock.display())
}

/// libnbd: write the bytes of file argv[2] at offset argv[3], then FLUSH.
pub(crate) const NBD_WRITE: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = open(sys.argv[2], 'rb').read()
off = int(sys.argv[3])
step = 4 << 20
for i in range(0, len(data), step):
    h.pwrite(data[i:i + step], off + i)
h.flush()
h.shutdown()
"#;

/// Write `data` at `offset` of the export at `uri` through libnbd, then FLUSH (the data goes
/// through a file in `scratch`).
pub(crate) fn nbd_write_to(uri: &str, scratch: &Path, offset: u64, data: &[u8]) {
    let path = scratch.join(format!("data-{offset}-{}.bin", data.len()));
    std::fs::write(&path, data).unwrap();
    python(
        NBD_WRITE,
        &[uri, path.to_str().unwrap(), &offset.to_string()],
    );
    std::fs::remove_file(&path).unwrap();
}

/// What a [`Pair`] looks like; the default is a 64 MiB volume, a mirror on a free UDP port,
/// the primary replicating to it directly, both state directories on the temporary directory.
pub(crate) struct PairOptions {
    /// Size of the volume on both sides (sparse).
    pub size: u64,
    /// The mirror's UDP port (default: a free one).
    pub mirror_port: Option<u16>,
    /// `--mirror` of the primary (default: the mirror's listen address; e.g. a relay's).
    pub mirror_addr: Option<String>,
    /// Extra arguments of the primary.
    pub primary_extra: Vec<String>,
    /// Put the primary's state directory on a tmpfs of this size (`mount -o size=`).
    pub primary_tmpfs: Option<&'static str>,
    /// Put the mirror's state directory on a tmpfs of this size.
    pub mirror_tmpfs: Option<&'static str>,
    /// Put the primary's journals or the mirror's redo logs on a [`FaultyFs`] ([`Pair::faulty`]),
    /// for a log disk that fails.
    pub faulty_log: Option<FaultyLog>,
}

/// Whose logs [`PairOptions::faulty_log`] puts on a [`FaultyFs`].
pub(crate) enum FaultyLog {
    /// The primary's `STATE/journal`.
    PrimaryJournal,
    /// The mirror's `STATE/redo`.
    MirrorRedo,
    /// The mirror's `STATE/history` (the mirror needs `--history`).
    MirrorHistory,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            size: 64 * MIB,
            mirror_port: None,
            mirror_addr: None,
            primary_extra: Vec::new(),
            primary_tmpfs: None,
            mirror_tmpfs: None,
            faulty_log: None,
        }
    }
}

/// The primary's arguments for a journal of `size` that makes writes wait when it is full
/// (`--on-journal-full block`), for the tests of waiting writers.
pub(crate) fn blocking_journal(size: &str) -> Vec<String> {
    ["--journal-size", size, "--on-journal-full", "block"]
        .map(String::from)
        .to_vec()
}

/// Certificates, one mirror, one primary (both described by [`Pair::new`], neither started).
pub(crate) struct Pair {
    // Fields drop in declaration order: the daemons stop, then the tmpfs mounts go, then the
    // directory.
    pub primary: Daemon,
    pub mirror: Daemon,
    pub size: u64,
    /// The mirror's UDP port.
    pub port: u16,
    /// The CA, and the certificates named "primary" and "mirror".
    pub pki: PathBuf,
    pub primary_img: PathBuf,
    pub mirror_img: PathBuf,
    pub primary_state: PathBuf,
    pub mirror_state: PathBuf,
    pub nbd_sock: PathBuf,
    /// The file system of [`PairOptions::faulty_log`] (unmounted before the tmpfs it may
    /// stand on).
    pub faulty: Option<FaultyFs>,
    /// The tmpfs mounts of [`PairOptions::primary_tmpfs`] and [`PairOptions::mirror_tmpfs`],
    /// the primary's first.
    pub tmpfs: Vec<Tmpfs>,
    dir: tempfile::TempDir,
}

impl Pair {
    /// Certificates and both daemons, described but not started (so a test can prepare a
    /// volume or a state directory first), in a new directory /tmp/bm-TESTFILE-*.
    /// A pair with both daemons started and the initial copy done (the mirror consistent,
    /// the link up).
    pub(crate) fn running(opts: PairOptions) -> Pair {
        let mut p = Pair::new(opts);
        p.mirror.start();
        p.primary.start();
        p.wait_consistent();
        p
    }

    pub(crate) fn new(opts: PairOptions) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix(concat!("bm-", env!("CARGO_CRATE_NAME"), "-"))
            .tempdir_in("/tmp")
            .expect("create temp dir");
        let d = dir.path().to_path_buf();
        let pki = d.join("pki");
        certs_init(&pki, &["primary", "mirror"]);
        let port = opts.mirror_port.unwrap_or_else(free_udp_port);
        let mut tmpfs = Vec::new();
        let mut state_dir = |name: &str, on_tmpfs: Option<&str>| match on_tmpfs {
            None => d.join(name),
            Some(size) => {
                let t = Tmpfs::mount(&d.join(format!("{name}-fs")), size);
                let state = t.dir.join("state");
                tmpfs.push(t);
                state
            }
        };
        let primary_state = state_dir("primary-state", opts.primary_tmpfs);
        let mirror_state = state_dir("mirror-state", opts.mirror_tmpfs);
        let faulty = opts.faulty_log.map(|at| {
            FaultyFs::mount(&match at {
                FaultyLog::PrimaryJournal => primary_state.join("journal"),
                FaultyLog::MirrorRedo => mirror_state.join("redo"),
                FaultyLog::MirrorHistory => mirror_state.join("history"),
            })
        });
        let mirror_img = d.join("mirror.img");
        let primary_img = d.join("primary.img");
        let nbd_sock = d.join("nbd.sock");
        let mut pair = Pair {
            primary: Daemon::new("primary", Vec::new(), PathBuf::new(), PathBuf::new(), None),
            mirror: Daemon::new("mirror", Vec::new(), PathBuf::new(), PathBuf::new(), None),
            size: opts.size,
            port,
            pki,
            primary_img,
            mirror_img,
            primary_state,
            mirror_state,
            nbd_sock,
            tmpfs,
            faulty,
            dir,
        };
        pair.mirror = pair.mirror_daemon(
            "mirror",
            &pair.mirror_img.clone(),
            &pair.mirror_state.clone(),
            port,
        );
        let mirror_addr = opts
            .mirror_addr
            .unwrap_or_else(|| format!("127.0.0.1:{port}"));
        let args = pair.primary_args(
            &pair.primary_img,
            &pair.nbd_sock,
            &pair.primary_state,
            &mirror_addr,
            &pair.pki,
            "primary",
            &opts.primary_extra,
        );
        pair.primary = Daemon::new(
            "primary",
            args,
            d.join("primary.log"),
            pair.primary_state.join("control.sock"),
            Some(pair.nbd_sock.clone()),
        );
        pair
    }

    /// The temporary directory (for scratch files and daemons of a test's own).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A mirror daemon (not started) for volume `img` with state in `state`, on `port`.
    pub(crate) fn mirror_daemon(&self, label: &str, img: &Path, state: &Path, port: u16) -> Daemon {
        let mut a = vec![
            os("mirror"),
            os("--listen"),
            os(format!("127.0.0.1:{port}")),
            os("--volume"),
            os(format!("{VOL}={},size={}", img.display(), self.size)),
            os("--state-dir"),
            os(state),
        ];
        a.extend(tls_args(&self.pki, "mirror"));
        a.extend([os("--peer-name"), os("primary")]);
        Daemon::new(
            label,
            a,
            self.dir().join(format!("{label}.log")),
            state.join("control.sock"),
            None,
        )
    }

    /// The arguments of a `blkmirror primary` replicating volume `img` to `mirror`: it trusts
    /// the pair's CA and presents certificate `cert_name` of the CA in `cert_dir`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn primary_args(
        &self,
        img: &Path,
        sock: &Path,
        state: &Path,
        mirror: &str,
        cert_dir: &Path,
        cert_name: &str,
        extra: &[String],
    ) -> Vec<OsString> {
        let mut a = vec![
            os("primary"),
            os("--volume"),
            os(format!("{VOL}={},size={}", img.display(), self.size)),
            os("--nbd-unix"),
            os(sock),
            os("--state-dir"),
            os(state),
            os("--mirror"),
            os(mirror),
            os("--ca"),
            os(self.pki.join("ca.crt")),
            os("--cert"),
            os(cert_dir.join(format!("{cert_name}.crt"))),
            os("--key"),
            os(cert_dir.join(format!("{cert_name}.key"))),
            os("--peer-name"),
            os("mirror"),
        ];
        a.extend(extra.iter().map(os));
        a
    }

    /// A primary daemon (not started) for volume `img`, replicating to the mirror on `port`
    /// with the certificate named "primary".
    pub(crate) fn primary_daemon(
        &self,
        label: &str,
        img: &Path,
        state: &Path,
        sock: &Path,
        port: u16,
        extra: &[String],
    ) -> Daemon {
        let a = self.primary_args(
            img,
            sock,
            state,
            &format!("127.0.0.1:{port}"),
            &self.pki,
            "primary",
            extra,
        );
        Daemon::new(
            label,
            a,
            self.dir().join(format!("{}.log", label.replace(' ', "-"))),
            state.join("control.sock"),
            Some(sock.to_path_buf()),
        )
    }

    /// The primary's export.
    pub(crate) fn uri(&self) -> String {
        uri_of(&self.nbd_sock)
    }

    /// The mirror's listen address.
    pub(crate) fn mirror_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// (mirror volume, primary volume) of the current status documents (Null if down).
    pub(crate) fn vols(&self) -> (Value, Value) {
        (vol0(&self.mirror.status()), vol0(&self.primary.status()))
    }

    /// Poll both daemons until `cond(mirror_volume, primary_volume)` holds (see [`wait_for`]).
    pub(crate) fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Value, &Value) -> bool,
    ) -> (Value, Value) {
        let v = wait_for(what, timeout, &[&self.mirror, &self.primary], |v| {
            cond(&v[0], &v[1])
        });
        (v[0].clone(), v[1].clone())
    }

    /// The initial copy is done and the mirror is consistent; the link is up.
    pub(crate) fn wait_consistent(&self) -> (Value, Value) {
        self.wait("mirror consistent, link up", LONG, |m, p| {
            m["consistent"] == true && p["link"] == "up" && p["initial_copy"].is_null()
        })
    }

    /// Everything written so far is durable at the mirror (lag 0) and applied there, and both
    /// sides say they are replicating.
    pub(crate) fn wait_synced(&self) -> (Value, Value) {
        self.wait(
            "lag 0: link up, everything acknowledged and applied, both replicating",
            LONG,
            synced,
        )
    }

    /// SIGTERM both; both must exit with status 0.
    pub(crate) fn stop_both(&mut self) {
        for d in [&mut self.primary, &mut self.mirror] {
            stop_ok(d);
        }
    }

    /// `blkmirror recover --json` on the mirror's volume (the mirror must be stopped).
    pub(crate) fn recover(&self) -> Value {
        let out = run(
            BIN,
            &[
                "recover",
                "--volume",
                &format!("{VOL}={}", self.mirror_img.display()),
                "--state-dir",
                self.mirror_state.to_str().unwrap(),
                "--json",
            ],
        );
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("recover --json printed {out:?}: {e}"));
        v[0].clone()
    }

    /// Stop both, recover the mirror, and require it consistent and byte-identical to the
    /// primary; returns the recover report.
    pub(crate) fn finish_and_compare(&mut self) -> Value {
        self.stop_both();
        let report = self.recover();
        assert_eq!(
            report["consistent"], true,
            "recover says the mirror is not consistent: {report}"
        );
        if let Err(e) = compare_files(&self.primary_img, &self.mirror_img) {
            panic!(
                "mirror differs from primary after stop + recover: {e}\nrecover: {report}\n\
                 --- mirror log ---\n{}\n--- primary log ---\n{}",
                tail_lines(&self.mirror.log(), 40),
                tail_lines(&self.primary.log(), 40)
            );
        }
        report
    }

    /// How many times the primary's log says a full copy (or a comparison, which logs the same
    /// line) started.
    pub(crate) fn full_copies(&self) -> usize {
        self.primary.log().matches("full copy starts").count()
    }

    /// Write `data` at `offset` of the primary's volume through libnbd, then FLUSH.
    pub(crate) fn nbd_write(&self, offset: u64, data: &[u8]) {
        nbd_write_to(&self.uri(), self.dir(), offset, data);
    }

    /// What must not change while the mirror refuses or is not shipped to: its image and
    /// what it says it holds.
    pub(crate) fn mirror_holds(&self) -> (String, Value, Value, Value) {
        let m = vol0(&self.mirror.status());
        (
            sha256(&self.mirror_img),
            m["acked_set"].clone(),
            m["applied_set"].clone(),
            m["durable_seq"].clone(),
        )
    }
}

/// Lag 0: link up, everything acknowledged and applied, both replicating.
pub(crate) fn synced(m: &Value, p: &Value) -> bool {
    p["link"] == "up"
        && p["state"] == "replicating"
        && m["state"] == "replicating"
        && p["lag_bytes"] == 0
        && p["initial_copy"].is_null()
        && m["consistent"] == true
        && m["acked_set"] == p["acked_set"]
        && m["applied_set"] == m["acked_set"]
}
