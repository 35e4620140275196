//! The mirror daemon: opens (and recovers) its volumes, listens for authenticated primaries,
//! serves its control socket, runs until SIGINT or SIGTERM.

use crate::control;
use crate::daemon::{self, DaemonError, Signals};
use crate::disk::spec::VolumeSpec;
use crate::repl::export::PointInTime;
use crate::repl::mirror::{fmt_time, Mirror, MirrorVolume};
use crate::transport::{Identity, TlsFiles, Tuning};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct MirrorOptions {
    pub listen: String,
    pub volumes: Vec<VolumeSpec>,
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    pub tuning: Tuning,
    pub control: Option<PathBuf>,
    /// Keep a history of each volume (`--history`, `--history-size`).
    pub history: Option<crate::repl::history::Retention>,
}

/// The QUIC stateless-reset key, created once per state directory (mode 0600).
fn reset_key(state_dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
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

pub fn run(opts: MirrorOptions) -> Result<(), DaemonError> {
    let signals = Signals::block()?;
    if opts.volumes.is_empty() {
        return Err(DaemonError::NoVolumes);
    }
    let _lock = daemon::lock_state_dir(&opts.state_dir)?;
    let listen = daemon::resolve("--listen", &opts.listen)?;
    let identity = Identity::load(&opts.tls)?;
    let mirror = Mirror::open(
        &crate::env::os(),
        &opts.volumes,
        &opts.state_dir,
        opts.history,
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
    let endpoint = {
        let _rt = runtime.enter();
        let key = reset_key(&opts.state_dir)?;
        crate::transport::server_endpoint_with_reset_key(listen, &identity, &opts.tuning, &key)?
    };
    runtime.spawn(mirror.clone().serve(endpoint.clone()));
    let control = opts
        .control
        .clone()
        .unwrap_or_else(|| control::default_path(&opts.state_dir));
    let m = mirror.clone();
    let exports = Exports::start(opts.state_dir.join("exports"));
    let ex = exports.clone();
    let control_socket = daemon::serve_control(
        &control,
        std::sync::Arc::new(move |words: &[&str]| {
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
                "status, history [NAME], export NAME set=N|at=MS PATH PID [writable], unexport PATH",
            ),
        }
        }),
    )?;
    tracing::info!(%listen, peer = %opts.tls.peer_name, volumes = opts.volumes.len(), "mirror listening");
    let sig = signals.wait_for_termination()?;
    tracing::info!(signal = %sig, "shutting down");
    drop(control_socket);
    exports.stop_all();
    endpoint.close(0u32.into(), b"mirror shutting down");
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // What was received is made durable, applied and checkpointed: a clean stop.
    mirror.close();
    Ok(())
}
