//! The background process: creates one TUN device in each namespace, runs the data path and
//! answers JSON lines on the control socket (`stats`, `set`, `cut`, `shutdown`).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::forward::{self, Control, Direction};
use crate::link::{Params, Patch};
use crate::sys::{in_netns, now_ns, open_tun};
use crate::{run_ip, Error, Names, TUN_NAME};

/// Everything the daemon needs, passed as one JSON argument by `up`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Config {
    pub names: Names,
    pub params: Params,
    pub seed: u64,
    pub mtu: u32,
    pub max_inflight: usize,
    /// Scheduling priority of the forwarder (nice value, -20..19).
    pub nice: i32,
}

/// A line on the control socket.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub(crate) enum Request {
    Stats,
    Set { params: Patch },
    Cut { secs: f64 },
    Shutdown,
}

struct Daemon {
    cfg: Config,
    ctl: Arc<Control>,
    dirs: Vec<Arc<Direction>>,
    /// `/proc/net/dev` of bm-pri and bm-mir.
    dev: [File; 2],
    started: Instant,
}

/// (rx_dropped, tx_dropped) of the TUN device in a `/proc/net/dev` text.
fn tun_drops(text: &str) -> Option<(u64, u64)> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{TUN_NAME}:")))?;
    let f: Vec<u64> = line
        .split_once(':')?
        .1
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    Some((*f.get(3)?, *f.get(11)?))
}

fn read_all_at(f: &File) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match f.read_at(&mut buf, out.len() as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates TUN `name` inside namespace `ns`, with IPv6 off on it (no router solicitations or
/// MLD reports: only the traffic the user sends crosses the link).
/// Also returns `/proc/net/dev` of that namespace, kept open to read the kernel's own drop
/// counters of the TUN device later.
fn tun_in(ns: &str) -> Result<(File, File), Error> {
    in_netns(ns, || {
        let f = open_tun(TUN_NAME)?;
        let _ = fs::write(
            format!("/proc/sys/net/ipv6/conf/{TUN_NAME}/disable_ipv6"),
            "1",
        );
        let dev = File::open("/proc/thread-self/net/dev")?;
        Ok((f, dev))
    })
    .map_err(|e| Error::io(format!("creating TUN {TUN_NAME} in namespace {ns}"), e))
}

fn configure(ns: &str, addr: &str, mtu: u32) -> Result<(), Error> {
    let mtu = mtu.to_string();
    let cidr = format!("{addr}/24");
    run_ip(&["-n", ns, "addr", "add", &cidr, "dev", TUN_NAME])?;
    // A TUN device never pushes back on the sender's stack: when its queue (txqueuelen, default
    // 500) is full it drops, and TCP hands it whole congestion windows at memory speed. 10,000
    // packets absorbs any window seen here, so the only drops are the link model's (a drop
    // there is counted as tun_in_dropped in `stats`).
    run_ip(&[
        "-n",
        ns,
        "link",
        "set",
        "dev",
        TUN_NAME,
        "mtu",
        &mtu,
        "txqueuelen",
        "10000",
        "up",
    ])?;
    run_ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
    Ok(())
}

pub(crate) fn run(cfg: Config) -> Result<(), Error> {
    let n = &cfg.names;
    // The link should not be what a CPU-bound benchmark starves: a reader thread that waits for
    // the CPU lets the TUN queue in front of it overflow (counted as tun_in_dropped). Nice -10
    // is a strong preference, not a real-time priority, so a busy link cannot lock the host up.
    // SAFETY: plain syscall; failure (not root) only leaves the default priority.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, cfg.nice) } != 0 {
        tracing::warn!(
            "cannot set nice {}: {}",
            cfg.nice,
            std::io::Error::last_os_error()
        );
    }
    let (tun_pri, dev_pri) = tun_in(&n.pri_ns)?;
    let (tun_mir, dev_mir) = tun_in(&n.mir_ns)?;
    configure(&n.pri_ns, &n.pri_addr, cfg.mtu)?;
    configure(&n.mir_ns, &n.mir_addr, cfg.mtu)?;

    let clone = |f: &File| f.try_clone().map_err(|e| Error::io("dup TUN fd", e));
    let buf_size = cfg.mtu as usize + 64;
    let dirs = vec![
        Arc::new(Direction::new(
            "pri>mir",
            clone(&tun_pri)?,
            clone(&tun_mir)?,
            buf_size,
            cfg.max_inflight,
        )),
        Arc::new(Direction::new(
            "mir>pri",
            tun_mir,
            tun_pri,
            buf_size,
            cfg.max_inflight,
        )),
    ];
    let ctl = Arc::new(Control::new(cfg.params.clone()));
    forward::spawn(&dirs, &ctl, cfg.seed).map_err(|e| Error::io("spawning threads", e))?;

    let sock = n.sock_path();
    let _ = fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| Error::io(format!("binding {}", sock.display()), e))?;
    fs::write(n.pid_path(), format!("{}\n", std::process::id()))
        .map_err(|e| Error::io("writing pid file", e))?;
    tracing::info!(
        pri = %n.pri_ns, mir = %n.mir_ns, params = ?cfg.params, "wan-sim forwarder ready"
    );

    let d = Daemon {
        cfg,
        ctl,
        dirs,
        dev: [dev_pri, dev_mir],
        started: Instant::now(),
    };
    for conn in listener.incoming() {
        match conn {
            Ok(s) => d.serve(s),
            Err(e) => tracing::warn!("control accept: {e}"),
        }
    }
    Ok(())
}

