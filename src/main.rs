//! The `blkmirror` command line: clap definitions only; the work lives in the library.

use blkmirror::daemon::DaemonError;
use blkmirror::disk::spec::VolumeSpec;
use blkmirror::exit::Exit;
use blkmirror::journal::OnFull;
use blkmirror::mirror_daemon::MirrorOptions;
use blkmirror::nbd::server::{Limits, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS};
use blkmirror::node::{self, Link};
use blkmirror::primary::{PrimaryOptions, ReplicationOptions};
use blkmirror::repl::apply::{recover, RecoverTo};
use blkmirror::repl::role::Role;
use blkmirror::transport::{Congestion, TlsFiles, Tuning};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "blkmirror",
    version,
    about = "Userspace block-level replication over NBD and QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve volumes over NBD on the primary host.
    Primary {
        /// NAME=PATH[,size=SIZE][,ro]; PATH is a file or block device, created sparse when
        /// missing and size= is given. The export name is NAME.
        #[arg(long = "volume", required = true)]
        volumes: Vec<VolumeSpec>,
        /// Unix socket to serve NBD on.
        #[arg(long)]
        nbd_unix: PathBuf,
        /// Also serve NBD on this TCP ADDR:PORT.
        #[arg(long)]
        nbd_tcp: Option<String>,
        /// Most NBD connections open at once, counting those still in the handshake; one more
        /// is closed at once (logged). Each holds a thread, and once attached its own io_uring
        /// and buffers: 256 is far more than real clients open (a kernel nbd device a few, qemu
        /// one per drive) and bounds what a flood of idle connections can take.
        #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS as u32,
            value_parser = clap::value_parser!(u32).range(1..))]
        nbd_max_connections: u32,
        /// Seconds an NBD client has for its whole handshake (greeting to transmission phase).
        #[arg(long, default_value_t = DEFAULT_HANDSHAKE_TIMEOUT.as_secs(),
            value_parser = clap::value_parser!(u64).range(1..))]
        nbd_handshake_timeout: u64,
        /// Directory for the daemon's state (locked: one daemon per directory).
        #[arg(long)]
        state_dir: PathBuf,
        #[command(flatten)]
        hooks: TestHooks,
        /// Replicate every volume to the mirror at HOST:PORT (needs --ca/--cert/--key/--peer-name).
        #[arg(long, requires_all = ["ca", "cert", "key", "peer_name"])]
        mirror: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        link: LinkArgs,
        /// Cap on each volume's on-disk journal (e.g. 1G, at least 64M); when it is full, see
        /// `--on-journal-full`. (Up to two acknowledged segments, a quarter of it each, 16-64 MiB, are also
        /// kept for reuse.)
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        journal_size: u64,
        /// What a full journal does: `track` folds it into a dirty map (writes go on at local
        /// speed; the dirty regions are resynced when the mirror is back, staged so that the
        /// mirror stays consistent), `block` makes writes wait for the mirror.
        #[arg(long, value_enum, default_value_t = OnFull::Track)]
        on_journal_full: OnFull,
        /// The dirty map's region: the unit a resync reads and sends (a power of two, at
        /// least 4K; a 1 TiB volume's map is 2 MiB at 64K).
        #[arg(long, default_value = "64K", value_parser = parse_dirty_region)]
        dirty_region: u64,
        /// Hold each write back a little (up to 10 ms, rising with the fill) once the
        /// journal's unacknowledged writes fill more than PERCENT of it: slows the clients
        /// while the mirror falls behind, so that the journal may not have to fold. Off by
        /// default.
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=99),
              requires = "mirror")]
        pace_above: Option<u8>,
        /// Control socket (default STATE_DIR/control.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// At start, a primary that replicated before serves its clients only once its peer
        /// answered as a secondary (it may have been promoted meanwhile: then this side does
        /// not serve). When the peer does not answer within 5 s: `serve` serves anyway
        /// (production first), `wait` waits for it (or for `blkmirror promote --force`).
        #[arg(long, value_enum, default_value_t = PeerUnreachableArg::Serve)]
        peer_unreachable: PeerUnreachableArg,
        /// lz4 for replicated data: auto (on when --link-rate is below 4G), on, off.
        #[arg(long, value_enum, default_value_t = CompressArg::Auto)]
        compress: CompressArg,
    },
    /// Receive replication on the mirror host and keep its volumes consistent.
    Mirror {
        /// UDP ADDR:PORT to listen on for primaries.
        #[arg(long, required_unless_present = "connect", conflicts_with = "connect")]
        listen: Option<String>,
        /// Dial the peer at HOST:PORT instead (a new mirror for a promoted primary, which
        /// listens): it asks the peer for the volumes.
        #[arg(long, value_name = "HOST:PORT")]
        connect: Option<String>,
        /// Where to serve the volumes over NBD once promoted (`blkmirror promote`): without
        /// it, this daemon cannot be promoted.
        #[arg(long)]
        nbd_unix: Option<PathBuf>,
        /// Also serve NBD on this TCP ADDR:PORT once promoted.
        #[arg(long)]
        nbd_tcp: Option<String>,
        /// Once promoted: the cap on each volume's journal (as `blkmirror primary`'s).
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        journal_size: u64,
        /// NAME=PATH[,size=SIZE]: NAME must match the primary's volume, sizes must be equal.
        #[arg(long = "volume", required = true)]
        volumes: Vec<VolumeSpec>,
        #[arg(long)]
        state_dir: PathBuf,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        link: LinkArgs,
        /// Control socket (default STATE_DIR/control.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Keep a history of each volume for this long (e.g. 90m, 24h, 7d): the blocks each
        /// set overwrites are saved first (STATE_DIR/history/NAME), so recent moments can be
        /// listed and brought back (`blkmirror history`). Off by default.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        history: Option<Duration>,
        /// Cap on each volume's history on disk (default: the volume's size; at least 64M);
        /// what reaching it does is --history-full.
        #[arg(long, value_name = "SIZE", value_parser = parse_history_size, requires = "history")]
        history_size: Option<u64>,
        /// When the history is full (its cap, or the state directory's file system): `wait`
        /// (applying waits until points age out of --history: nothing the primary sends, a
        /// flood of ransomware writes included, pushes out a point younger than --history;
        /// the mirror falls behind meanwhile and says so) or `drop-oldest` (the oldest points
        /// go: replication never waits for the history).
        #[arg(long, value_name = "POLICY", value_enum, default_value_t = HistoryFullArg::Wait,
              requires = "history")]
        history_full: HistoryFullArg,
        /// How older points are thinned: AGE:EVERY,... keeps one point per EVERY among those
        /// older than AGE (`none`: keep every point). The default keeps every point of the last
        /// hour, one a minute for a day, one an hour beyond.
        #[arg(long, value_name = "TIERS", requires = "history",
              default_value = blkmirror::repl::history::DEFAULT_THINNING,
              value_parser = parse_thinning)]
        history_thin: Thinning,
    },
    /// On the mirror: the recoverable points of each volume's history, oldest first.
    History {
        /// The mirror's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        /// Only this volume (default: all).
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        volume: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// On the mirror: serve a point of a volume's history over NBD while replication goes on,
    /// read-only or with --writable (writes kept in an overlay dropped at the end: the live
    /// mirror is never written), until SIGTERM or SIGINT.
    Export {
        /// The mirror's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        volume: String,
        /// The history's point at this set (`blkmirror history` lists them).
        #[arg(long, conflicts_with = "at", required_unless_present = "at")]
        set: Option<u64>,
        /// The newest point at or before this UTC time (RFC 3339).
        #[arg(long, value_parser = parse_rfc3339)]
        at: Option<u64>,
        /// The unix socket to serve NBD on (export name: the volume's).
        #[arg(long)]
        nbd_unix: PathBuf,
        #[arg(long)]
        writable: bool,
        #[arg(long)]
        json: bool,
    },
    /// Offline: replay the mirror's redo log into its volumes so each is a consistent state;
    /// with --set or --at, then bring each back to that point of its history (a failover to a
    /// moment before an attack). The later points and sets are dropped.
    Recover {
        #[arg(long = "volume", required = true)]
        volumes: Vec<VolumeSpec>,
        #[arg(long)]
        state_dir: PathBuf,
        /// The history's point at this set (`blkmirror history` lists them).
        #[arg(long, conflicts_with = "at")]
        set: Option<u64>,
        /// The history's newest point at or before this UTC time (RFC 3339, e.g.
        /// 2026-12-05T07:39:14Z; the mirror's clock).
        #[arg(long, value_parser = parse_rfc3339)]
        at: Option<u64>,
        /// Print a JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Show a running daemon's replication status; exits 6 when a replicated volume is not
    /// replicating (link down, initial copy running, mirror not consistent).
    Status {
        /// The daemon's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// On the primary: accept a volume's disk as it is now, after it was replaced or changed
    /// while the daemon was stopped (replication of it stops until then). The mirror is then
    /// brought to it by a comparison. Answers "already" when there is nothing to accept.
    AcceptVolume {
        /// The primary's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        /// The volume's name.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// On the primary: try to reach the mirror again now (after a refusal for good, which
    /// otherwise is retried only every 10 minutes, or while backing off).
    Retry {
        /// The primary's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        /// Only this volume (default: all).
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        volume: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// On the primary: compare every chunk of each volume with the mirror's (checksums on the
    /// wire) while replication runs; with --repair, send again what differs. Shows progress;
    /// exits 0 when identical, 8 when differences were found (repaired with --repair), 6 when
    /// it could not finish.
    Verify {
        /// The primary's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        /// Only this volume (default: all).
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        volume: Option<String>,
        /// Send the differing chunks again (the mirror stays a valid crash state).
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make this daemon the primary (a mirror: it finishes applying what it holds, then serves
    /// its volumes over its --nbd-unix and ships to its peer). Without --force only when the
    /// peer is known to be demoted (it holds the same data); --force when the primary is
    /// gone, giving up its writes this side never received (the answer says how many seconds
    /// of writes, by the primary's clock). Exit 0 (promoted, or "already" the primary), 9 when
    /// the state does not allow it (the message says why).
    Promote {
        /// The daemon's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        /// The primary is gone: promote what this side holds.
        #[arg(long)]
        force: bool,
        /// First go back to this point of the history (`blkmirror history`): every write after
        /// it is given up, at both sites (failover to a moment before an attack).
        #[arg(long, conflicts_with = "at")]
        set: Option<u64>,
        /// First go back to the newest point at or before this UTC time (RFC 3339).
        #[arg(long, value_parser = parse_rfc3339)]
        at: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Make this daemon a secondary (a primary): its NBD exports close, and it returns once
    /// its peer holds every write made before (exit 0; "already" for a secondary), then asks
    /// the peer for the volumes once the peer is promoted. Exit 10 when the peer did not hold
    /// every write within --timeout (nothing changed: it serves again), 9 when the state does
    /// not allow it.
    Demote {
        /// The daemon's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        /// Seconds to wait for the peer to hold every write.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Follow a daemon: one JSON line per change of its role, serving, and each volume's role,
    /// peer's role, disk state, replication state, link, consistency, resync progress (by
    /// tenths), whether a promotion is allowed, last error. First a line per item as it is
    /// (`exists`); `--now` stops there. Otherwise it runs until the daemon stops (a last `gone`
    /// line, exit 4).
    Events {
        /// The daemon's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
    },
    /// After a split brain (both sides primaries; status shows both_primary): make this side
    /// a secondary of its peer, giving up its own writes since the two parted. They are saved
    /// first (`blkmirror divergent`); the peer resyncs only what differs, and this side's
    /// volume stays its old state until that resync's end.
    Resolve {
        /// The daemon's control socket (STATE_DIR/control.sock).
        #[arg(long)]
        control: PathBuf,
        /// This side's writes since the two parted are the ones given up (required: the
        /// admin names the side).
        #[arg(long, required = true)]
        discard_local: bool,
        #[arg(long)]
        json: bool,
    },
    /// The writes a failback or `resolve --discard-local` gave up, saved in STATE/divergent:
    /// list them, or serve one read-only over NBD (`--export ID --nbd-unix PATH`) until
    /// SIGTERM.
    Divergent {
        /// The daemon's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Serve this saved set (its id from the list): a sparse image of the volume's size
        /// holding the saved ranges at their offsets.
        #[arg(long, requires = "nbd_unix")]
        export: Option<String>,
        #[arg(long, requires = "export")]
        nbd_unix: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Manage the replication CA and peer certificates (init, issue).
    #[command(subcommand)]
    Certs(blkmirror::certs::CertsCommand),
}

/// Flags only test builds have (`--features test-hooks`): release binaries carry no way to
/// corrupt what they ship or to fail their own disk.
#[derive(clap::Args, Default)]
struct TestHooks {
    /// Test only: inject disk faults, OP:WHAT[:START-END][:COUNT] (see docs/TESTING.md).
    #[cfg(feature = "test-hooks")]
    #[arg(long = "inject-fault", hide = true)]
    faults: Vec<String>,
    /// Test only: corrupt one byte of the first data set sent, after its CRC is computed.
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    test_corrupt_first_set: bool,
}

impl TestHooks {
    fn faults(&self) -> Vec<String> {
        #[cfg(feature = "test-hooks")]
        return self.faults.clone();
        #[cfg(not(feature = "test-hooks"))]
        Vec::new()
    }

    fn corrupt_first_set(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.test_corrupt_first_set;
        #[cfg(not(feature = "test-hooks"))]
        false
    }
}

#[derive(clap::Args)]
struct TlsArgs {
    /// PEM file of the CA that signs both sides' certificates (the only one trusted).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// PEM certificate of this node.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key of this node.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The name the peer's certificate must carry.
    #[arg(long)]
    peer_name: Option<String>,
}

impl TlsArgs {
    fn files(self) -> Result<TlsFiles, Failure> {
        match (self.ca, self.cert, self.key, self.peer_name) {
            (Some(ca), Some(cert), Some(key), Some(peer_name)) => Ok(TlsFiles {
                ca,
                cert,
                key,
                peer_name,
            }),
            _ => Err(Failure::new(
                Exit::Usage,
                "--ca, --cert, --key and --peer-name are all required",
            )),
        }
    }
}

#[derive(clap::Args)]
struct LinkArgs {
    /// Expected link rate (e.g. 1G, 10G, 500M bits/s): sizes windows and buffers.
    #[arg(long, default_value = "1G", value_parser = parse_rate)]
    link_rate: u64,
    /// Expected round-trip time in milliseconds.
    #[arg(long, default_value_t = 30)]
    rtt: u64,
    /// Congestion controller: steady (ours, for long lossy links), cubic, newreno, bbr.
    #[arg(long, default_value = "steady")]
    congestion: Congestion,
}

impl LinkArgs {
    fn tuning(&self) -> Tuning {
        Tuning {
            link_rate_bps: self.link_rate,
            rtt: std::time::Duration::from_millis(self.rtt),
            congestion: self.congestion,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PeerUnreachableArg {
    Serve,
    Wait,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum HistoryFullArg {
    Wait,
    DropOldest,
}

/// The smallest `--history-size`: several of the largest sets (8 MiB), so that one always fits.
const MIN_HISTORY_BYTES: u64 = 64 << 20;

/// `--dirty-region`: what the dirty map accepts, said when the command is typed rather than
/// when a journal first folds.
fn parse_dirty_region(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    blkmirror::journal::dirty::check_region_bytes(n)?;
    Ok(n)
}

fn parse_history_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n < MIN_HISTORY_BYTES {
        return Err(format!("{s:?}: at least 64M"));
    }
    Ok(n)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CompressArg {
    Auto,
    On,
    Off,
}

/// The longest duration accepted: anything longer is a typo.
const MAX_DURATION_SECS: u64 = 100 * 365 * 86_400;

/// Thinning tiers (`--history-thin`): one value, not a list of them.
#[derive(Clone, Debug)]
struct Thinning(Vec<blkmirror::repl::history::Tier>);

fn parse_thinning(s: &str) -> Result<Thinning, String> {
    blkmirror::repl::history::parse_thinning(s, parse_duration).map(Thinning)
}

/// A duration with a unit: `90s`, `30m`, `24h`, `7d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number with a unit is expected (90s, 30m, 24h, 7d)"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    let secs = n
        .checked_mul(unit_secs)
        .filter(|&s| s <= MAX_DURATION_SECS)
        .ok_or_else(|| format!("{s:?}: more than 100 years"))?;
    if secs == 0 {
        return Err(format!("{s:?}: must be more than nothing"));
    }
    Ok(Duration::from_secs(secs))
}

fn parse_rfc3339(s: &str) -> Result<u64, String> {
    blkmirror::repl::mirror::parse_time(s)
}

fn parse_size(s: &str) -> Result<u64, String> {
    blkmirror::disk::spec::parse_size(s).map_err(|e| e.to_string())
}

/// Bits per second with decimal suffixes: 500M, 1G, 10G.
fn parse_rate(s: &str) -> Result<u64, String> {
    let (n, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1_000),
        Some('m' | 'M') => (&s[..s.len() - 1], 1_000_000),
        Some('g' | 'G') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("link rate {s:?}: expected e.g. 500M or 10G"))
}

/// Buffers of a megabyte and more (frames, delta sets, journal reads) come and go all the time,
/// on many threads. glibc gives each thread that allocates its own heap ("arena"), and each
/// keeps what was freed in it: resident memory drifted 100 MB above what was live. Two arenas
/// keep it near the live size at no measured cost in throughput (a fixed mmap threshold did
/// better on memory but cost 20 % of replication throughput). I5: bounded memory.
fn bound_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    bound_heap();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLKMIRROR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // A panic here is an internal error (1), not Rust's 101: exit codes are a contract.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli.command)))
        .unwrap_or_else(|_| {
            Err(Failure::new(
                Exit::Internal,
                "internal error (panic, see above)",
            ))
        });
    match outcome {
        Ok(exit) => exit.into(),
        Err(f) => {
            tracing::error!("{}", f.message);
            eprintln!("blkmirror: {}", f.message);
            f.exit.into()
        }
    }
}

/// Why a command failed: what to tell the user, and the exit code (src/exit.rs).
struct Failure {
    exit: Exit,
    message: String,
}

impl Failure {
    fn new(exit: Exit, message: impl std::fmt::Display) -> Failure {
        Failure {
            exit,
            message: message.to_string(),
        }
    }
}

impl From<DaemonError> for Failure {
    fn from(e: DaemonError) -> Failure {
        Failure::new(e.exit_code(), e)
    }
}

/// An admin command on a daemon's control socket: its answer printed (the message, or the
/// JSON), its error mapped to an exit code.
/// `promote`/`demote`: asked again while the daemon is between two roles (it says "ask again
/// in a moment" for [`ROLE_SETTLE`] at most), so that a script's `demote` then `promote` of the
/// same daemon needs no sleep in between.
fn role_request(
    control: &std::path::Path,
    command: &str,
    json: bool,
    wait: Duration,
) -> Result<serde_json::Value, Failure> {
    let deadline = std::time::Instant::now() + ROLE_SETTLE;
    loop {
        let (word, v) = ask_daemon(control, command, wait)?;
        let settling =
            v["code"] == "busy" && v["error"].as_str().is_some_and(|e| e.contains("ask again"));
        if !settling || std::time::Instant::now() >= deadline {
            return answer_of(&word, v, json);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `command` sent to the daemon behind `control`, its answer waited for up to `wait`; with
/// the command's first word, which error messages begin with.
fn ask_daemon(
    control: &std::path::Path,
    command: &str,
    wait: Duration,
) -> Result<(String, serde_json::Value), Failure> {
    let word = command
        .split_whitespace()
        .next()
        .unwrap_or(command)
        .to_string();
    let v = blkmirror::control::request_waiting(control, command, wait)
        .map_err(|e| Failure::new(e.exit_code(), format!("{word}: {e}")))?;
    Ok((word, v))
}

/// How long `promote`/`demote` ask again while the daemon changes role.
const ROLE_SETTLE: Duration = Duration::from_secs(30);

/// What `promote`/`demote` say on success.
fn print_role_change(v: &serde_json::Value) {
    match v["result"].as_str() {
        Some("already") => println!("{}", v["message"].as_str().unwrap_or("already")),
        Some(result) => {
            println!(
                "{result}: this daemon is now {}",
                v["role"].as_str().unwrap_or("?")
            );
            for vol in v["volumes"].as_array().into_iter().flatten() {
                let mut line = format!(
                    "  {}: generation {}",
                    vol["name"].as_str().unwrap_or("?"),
                    vol["generation"].as_str().unwrap_or("?")
                );
                if let Some(seq) = vol["seq"].as_u64().or(vol["from_seq"].as_u64()) {
                    line.push_str(&format!(", data up to seq {seq}"));
                }
                if let Some(rpo) = vol["rpo_seconds"].as_f64().filter(|r| *r > 0.0) {
                    line.push_str(&format!(
                        "; the primary's writes of the last {} may be lost",
                        blkmirror::control::human_seconds(rpo)
                    ));
                }
                println!("{line}");
            }
        }
        None => println!("ok"),
    }
}

fn admin(control: &std::path::Path, command: &str, json: bool) -> Result<(), Failure> {
    let v = admin_request(control, command, json)?;
    if !json {
        match v["message"].as_str() {
            Some(m) => println!("{m}"),
            None => println!("{}", v["result"].as_str().unwrap_or("ok")),
        }
    }
    Ok(())
}

/// One command on a daemon's control socket: its answer (printed with `--json`), or its error
/// mapped to an exit code.
fn admin_request(
    control: &std::path::Path,
    command: &str,
    json: bool,
) -> Result<serde_json::Value, Failure> {
    admin_request_waiting(control, command, json, Duration::from_secs(10))
}

/// [`admin_request`] for a command that may take `wait` to answer.
fn admin_request_waiting(
    control: &std::path::Path,
    command: &str,
    json: bool,
    wait: Duration,
) -> Result<serde_json::Value, Failure> {
    let (word, v) = ask_daemon(control, command, wait)?;
    answer_of(&word, v, json)
}

/// A daemon's answer: printed with `--json`, its error mapped to an exit code.
fn answer_of(word: &str, v: serde_json::Value, json: bool) -> Result<serde_json::Value, Failure> {
    if json {
        println!("{v}");
    }
    if let Some(err) = v["error"].as_str() {
        let code = match v["code"].as_str() {
            Some("usage" | "not-found") => Exit::Usage,
            Some("io") => Exit::Io,
            Some("refused") => Exit::Refused,
            Some("busy") => Exit::Busy,
            Some("not-replicating") => Exit::Degraded,
            Some("wrong-state") => Exit::WrongState,
            Some("timed-out") => Exit::TimedOut,
            _ => Exit::Internal,
        };
        return Err(Failure::new(code, format!("{word}: {err}")));
    }
    Ok(v)
}

fn run(command: Command) -> Result<Exit, Failure> {
    match command {
        Command::Primary {
            volumes,
            nbd_unix,
            nbd_tcp,
            nbd_max_connections,
            nbd_handshake_timeout,
            state_dir,
            hooks,
            mirror,
            tls,
            link,
            journal_size,
            on_journal_full,
            dirty_region,
            pace_above,
            control,
            compress,
            peer_unreachable,
        } => {
            let tls = match &mirror {
                Some(_) => Some(tls.files()?),
                None => None,
            };
            // Without --mirror there is no peer: this daemon is never demoted (nor its files
            // read as a secondary's).
            let secondary = MirrorOptions {
                peer: Link::Dial(mirror.clone().unwrap_or_default()),
                nbd_unix: Some(nbd_unix.clone()),
                volumes: volumes.clone(),
                state_dir: state_dir.clone(),
                tls: tls.clone().unwrap_or(blkmirror::transport::TlsFiles {
                    ca: PathBuf::new(),
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                    peer_name: String::new(),
                }),
                tuning: link.tuning(),
                control: control.clone(),
                history: None,
            };
            let replication = mirror.map(|mirror| ReplicationOptions {
                peer: Link::Dial(mirror),
                tls: tls.expect("given with --mirror"),
                tuning: link.tuning(),
                journal_bytes: journal_size,
                on_journal_full,
                dirty_region,
                pace_above,
                corrupt_first_set: hooks.corrupt_first_set(),
                compress: match compress {
                    CompressArg::Auto => None,
                    CompressArg::On => Some(true),
                    CompressArg::Off => Some(false),
                },
            });
            let primary = PrimaryOptions {
                peer_unreachable: match peer_unreachable {
                    PeerUnreachableArg::Serve => blkmirror::primary::PeerUnreachable::Serve,
                    PeerUnreachableArg::Wait => blkmirror::primary::PeerUnreachable::Wait,
                },
                volumes,
                nbd_unix: Some(nbd_unix),
                nbd_tcp,
                nbd_limits: Limits {
                    max_connections: nbd_max_connections as usize,
                    handshake_timeout: Duration::from_secs(nbd_handshake_timeout),
                },
                state_dir,
                replication,
                control,
                faults: hooks.faults(),
            };
            node::run(Role::Primary, primary, secondary)?;
        }
        Command::Mirror {
            listen,
            connect,
            nbd_unix,
            nbd_tcp,
            journal_size,
            volumes,
            state_dir,
            tls,
            link,
            control,
            history,
            history_size,
            history_thin,
            history_full,
        } => {
            let tls = tls.files()?;
            let peer = match (listen, connect) {
                (Some(l), _) => Link::Listen(l),
                (None, Some(c)) => Link::Dial(c),
                (None, None) => unreachable!("clap requires one"),
            };
            let primary = PrimaryOptions {
                peer_unreachable: blkmirror::primary::PeerUnreachable::Serve,
                volumes: volumes.clone(),
                nbd_unix: nbd_unix.clone(),
                nbd_tcp,
                nbd_limits: Limits {
                    max_connections: DEFAULT_MAX_CONNECTIONS,
                    handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                },
                state_dir: state_dir.clone(),
                replication: Some(ReplicationOptions {
                    peer: peer.clone(),
                    tls: tls.clone(),
                    tuning: link.tuning(),
                    journal_bytes: journal_size,
                    on_journal_full: blkmirror::journal::OnFull::Track,
                    dirty_region: blkmirror::journal::dirty::DEFAULT_REGION_BYTES,
                    pace_above: None,
                    corrupt_first_set: false,
                    compress: None,
                }),
                control: control.clone(),
                faults: Vec::new(),
            };
            let secondary = MirrorOptions {
                peer,
                nbd_unix: nbd_unix.clone(),
                volumes,
                state_dir,
                tls,
                tuning: link.tuning(),
                control,
                history: history.map(|keep| blkmirror::repl::history::Retention {
                    keep,
                    max_bytes: history_size,
                    thin: history_thin.0,
                    when_full: match history_full {
                        HistoryFullArg::Wait => blkmirror::repl::history::WhenFull::Wait,
                        HistoryFullArg::DropOldest => {
                            blkmirror::repl::history::WhenFull::DropOldest
                        }
                    },
                }),
            };
            node::run(Role::Secondary, primary, secondary)?;
        }
        Command::Export {
            control,
            volume,
            set,
            at,
            nbd_unix,
            writable,
            json,
        } => {
            // Before anything else: the mask is what makes the signal wait below work.
            let signals = blkmirror::daemon::Signals::block()?;
            let point = match (set, at) {
                (Some(n), _) => format!("set={n}"),
                (None, Some(t)) => format!("at={t}"),
                (None, None) => unreachable!("clap requires one"),
            };
            let socket = std::path::absolute(&nbd_unix).map_err(|e| {
                Failure::new(Exit::Usage, format!("export: {}: {e}", nbd_unix.display()))
            })?;
            let cmd = format!(
                "export {volume} {point} {} {}{}",
                socket.display(),
                std::process::id(),
                if writable { " writable" } else { "" }
            );
            let v = admin_request(&control, &cmd, json)?;
            if !json {
                println!(
                    "{volume}: serving the point at set {} ({}) on {} ({}); stop with SIGTERM",
                    v["set"],
                    v["time"].as_str().unwrap_or("-"),
                    socket.display(),
                    if writable {
                        "writable: writes go to an overlay dropped at the end"
                    } else {
                        "read-only"
                    }
                );
            }
            signals.wait_for_termination()?;
            let _ =
                blkmirror::control::request(&control, &format!("unexport {}", socket.display()));
        }
        Command::History {
            control,
            volume,
            json,
        } => {
            let cmd = match &volume {
                Some(v) => format!("history {v}"),
                None => "history".into(),
            };
            let v = admin_request(&control, &cmd, json)?;
            if !json {
                print!("{}", blkmirror::control::render_history(&v));
            }
        }
        Command::Recover {
            volumes,
            state_dir,
            set,
            at,
            json,
        } => {
            let to = match (set, at) {
                (Some(n), _) => RecoverTo::Set(n),
                (None, Some(t)) => RecoverTo::At(t),
                (None, None) => RecoverTo::Latest,
            };
            let reports = recover(&volumes, &state_dir, to)
                .map_err(|e| Failure::new(Exit::from_io(&e), format!("recover: {e}")))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reports).expect("report serialises")
                );
            } else {
                for r in &reports {
                    println!(
                        "{}: replayed {} sets, applied set {} (seq {}), {}",
                        r.volume,
                        r.replayed_sets,
                        r.applied_set,
                        r.applied_seq,
                        if r.consistent {
                            "consistent"
                        } else {
                            "NOT consistent (initial copy incomplete)"
                        }
                    );
                    if r.staged_sets > 0 {
                        println!(
                            "{}: {} sets of an incomplete resync kept, not applied (the \
                             volume is the state before it)",
                            r.volume, r.staged_sets
                        );
                    }
                    if let Some(set) = r.restored_to_set {
                        println!(
                            "{}: brought back to the point at set {set} ({}); later points \
                             and sets dropped",
                            r.volume,
                            r.restored_to_time.as_deref().unwrap_or("-")
                        );
                    }
                }
            }
        }
        Command::Status { control, json } => {
            let v = blkmirror::control::query(&control)
                .map_err(|e| Failure::new(e.exit_code(), format!("status: {e}")))?;
            if json {
                println!("{v}");
            } else {
                print!("{}", blkmirror::control::render(&v));
            }
            let stalled = blkmirror::control::not_replicating(&v);
            if !stalled.is_empty() {
                let list: Vec<String> = stalled
                    .iter()
                    .map(|(n, why)| format!("{n} ({why})"))
                    .collect();
                eprintln!("blkmirror: not replicating: {}", list.join(", "));
                return Ok(Exit::Degraded);
            }
        }
        Command::AcceptVolume {
            control,
            volume,
            json,
        } => admin(&control, &format!("accept-volume {volume}"), json)?,
        Command::Retry {
            control,
            volume,
            json,
        } => {
            let cmd = match volume {
                Some(v) => format!("retry {v}"),
                None => "retry".into(),
            };
            admin(&control, &cmd, json)?
        }
        Command::Verify {
            control,
            volume,
            repair,
            json,
        } => {
            return blkmirror::verify_cmd::run(&control, volume.as_deref(), repair, json)
                .map_err(|(code, why)| Failure::new(code, why));
        }
        Command::Promote {
            control,
            force,
            set,
            at,
            json,
        } => {
            let mut cmd = String::from("promote");
            if force {
                cmd.push_str(" force");
            }
            match (set, at) {
                (Some(n), _) => cmd.push_str(&format!(" set={n}")),
                (None, Some(t)) => cmd.push_str(&format!(" at={t}")),
                (None, None) => {}
            }
            // Applying what it holds and going back to a point may take a while.
            let v = role_request(&control, &cmd, json, Duration::from_secs(600))?;
            if !json {
                print_role_change(&v);
            }
        }
        Command::Demote {
            control,
            timeout,
            json,
        } => {
            let v = role_request(
                &control,
                &format!("demote {timeout}"),
                json,
                Duration::from_secs(timeout + 60),
            )?;
            if !json {
                print_role_change(&v);
            }
        }
        Command::Resolve {
            control,
            discard_local,
            json,
        } => {
            debug_assert!(discard_local, "clap requires it");
            // Saving the divergent writes reads them from the volume: minutes for a long tail.
            let v = role_request(
                &control,
                "resolve discard-local",
                json,
                Duration::from_secs(3600),
            )?;
            if !json {
                print_role_change(&v);
            }
        }
        Command::Divergent {
            state_dir,
            export,
            nbd_unix,
            json,
        } => {
            if !state_dir.is_dir() {
                return Err(Failure::new(
                    Exit::Io,
                    format!(
                        "divergent: {}: no such state directory",
                        state_dir.display()
                    ),
                ));
            }
            if let (Some(id), Some(socket)) = (export, nbd_unix) {
                blkmirror::repl::divergent::serve(&state_dir, &id, &socket)
                    .map_err(|e| Failure::new(Exit::Io, format!("divergent: {e}")))?;
                return Ok(Exit::Ok);
            }
            let saved = blkmirror::repl::divergent::list(&*blkmirror::env::os(), &state_dir)
                .map_err(|e| Failure::new(Exit::Io, format!("divergent: {e}")))?;
            if json {
                println!("{}", serde_json::json!({ "saved": saved }));
            } else if saved.is_empty() {
                println!("no divergent writes saved in {}", state_dir.display());
            } else {
                println!(
                    "{:<40} {:<8} {:<25} {:>10} {:>7}  WHY",
                    "ID", "VOLUME", "SAVED", "BYTES", "RANGES"
                );
                for s in &saved {
                    println!(
                        "{:<40} {:<8} {:<25} {:>10} {:>7}  {}",
                        s.id,
                        s.volume,
                        blkmirror::repl::mirror::fmt_time(s.time_ms).unwrap_or_default(),
                        s.bytes,
                        s.ranges.len(),
                        s.why
                    );
                }
            }
        }
        Command::Events { control, now } => {
            return match blkmirror::events_cmd::run(&control, now) {
                Ok(code) => Ok(code),
                // The daemon stopped while followed, or the reader went away: said already.
                Err((code, why)) if why.is_empty() => Ok(code),
                Err((code, why)) => Err(Failure::new(code, why)),
            };
        }
        Command::Certs(cmd) => {
            blkmirror::certs::run(cmd).map_err(|e| Failure::new(e.exit_code(), e))?
        }
    }
    Ok(Exit::Ok)
}
