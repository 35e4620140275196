//! The mirror daemon: opens (and recovers) its volumes, listens for authenticated primaries,
//! serves its control socket, runs until SIGINT or SIGTERM.

use crate::control;
use crate::daemon::{self, DaemonError, Event, RoleRequest};
use crate::disk::spec::VolumeSpec;
use crate::node::{Ctx, Link, Outcome};
use crate::repl::export::PointInTime;
use crate::repl::mirror::{fmt_time, Mirror, MirrorVolume};
use crate::repl::role::Role;
use crate::transport::{Identity, TlsFiles, Tuning};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct MirrorOptions {
    /// Who dials: `--listen` (a mirror's command line: its primary dials), or `--mirror` (a
    /// demoted primary's: it dials its peer and asks for the volumes, `Message::Pull`).
    pub peer: crate::node::Link,
    /// Where it serves its volumes once promoted (checked free before a promotion commits;
    /// None: `--nbd-unix` not given, it cannot be promoted).
    pub nbd_unix: Option<std::path::PathBuf>,
    pub volumes: Vec<VolumeSpec>,
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    pub tuning: Tuning,
    pub control: Option<PathBuf>,
    /// Keep a history of each volume (`--history`, `--history-size`).
    pub history: Option<crate::repl::history::Retention>,
}