impl Daemon {
    fn serve(&self, stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        let mut lines = BufReader::new(stream).lines();
        while let Some(Ok(line)) = lines.next() {
            if line.trim().is_empty() {
                continue;
            }
            let (reply, stop) = match serde_json::from_str::<Request>(&line) {
                Ok(req) => self.handle(req),
                Err(e) => (
                    json!({"ok": false, "error": format!("bad request: {e}")}),
                    false,
                ),
            };
            let _ = writeln!(out, "{reply}");
            if stop {
                let _ = out.flush();
                tracing::info!("shutdown requested");
                let _ = fs::remove_file(self.cfg.names.sock_path());
                let _ = fs::remove_file(self.cfg.names.pid_path());
                // Closing the TUN fds (at exit) removes the devices.
                std::process::exit(0);
            }
        }
    }

    fn handle(&self, req: Request) -> (Value, bool) {
        match req {
            Request::Stats => (self.stats(), false),
            Request::Set { params } => {
                let new = params.apply(&self.ctl.params());
                if let Err(e) = new.validate() {
                    return (json!({"ok": false, "error": e}), false);
                }
                tracing::info!(params = ?new, "set");
                self.ctl.set_params(new.clone());
                (json!({"ok": true, "params": new}), false)
            }
            Request::Cut { secs } => {
                if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
                    return (
                        json!({"ok": false, "error": "--secs must be in [0, 86400]"}),
                        false,
                    );
                }
                let until = now_ns() + (secs * 1e9) as u64;
                self.ctl.cut_until.store(until, Ordering::Relaxed);
                tracing::info!(secs, "cut");
                (json!({"ok": true, "cut_secs": secs}), false)
            }
            Request::Shutdown => (json!({"ok": true}), true),
        }
    }

    fn stats(&self) -> Value {
        let n = &self.cfg.names;
        let drops = |f: &File| tun_drops(&read_all_at(f)).unwrap_or((0, 0));
        let (pri, mir) = (drops(&self.dev[0]), drops(&self.dev[1]));
        let cut_left = self
            .ctl
            .cut_until
            .load(Ordering::Relaxed)
            .saturating_sub(now_ns()) as f64
            / 1e9;
        json!({
            "ok": true,
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "prefix": n.prefix,
            "namespaces": {"pri": n.pri_ns, "mir": n.mir_ns},
            "addresses": {"pri": n.pri_addr, "mir": n.mir_addr},
            "tun": TUN_NAME,
            "mtu": self.cfg.mtu,
            "seed": self.cfg.seed,
            "params": self.ctl.params(),
            "cut_remaining_s": cut_left,
            "directions": {
                "pri_to_mir": with_kernel_drops(self.dirs[0].stats_json(), pri.1, mir.0),
                "mir_to_pri": with_kernel_drops(self.dirs[1].stats_json(), mir.1, pri.0),
            },
        })
    }
}

/// Adds the kernel's drops around the emulator: packets the sending side's TUN queue dropped
/// before the forwarder read them (`tun_in_dropped`, its txqueuelen overflowed) and packets the
/// receiving side's stack dropped after the forwarder wrote them (`tun_out_dropped`). Neither is
/// part of the link model; non-zero values mean the emulator host was short of CPU.
fn with_kernel_drops(mut v: Value, tx_dropped_in: u64, rx_dropped_out: u64) -> Value {
    v["tun_in_dropped"] = json!(tx_dropped_in);
    v["tun_out_dropped"] = json!(rx_dropped_out);
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
bmtun0: 2713268633 1808926    0    7    0     0          0         0 21600633  413512    0 3151    0     0       0          0
";
        assert_eq!(super::tun_drops(text), Some((7, 3151)));
        assert_eq!(super::tun_drops("nothing"), None);
    }
}
