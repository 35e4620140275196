//! wan-sim: a WAN link emulator on one machine (netem is not available here).
//!
//! Two network namespaces (`PREFIX-pri` with 10.99.0.1 and `PREFIX-mir` with 10.99.0.2) each
//! get a TUN device; a background forwarder holds both TUN fds and moves IP packets between
//! them through a link model: Bernoulli loss, duplication, a rate-limited FIFO bottleneck with a
//! bounded buffer, one-way delay with jitter, optional reordering, and timed outages (`cut`).
//! See docs/WAN-SIM.md.

mod daemon;
mod forward;
mod link;
mod ping;
mod sys;

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use link::{Params, Patch};

/// Name of the TUN device in each namespace.
pub const TUN_NAME: &str = "bmtun0";
const DEFAULT_PREFIX: &str = "bm";
const PRI_ADDR: &str = "10.99.0.1";
const MIR_ADDR: &str = "10.99.0.2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Msg(String),
    #[error("{ctx}: {source}")]
    Io { ctx: String, source: io::Error },
    #[error(
        "wan-sim is already up (pid {pid}, namespaces {pri} and {mir}); \
         change it with `wan-sim set ...` or stop it with `wan-sim down` first"
    )]
    AlreadyUp { pid: u64, pri: String, mir: String },
    #[error("wan-sim is not up (no answer on {0}); start it with `wan-sim up`")]
    NotUp(PathBuf),
}

impl Error {
    pub fn io(ctx: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            ctx: ctx.into(),
            source,
        }
    }

    /// Stable exit codes for scripts.
    fn exit_code(&self) -> u8 {
        match self {
            Error::AlreadyUp { .. } => 3,
            Error::NotUp(_) => 4,
            _ => 1,
        }
    }
}

/// Names and paths of one emulator instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Names {
    pub prefix: String,
    pub pri_ns: String,
    pub mir_ns: String,
    pub pri_addr: String,
    pub mir_addr: String,
    pub dir: PathBuf,
}