/// The QUIC stateless-reset key, created once per state directory (mode 0600).
pub fn reset_key(state_dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("quic-reset.key");
    match std::fs::read(&path) {
        Ok(k) if k.len() == 32 => return Ok(k),
        Ok(_) => tracing::warn!(path = %path.display(), "malformed reset key replaced"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut key = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| std::io::Error::other("no randomness for the reset key"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(&key)?;
    f.sync_all()?;
    Ok(key)
}

/// Points of history served over NBD (`blkmirror export`), by socket path.
#[derive(Clone)]
struct Exports {
    served: Arc<Mutex<HashMap<PathBuf, Served>>>,
    /// Where writable exports keep their overlays.
    overlay_dir: PathBuf,
}

struct Served {
    server: Arc<crate::nbd::server::Server>,
    _socket: daemon::SocketFile,
    volume: Arc<MirrorVolume>,
    set: u64,
    /// The `blkmirror export` process that asked: the export ends when it is gone.
    pid: u32,
}

impl Served {
    fn stop(self) {
        self.server.shutdown(std::time::Duration::from_secs(5));
        self.volume.unpin_point(self.set);
    }
}

impl Exports {
    /// The registry, and a thread that ends the exports whose process is gone.
    fn start(overlay_dir: PathBuf) -> Exports {
        let e = Exports {
            served: Arc::default(),
            overlay_dir,
        };
        let watch = e.clone();
        let _ = std::thread::Builder::new()
            .name("export-watch".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let gone: Vec<Served> = {
                    let mut s = watch.served.lock().unwrap();
                    let dead: Vec<PathBuf> = s
                        .iter()
                        .filter(|(_, v)| !alive(v.pid))
                        .map(|(k, _)| k.clone())
                        .collect();
                    dead.iter().filter_map(|k| s.remove(k)).collect()
                };
                for v in gone {
                    tracing::info!(volume = %v.volume.name, set = v.set, "export ended: its blkmirror export process is gone");
                    v.stop();
                }
            });
        e
    }

    /// `export NAME set=N|at=MS PATH PID [writable]`.
    fn export(
        &self,
        m: &Mirror,
        name: &str,
        point: &str,
        path: &str,
        pid: &str,
        writable: bool,
    ) -> serde_json::Value {
        let usage = |why: String| serde_json::json!({ "error": why, "code": "usage" });
        let Some(volume) = m.volumes.iter().find(|v| v.name == name).cloned() else {
            return usage(format!("no volume named {name:?}"));
        };
        let (set, at) = match point.split_once('=') {
            Some(("set", n)) => (n.parse().ok(), None),
            Some(("at", t)) => (None, t.parse().ok()),
            _ => (None, None),
        };
        let Ok(pid) = pid.parse::<u32>() else {
            return usage(format!("bad process id {pid:?}"));
        };
        if set.is_none() && at.is_none() {
            return usage(format!("bad point {point:?} (set=N or at=UNIX_MS)"));
        }
        let path = PathBuf::from(path);
        if self.served.lock().unwrap().contains_key(&path) {
            return serde_json::json!({ "error": format!("{} is served already", path.display()), "code": "busy" });
        }
        let point = match volume.pin_point(set, at) {
            Ok(p) => p,
            Err(e) => return serde_json::json!({ "error": e.to_string(), "code": "not-found" }),
        };
        let served = (|| -> Result<Served, String> {
            let overlay = writable.then_some(self.overlay_dir.as_path());
            let storage =
                PointInTime::new(volume.clone(), point, overlay).map_err(|e| e.to_string())?;
            let export = crate::nbd::server::Export {
                info: crate::nbd::handshake::ExportInfo {
                    name: name.to_string(),
                    size: volume.size,
                    read_only: !writable,
                    description: format!(
                        "{name} at set {} ({})",
                        point.set,
                        fmt_time(point.time_ms).unwrap_or_default()
                    ),
                },
                volume: Arc::new(crate::volume::Volume {
                    name: name.to_string(),
                    storage: Arc::new(storage),
                    journal: None,
                    locks: Arc::new(crate::disk::ranges::RangeLocks::new()),
                }),
            };
            let limits = crate::nbd::server::Limits {
                max_connections: crate::nbd::server::DEFAULT_MAX_CONNECTIONS,
                handshake_timeout: crate::nbd::server::DEFAULT_HANDSHAKE_TIMEOUT,
            };
            let server = crate::nbd::server::Server::new(vec![export], limits);
            let (listener, socket) = daemon::bind_unix(&path).map_err(|e| e.to_string())?;
            server.spawn_unix(listener).map_err(|e| e.to_string())?;
            Ok(Served {
                server,
                _socket: socket,
                volume: volume.clone(),
                set: point.set,
                pid,
            })
        })();
        match served {
            Ok(s) => {
                tracing::info!(volume = %name, set = point.set, socket = %path.display(), writable,
                    "serving a point of the history");
                self.served.lock().unwrap().insert(path.clone(), s);
                serde_json::json!({
                    "ok": true,
                    "result": "serving",
                    "set": point.set,
                    "time": fmt_time(point.time_ms),
                    "seq": point.seq,
                    "writable": writable,
                })
            }
            Err(why) => {
                volume.unpin_point(point.set);
                serde_json::json!({ "error": why, "code": "io" })
            }
        }
    }

    /// `unexport PATH`.
    fn unexport(&self, path: &str) -> serde_json::Value {
        match self
            .served
            .lock()
            .unwrap()
            .remove(std::path::Path::new(path))
        {
            Some(s) => {
                tracing::info!(volume = %s.volume.name, set = s.set, socket = %path, "export ended");
                s.stop();
                serde_json::json!({ "ok": true, "result": "stopped" })
            }
            None => {
                serde_json::json!({ "ok": true, "result": "already", "message": format!("nothing is served on {path}") })
            }
        }
    }

    fn stop_all(&self) {
        let all: Vec<Served> = self
            .served
            .lock()
            .unwrap()
            .drain()
            .map(|(_, v)| v)
            .collect();
        for v in all {
            v.stop();
        }
    }
}

/// Whether process `pid` still runs (a zombie, dead but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X')),
        Err(_) => false,
    }
}

/// `history [NAME]`: each volume's recoverable points, oldest first (keys are a contract).
fn history(m: &Mirror, name: Option<&str>) -> serde_json::Value {
    let chosen: Vec<_> = m
        .volumes
        .iter()
        .filter(|v| name.is_none_or(|n| n == v.name))
        .collect();
    if chosen.is_empty() {
        return serde_json::json!({
            "error": format!("no volume named {:?}", name.unwrap_or("")),
            "code": "usage",
        });
    }
    let vols: Vec<serde_json::Value> = chosen.iter().filter_map(|v| v.history_listing()).collect();
    if vols.is_empty() {
        return serde_json::json!({
            "error": "this mirror keeps no history (start it with --history DURATION)",
            "code": "usage",
        });
    }
    serde_json::json!({ "volumes": vols })
}