impl Names {
    fn new(prefix: Option<String>, dir: Option<PathBuf>) -> Result<Names, Error> {
        let prefix = prefix
            .or_else(|| std::env::var("WAN_SIM_PREFIX").ok())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        if prefix.len() > 32
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Msg(format!(
                "bad prefix {prefix:?}: use up to 32 of [A-Za-z0-9_-]"
            )));
        }
        let dir = dir
            .or_else(|| std::env::var_os("WAN_SIM_DIR").map(PathBuf::from))
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("/run/wan-sim").join(&prefix));
        Ok(Names {
            pri_ns: format!("{prefix}-pri"),
            mir_ns: format!("{prefix}-mir"),
            pri_addr: PRI_ADDR.into(),
            mir_addr: MIR_ADDR.into(),
            prefix,
            dir,
        })
    }

    pub fn sock_path(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("wan-sim.pid")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("wan-sim.log")
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "wan-sim",
    about = "WAN link emulator between two network namespaces (TUN + userspace forwarder)",
    after_help = "Namespaces are PREFIX-pri (10.99.0.1) and PREFIX-mir (10.99.0.2), PREFIX = bm \
                  unless --prefix or WAN_SIM_PREFIX says otherwise.\nExit codes: 0 ok, 1 error, \
                  2 usage, 3 already up, 4 not up."
)]
struct Cli {
    /// Namespace prefix (env WAN_SIM_PREFIX; default "bm": namespaces bm-pri and bm-mir)
    #[arg(long, global = true)]
    prefix: Option<String>,
    /// State directory: pid file, control socket, log (env WAN_SIM_DIR; default
    /// /run/wan-sim/PREFIX)
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Link parameters. With `up`, unset ones take the defaults shown; with `set`, unset ones keep
/// their current value.
#[derive(Args, Debug, Clone, Default)]
struct LinkArgs {
    /// Round-trip time in ms, half per direction [up default: 20]
    #[arg(long)]
    rtt_ms: Option<f64>,
    /// Jitter in ms: one-way delay wanders smoothly within ± jitter/2, order kept [up default: 0]
    #[arg(long)]
    jitter_ms: Option<f64>,
    /// Packet loss probability, 0..1, per direction [up default: 0.001]
    #[arg(long)]
    loss: Option<f64>,
    /// Bottleneck rate in Mbit/s of IP bytes, per direction; 0 = unlimited [up default: 500]
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// Bottleneck buffer in ms of transmission at --rate-mbit (tail drop) [up default: 50]
    #[arg(long)]
    queue_ms: Option<f64>,
    /// Fraction of packets held back by --reorder-ms so that later ones overtake [up default: 0]
    #[arg(long)]
    reorder: Option<f64>,
    /// Extra delay of a reordered packet, ms [up default: 1]
    #[arg(long)]
    reorder_ms: Option<f64>,
    /// Packet duplication probability, 0..1 [up default: 0]
    #[arg(long)]
    dup: Option<f64>,
}

impl LinkArgs {
    fn patch(&self) -> Patch {
        Patch {
            rtt_ms: self.rtt_ms,
            jitter_ms: self.jitter_ms,
            loss: self.loss,
            rate_mbit: self.rate_mbit,
            queue_ms: self.queue_ms,
            reorder: self.reorder,
            reorder_ms: self.reorder_ms,
            dup: self.dup,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Side {
    Pri,
    Mir,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the namespaces and start the forwarder in the background (fails with exit code 3
    /// if this instance is already up; stale leftovers of a dead instance are cleaned first)
    Up {
        #[command(flatten)]
        link: LinkArgs,
        /// PRNG seed (loss, dup, jitter, reorder draws are reproducible from it)
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// MTU of the TUN devices
        #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(576..=65535))]
        mtu: u32,
        /// Most packets held in one direction at once (beyond: dropped, counted as "limit")
        #[arg(long, default_value_t = 65536)]
        max_inflight: usize,
        /// Nice value of the forwarder (it should not be what a busy host starves)
        #[arg(long, default_value_t = -10, allow_negative_numbers = true,
              value_parser = clap::value_parser!(i32).range(-20..=19))]
        nice: i32,
    },
    /// Change link parameters live (only the flags given)
    Set {
        #[command(flatten)]
        link: LinkArgs,
    },
    /// Drop every packet, both directions, for SECS seconds (returns at once; 0 ends a cut)
    Cut {
        #[arg(long)]
        secs: f64,
    },
    /// Counters per direction: passed, dropped by reason, duplicated, reordered
    Stats {
        /// Print the raw JSON
        #[arg(long)]
        json: bool,
    },
    /// Stop the forwarder, kill what still runs in the namespaces, delete them (idempotent)
    Down,
    /// ICMP echo across the link (no iputils-ping needed); exit 0 if any reply came back
    Ping {
        /// Side to ping from (the other side's address is the target)
        #[arg(long, value_enum, default_value = "pri")]
        from: Side,
        #[arg(short = 'c', long, default_value_t = 5)]
        count: u32,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        /// Wait this long after the last request for replies
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// ICMP payload bytes
        #[arg(long, default_value_t = 56)]
        size: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print shell assignments: namespace names, addresses, state directory
    Env,
    #[command(name = "__daemon", hide = true)]
    Daemon {
        #[arg(long)]
        config: String,
    },
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn run_ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("running ip (iproute2)", e))?;
    if !out.status.success() {
        return Err(Error::Msg(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// One request on the control socket.
fn request(names: &Names, req: &Value) -> Result<Value, Error> {
    let sock = names.sock_path();
    let stream = UnixStream::connect(&sock).map_err(|_| Error::NotUp(sock.clone()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut w = stream
        .try_clone()
        .map_err(|e| Error::io("control socket", e))?;
    writeln!(w, "{req}").map_err(|e| Error::io("control socket write", e))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| Error::io("control socket read", e))?;
    if line.is_empty() {
        return Err(Error::Msg("control socket closed without an answer".into()));
    }
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| Error::Msg(format!("bad answer from daemon: {e}")))?;
    if v["ok"] != json!(true) {
        return Err(Error::Msg(format!(
            "daemon: {}",
            v["error"].as_str().unwrap_or("request refused")
        )));
    }
    Ok(v)
}

fn read_pid(names: &Names) -> Option<i32> {
    fs::read_to_string(names.pid_path())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Is `pid` one of our daemons (not a recycled pid)?
fn is_our_daemon(pid: i32) -> bool {
    let cmd = sys::cmdline(pid);
    cmd.contains("wan-sim") && cmd.contains("__daemon")
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let t = Instant::now();
    while sys::pid_alive(pid) && is_our_daemon(pid) {
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Processes still running inside namespace `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Everything `down` does; also used by `up` to clear a dead instance's leftovers.
fn teardown(names: &Names, verbose: bool) -> Result<(), Error> {
    let pid = read_pid(names);
    // Ask the daemon to stop; fall back to signals.
    let _ = request(names, &json!({"cmd": "shutdown"}));
    if let Some(pid) = pid.filter(|&p| is_our_daemon(p)) {
        if !wait_gone(pid, Duration::from_secs(2)) {
            sys::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if !wait_gone(pid, Duration::from_secs(2)) {
                sys::kill(pid, nix::sys::signal::Signal::SIGKILL);
                wait_gone(pid, Duration::from_secs(2));
            }
        }
    }
    let me = std::process::id() as i32;
    for ns in [&names.pri_ns, &names.mir_ns] {
        if !sys::netns_exists(ns) {
            continue;
        }
        let pids: Vec<i32> = pids_in(ns).into_iter().filter(|&p| p != me).collect();
        if !pids.is_empty() {
            if verbose {
                eprintln!("wan-sim: stopping processes left in {ns}: {pids:?}");
            }
            for &p in &pids {
                sys::kill(p, nix::sys::signal::Signal::SIGTERM);
            }
            let t = Instant::now();
            while pids.iter().any(|&p| sys::pid_alive(p)) && t.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
            for &p in &pids {
                if sys::pid_alive(p) {
                    sys::kill(p, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        run_ip(&["netns", "del", ns])?;
    }
    match fs::remove_dir_all(&names.dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(Error::io(format!("removing {}", names.dir.display()), e))
        }
        _ => {}
    }
    // The shared parent of the default state directories goes too once it is empty.
    if names.dir.parent() == Some(Path::new("/run/wan-sim")) {
        let _ = fs::remove_dir("/run/wan-sim");
    }
    Ok(())
}

fn up(names: &Names, params: Params, mut cfg: daemon::Config) -> Result<(), Error> {
    params.validate().map_err(Error::Msg)?;
    if let Ok(v) = request(names, &json!({"cmd": "stats"})) {
        return Err(Error::AlreadyUp {
            pid: v["pid"].as_u64().unwrap_or(0),
            pri: names.pri_ns.clone(),
            mir: names.mir_ns.clone(),
        });
    }
    teardown(names, true)?;
    cfg.params = params;
    let result = start(names, &cfg);
    if result.is_err() {
        let log = fs::read_to_string(names.log_path()).unwrap_or_default();
        if !log.trim().is_empty() {
            eprintln!("wan-sim: daemon log:\n{}", log.trim_end());
        }
        let _ = teardown(names, false);
    }
    result
}

fn start(names: &Names, cfg: &daemon::Config) -> Result<(), Error> {
    fs::create_dir_all(&names.dir)
        .map_err(|e| Error::io(format!("creating {}", names.dir.display()), e))?;
    for ns in [&names.pri_ns, &names.mir_ns] {
        run_ip(&["netns", "add", ns])?;
    }
    let log = fs::File::create(names.log_path()).map_err(|e| Error::io("creating log", e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("locating own binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__daemon")
        .arg("--config")
        .arg(serde_json::to_string(cfg).expect("config serializes"))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| Error::io("log fd", e))?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal and
    // process group so that it outlives us and our caller's signals.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| Error::io("starting daemon", e))?;
    let t = Instant::now();
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::io("waiting for daemon", e))?
        {
            return Err(Error::Msg(format!(
                "daemon exited during start-up ({status})"
            )));
        }
        if let Ok(v) = request(names, &json!({"cmd": "stats"})) {
            let p = &cfg.params;
            println!(
                "wan-sim up: {} {} <-> {} {} (pid {}; rtt {} ms, jitter {} ms, loss {}, rate {} \
                 Mbit/s, queue {} ms, reorder {}, dup {})",
                names.pri_ns,
                names.pri_addr,
                names.mir_ns,
                names.mir_addr,
                v["pid"],
                p.rtt_ms,
                p.jitter_ms,
                p.loss,
                p.rate_mbit,
                p.queue_ms,
                p.reorder,
                p.dup
            );
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Msg("daemon did not become ready within 15 s".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn print_stats(v: &Value) {
    let p = &v["params"];
    println!(
        "wan-sim {}: pid {}, up {:.1} s; rtt {} ms, jitter {} ms, loss {}, rate {} Mbit/s, \
         queue {} ms, reorder {} (+{} ms), dup {}",
        v["prefix"].as_str().unwrap_or("?"),
        v["pid"],
        v["uptime_s"].as_f64().unwrap_or(0.0),
        p["rtt_ms"],
        p["jitter_ms"],
        p["loss"],
        p["rate_mbit"],
        p["queue_ms"],
        p["reorder"],
        p["reorder_ms"],
        p["dup"]
    );
    let cut = v["cut_remaining_s"].as_f64().unwrap_or(0.0);
    if cut > 0.0 {
        println!("link CUT: {cut:.1} s left");
    }
    let cols = [
        ("received", "received_packets"),
        ("passed", "passed_packets"),
        ("passed_MB", "passed_bytes"),
        ("loss", "dropped_loss"),
        ("queue_full", "dropped_queue_full"),
        ("cut", "dropped_cut"),
        ("limit", "dropped_limit"),
        ("dup", "duplicated"),
        ("reordered", "reordered"),
        ("in_flight", "in_flight"),
        ("tun_in_drop", "tun_in_dropped"),
        ("tun_out_drop", "tun_out_dropped"),
    ];
    print!("{:<10}", "direction");
    for (h, _) in cols {
        print!(" {h:>11}");
    }
    println!();
    for (label, key) in [("pri->mir", "pri_to_mir"), ("mir->pri", "mir_to_pri")] {
        let d = &v["directions"][key];
        print!("{label:<10}");
        for (h, k) in cols {
            let n = d[k].as_u64().unwrap_or(0);
            if h == "passed_MB" {
                print!(" {:>11.1}", n as f64 / 1e6);
            } else {
                print!(" {n:>11}");
            }
        }
        println!();
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    if let Cmd::Daemon { config } = &cli.cmd {
        let cfg: daemon::Config = serde_json::from_str(config)
            .map_err(|e| Error::Msg(format!("bad daemon config: {e}")))?;
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(io::stderr)
            .init();
        let r = daemon::run(cfg);
        if let Err(e) = &r {
            tracing::error!("{e}");
        }
        return r;
    }
    let names = Names::new(cli.prefix, cli.dir)?;
    match cli.cmd {
        Cmd::Up {
            link,
            seed,
            mtu,
            max_inflight,
            nice,
        } => up(
            &names,
            link.patch().apply(&Params::default()),
            daemon::Config {
                names: names.clone(),
                params: Params::default(), // replaced by `up` after validation
                seed,
                mtu,
                max_inflight: max_inflight.max(16),
                nice,
            },
        ),
        Cmd::Set { link } => {
            if link.patch().is_empty() {
                let v = request(&names, &json!({"cmd": "stats"}))?;
                println!("wan-sim set: nothing to change; current {}", v["params"]);
                return Ok(());
            }
            let v = request(&names, &json!({"cmd": "set", "params": link.patch()}))?;
            println!("wan-sim set: {}", v["params"]);
            Ok(())
        }
        Cmd::Cut { secs } => {
            request(&names, &json!({"cmd": "cut", "secs": secs}))?;
            println!("wan-sim cut: link down for {secs} s");
            Ok(())
        }
        Cmd::Stats { json } => {
            let v = request(&names, &json!({"cmd": "stats"}))?;
            if json {
                println!("{v}");
            } else {
                print_stats(&v);
            }
            Ok(())
        }
        Cmd::Down => {
            teardown(&names, true)?;
            println!(
                "wan-sim down: {} and {} removed",
                names.pri_ns, names.mir_ns
            );
            Ok(())
        }
        Cmd::Ping {
            from,
            count,
            interval_ms,
            timeout_ms,
            size,
            json,
        } => {
            let (ns, to) = match from {
                Side::Pri => (&names.pri_ns, &names.mir_addr),
                Side::Mir => (&names.mir_ns, &names.pri_addr),
            };
            let to: Ipv4Addr = to.parse().expect("fixed address");
            let opts = ping::PingOpts {
                count,
                interval_ms,
                timeout_ms,
                size: size.min(65000),
                verbose: !json,
            };
            let r =
                ping::ping(ns, to, &opts).map_err(|e| Error::io(format!("ping from {ns}"), e))?;
            if json {
                println!("{}", serde_json::to_string(&r).expect("report serializes"));
            } else {
                let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
                println!(
                    "{} sent, {} received, {:.0}% loss, {} duplicates; rtt min/avg/max = {}/{}/{} ms",
                    r.sent,
                    r.received,
                    r.loss * 100.0,
                    r.duplicates,
                    f(r.rtt_min_ms),
                    f(r.rtt_avg_ms),
                    f(r.rtt_max_ms)
                );
            }
            if r.received == 0 {
                return Err(Error::Msg(format!("no reply from {to}")));
            }
            Ok(())
        }
        Cmd::Env => {
            println!("WAN_SIM_PREFIX={}", names.prefix);
            println!("WAN_SIM_DIR={}", names.dir.display());
            println!("WAN_SIM_PRI_NS={}", names.pri_ns);
            println!("WAN_SIM_MIR_NS={}", names.mir_ns);
            println!("WAN_SIM_PRI_ADDR={}", names.pri_addr);
            println!("WAN_SIM_MIR_ADDR={}", names.mir_addr);
            Ok(())
        }
        Cmd::Daemon { .. } => unreachable!("handled above"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wan-sim: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