/// Run as a secondary until stopped or promoted (`node::run` calls it with the lock held).
pub fn run_role(opts: &MirrorOptions, ctx: &Ctx<'_>) -> Result<Outcome, DaemonError> {
    // The address first: a typo is a usage error whatever the certificates.
    match &opts.peer {
        Link::Listen(a) => daemon::resolve("--listen", a)?,
        Link::Dial(a) => daemon::resolve("--mirror", a)?,
    };
    let identity = Arc::new(Identity::load(&opts.tls)?);
    let mirror = Mirror::open(
        &crate::env::os(),
        &opts.volumes,
        &opts.state_dir,
        opts.history.clone(),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        // The two workers receive for every volume: they weigh more the more volumes there are,
        // as on the primary (`daemon::network_nice`, issue 13).
        .on_thread_park({
            let nice = daemon::network_nice(opts.volumes.len());
            move || daemon::prioritize_network_thread(nice)
        })
        .thread_name("repl")
        .build()?;
    let endpoint = match &opts.peer {
        Link::Listen(addr) => {
            let listen = daemon::resolve("--listen", addr)?;
            let _rt = runtime.enter();
            let key = reset_key(&opts.state_dir)?;
            let ep = crate::transport::server_endpoint_with_reset_key(
                listen,
                &identity,
                &opts.tuning,
                &key,
            )?;
            runtime.spawn(mirror.clone().serve(ep.clone()));
            tracing::info!(%listen, peer = %opts.tls.peer_name, volumes = opts.volumes.len(), "mirror listening");
            ep
        }
        Link::Dial(addr) => {
            let peer = daemon::resolve("--mirror", addr)?;
            let ep = {
                let _rt = runtime.enter();
                crate::transport::client_endpoint(&identity, &opts.tuning)?
            };
            for vol in &mirror.volumes {
                runtime.spawn(pull_loop(
                    mirror.clone(),
                    vol.clone(),
                    ep.clone(),
                    peer,
                    identity.clone(),
                ));
            }
            tracing::info!(%peer, peer_name = %opts.tls.peer_name, volumes = opts.volumes.len(),
                "secondary: asking the peer for the volumes");
            ep
        }
    };
    let m = mirror.clone();
    let exports = Exports::start(opts.state_dir.join("exports"));
    let ex = exports.clone();
    ctx.control.install(std::sync::Arc::new(move |words: &[&str]| {
            match words {
            ["status"] => {
                let vols: Vec<_> = m.volumes.iter().map(|v| v.status()).collect();
                serde_json::json!({ "role": "mirror", "volumes": vols })
            }
            ["history", rest @ ..] if rest.len() <= 1 => history(&m, rest.first().copied()),
            ["export", name, point, path, pid, rest @ ..] if rest.len() <= 1 => {
                ex.export(&m, name, point, path, pid, rest.first() == Some(&"writable"))
            }
            ["unexport", path] => ex.unexport(path),
            other => control::unknown(
                other,
                "status, history [NAME], export NAME set=N|at=MS PATH PID [writable], unexport PATH, promote [force] [set=N|at=MS], demote",
            ),
        }
    }))?;
    // A demotion's answer: this side is a secondary, receiving or asking for the volumes.
    ctx.ready();
    let promotion = loop {
        match ctx.signals.wait_for_event()? {
            Event::Stop(sig) => {
                tracing::info!(signal = %sig, "shutting down");
                break None;
            }
            Event::RoleChange => {
                let Some(req) = ctx.desk.take() else { continue };
                if req.to == Role::Secondary {
                    let _ = req.reply.send(serde_json::json!({
                        "ok": true, "result": "already", "role": "secondary",
                        "message": "already a secondary",
                    }));
                    continue;
                }
                // Right after `demote` returns on the peer, its notice (the Pull it sends
                // as a secondary) may still be on its way: a bounded wait for it.
                let deadline = std::time::Instant::now() + PEER_NOTICE_WAIT;
                while !req.force
                    && std::time::Instant::now() < deadline
                    && mirror.volumes.iter().any(|v| v.awaits_peer_notice())
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                match check_promotion(opts, &mirror, req.forced()) {
                    Ok(()) => {
                        // What each peer said it holds, taken now: the pipeline stops next.
                        let notices = mirror
                            .volumes
                            .iter()
                            .filter_map(|v| v.peer_notice().map(|n| (v.name.clone(), n)))
                            .collect::<std::collections::BTreeMap<_, _>>();
                        break Some((req, notices));
                    }
                    Err(why) => {
                        let _ = req
                            .reply
                            .send(serde_json::json!({ "error": why, "code": "wrong-state" }));
                    }
                }
            }
        }
    };
    ctx.control.install_transition(Role::Secondary);
    exports.stop_all();
    endpoint.close(0u32.into(), b"mirror shutting down");
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // What was received is made durable, applied and checkpointed: a clean stop.
    mirror.close();
    let Some((req, notices)) = promotion else {
        return Ok(Outcome::Stopped);
    };
    // The volumes' files are released before the primary's machinery opens them.
    for v in &mirror.volumes {
        v.stop();
    }
    drop(mirror);
    match commit_promotions(opts, &req, &notices) {
        Ok(volumes) => {
            ctx.control.install_transition(Role::Primary);
            let force = req.forced();
            tracing::warn!(volumes = ?volumes, force, "promoted: this daemon is now the primary");
            Ok(Outcome::Switched(
                Role::Primary,
                crate::node::Answer {
                    to: req.reply,
                    answer: serde_json::json!({
                        "ok": true,
                        "result": "promoted",
                        "role": "primary",
                        "force": force,
                        "volumes": volumes,
                    }),
                },
            ))
        }
        Err(why) => {
            tracing::error!("promotion failed: {why}");
            let _ = req
                .reply
                .send(serde_json::json!({ "error": why, "code": "wrong-state" }));
            Ok(Outcome::Again { held: false })
        }
    }
}

/// How long `promote` waits for a peer just demoted to say what it holds.
const PEER_NOTICE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Whether the volumes may be promoted now, before anything stops: the daemon can serve
/// them, no primary is connected, and each holds a consistent copy its peer is known to hold
/// too (or `force`).
fn check_promotion(opts: &MirrorOptions, mirror: &Mirror, force: bool) -> Result<(), String> {
    if opts.nbd_unix.is_none() {
        return Err(
            "this daemon has no --nbd-unix: as a primary it could not serve its volumes \
             (restart it with --nbd-unix PATH, then promote)"
                .into(),
        );
    }
    if let Some(path) = &opts.nbd_unix {
        // Where it will serve must be free: a promotion that cannot serve is not done.
        let (l, f) = daemon::bind_unix(path).map_err(|e| format!("cannot serve there: {e}"))?;
        drop((l, f));
    }
    for v in &mirror.volumes {
        if v.stats.link_up.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(format!(
                "volume {}: its primary is connected and replicating: demote it first \
                 (blkmirror demote on the primary); --force is for a primary that is gone",
                v.name
            ));
        }
        v.promotable(force)?;
    }
    Ok(())
}

/// Each volume's role changes on disk (under the intent, `node::Intent`), after an optional
/// return to a point of its history.
fn commit_promotions(
    opts: &MirrorOptions,
    req: &RoleRequest,
    notices: &std::collections::BTreeMap<String, (crate::repl::identity::GenId, u64)>,
) -> Result<Vec<serde_json::Value>, String> {
    let fs = crate::env::os();
    // Going back to a point of the history gives up every write after it at both sites: the
    // promotion then continues the point, as a forced one does.
    let force = req.forced();
    if let Some((set, at)) = req.point {
        // Every volume must hold the point before any goes back to it.
        if set.is_some() && opts.volumes.len() > 1 {
            return Err(
                "--set names one volume's point (each volume numbers its own sets): use --at \
                 with several volumes"
                    .into(),
            );
        }
        for spec in &opts.volumes {
            let dir = crate::repl::history::Keeper::dir(&opts.state_dir, &spec.name);
            let h = crate::repl::history::History::open(fs.clone(), &dir)
                .map_err(|e| format!("volume {}: no history: {e}", spec.name))?;
            let found = match (set, at) {
                (Some(n), _) => h.points().iter().any(|p| p.set == n),
                (None, Some(t)) => h.point_at(t).is_some(),
                (None, None) => true,
            };
            if !found {
                return Err(format!(
                    "volume {}: its history has no such point (see blkmirror history); \
                     nothing changed",
                    spec.name
                ));
            }
        }
        let to = match (set, at) {
            (Some(n), _) => crate::repl::apply::RecoverTo::Set(n),
            (None, Some(t)) => crate::repl::apply::RecoverTo::At(t),
            (None, None) => crate::repl::apply::RecoverTo::Latest,
        };
        crate::repl::apply::recover(&opts.volumes, &opts.state_dir, to)
            .map_err(|e| e.to_string())?;
    }
    let mut planned = Vec::new();
    for spec in &opts.volumes {
        let storage =
            crate::disk::file::FileStorage::open(spec, crate::disk::file::IoMode::Buffered)
                .map_err(|e| e.to_string())?;
        let disk = crate::disk::Storage::fingerprint(&storage).map_err(|e| e.to_string())?;
        let mut st = crate::repl::apply::VolumeState::load(
            &*fs,
            &crate::repl::apply::VolumeState::path(&opts.state_dir, &spec.name),
        )
        .map_err(|e| e.to_string())?;
        st.peer_demoted = notices.get(&spec.name).copied();
        let gen = crate::repl::identity::GenId::random();
        let (p, next) = crate::repl::role::promoted(&st, gen, &disk, force)
            .map_err(|why| format!("volume {}: {why}", spec.name))?;
        let now = crate::repl::core::primary::unix_ms(std::time::SystemTime::now());
        let rpo = (st.newest_write_ms > 0)
            .then(|| now.saturating_sub(st.newest_write_ms) as f64 / 1000.0);
        let start =
            crate::repl::role::journal_start(&st, next, crate::disk::Storage::size(&storage));
        planned.push((spec.name.clone(), p, start, gen, st.newest_write_ms, rpo));
    }
    crate::node::write_intent(
        &fs,
        &opts.state_dir,
        &crate::node::Intent {
            to: Role::Primary,
            force,
            held: notices.clone(),
            discarded: Default::default(),
        },
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, p, start, gen, newest_write_ms, rpo) in planned {
        crate::repl::role::commit_promotion(
            &fs,
            &opts.state_dir,
            &name,
            &p,
            &start,
            &crate::journal::boot_id(),
            Some(crate::repl::role::HistoryDir {
                fs: &fs,
                dir: crate::repl::history::Keeper::dir(&opts.state_dir, &name),
            }),
        )
        .map_err(|e| format!("volume {name}: {e}"))?;
        out.push(serde_json::json!({
            "name": name,
            "generation": gen,
            "from_seq": start.next_seq - 1,
            "newest_write": fmt_time(newest_write_ms),
            // The writes of the last this many seconds (by the primary's clock) may not be
            // here: what a forced promotion gives up, at most as far as this side knows.
            "rpo_seconds": if force { serde_json::json!(rpo) } else { serde_json::json!(0.0) },
        }));
    }
    crate::node::clear_intent(&fs, &opts.state_dir).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A secondary that dials (a demoted primary): per volume, ask the peer to ship it; again
/// every 2 s while the peer is not a primary (a switchover between its two steps).
async fn pull_loop(
    mirror: Arc<Mirror>,
    vol: Arc<MirrorVolume>,
    endpoint: quinn::Endpoint,
    peer: std::net::SocketAddr,
    identity: Arc<Identity>,
) {
    let mut last = String::new();
    loop {
        let result = match crate::transport::connect(&endpoint, peer, &identity).await {
            Ok(conn) => {
                let r = mirror.clone().pull(conn.clone(), vol.clone()).await;
                conn.close(0u32.into(), b"session over");
                r
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(why) = result {
            if why != last {
                tracing::info!(volume = %vol.name, %peer, "no session with the peer: {why}");
                last = why;
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}
