//! The primary daemon: opens the volumes, locks the state directory, serves NBD until SIGINT or
//! SIGTERM.

use crate::control;
use crate::daemon::{self, DaemonError, Signals};
use crate::disk::faults::{FaultRule, Faulty};
use crate::disk::file::{FileStorage, IoMode};
use crate::disk::spec::VolumeSpec;
use crate::disk::Storage;
use crate::journal::{Journal, JournalOptions, OnFull, MIN_JOURNAL_BYTES};
use crate::nbd::handshake::ExportInfo;
use crate::nbd::server::{Export, Limits, Server};
use crate::repl::core::primary::{Limits as SessionLimits, PrimaryVolumeState};
use crate::repl::core::ReplState;
use crate::repl::identity::GenId;
use crate::repl::shipper::{ShipStats, Shipper, VolumeRecord};
use crate::transport::{Identity, TlsFiles, Tuning};
use crate::volume::Volume;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

pub struct PrimaryOptions {
    pub volumes: Vec<VolumeSpec>,
    pub nbd_unix: PathBuf,
    pub nbd_tcp: Option<String>,
    /// Connection count and handshake time allowed to NBD clients.
    pub nbd_limits: Limits,
    pub state_dir: PathBuf,
    /// Replicate to a mirror (absent: serve NBD only).
    pub replication: Option<ReplicationOptions>,
    /// Control socket (default STATE_DIR/control.sock).
    pub control: Option<PathBuf>,
    /// Test-only fault rules (see `disk::faults`), applied to every volume.
    pub faults: Vec<String>,
}

pub struct ReplicationOptions {
    /// HOST:PORT of the mirror.
    pub mirror: String,
    pub tls: TlsFiles,
    pub tuning: Tuning,
    /// Cap on each volume's on-disk journal; writes wait beyond it.
    pub journal_bytes: u64,
    /// What a full journal does, and the dirty map's region.
    pub on_journal_full: OnFull,
    pub dirty_region: u64,
    /// `--pace-above`: pace writes beyond this fill of the journal (percent).
    pub pace_above: Option<u8>,
    /// Test only: corrupt one byte of the first data set after its CRC is computed.
    pub corrupt_first_set: bool,
    /// lz4 for data that shrinks; None = decide from the link rate.
    pub compress: Option<bool>,
}

/// Bytes of journal records all volumes keep in RAM for the shipper, at most.
const RAM_RINGS_BYTES: u64 = 256 << 20;

/// Each volume's RAM ring: an equal share of [`RAM_RINGS_BYTES`], from 4 to 32 MiB. Records
/// that left the ring are mapped from their segment (page cache) instead: a smaller ring
/// costs a little CPU, never correctness, and a daemon's memory no longer grows by 32 MiB
/// with every volume.
fn ram_ring_bytes(volumes: usize) -> u64 {
    (RAM_RINGS_BYTES / volumes.max(1) as u64).clamp(4 << 20, 32 << 20)
}

/// The limits of each volume's sessions. Test builds read `BLKMIRROR_TEST_STALL_TIMEOUT_MS`, so
/// that a test of the stall watchdog need not wait its 30 s.
fn session_limits() -> SessionLimits {
    #[allow(unused_mut)]
    let mut limits = SessionLimits::default();
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = std::env::var("BLKMIRROR_TEST_STALL_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        limits.stall_timeout = std::time::Duration::from_millis(ms);
    }
    limits
}

/// lz4 compresses at roughly 4 Gbit/s per core here: on a faster link it would slow shipping.
pub const COMPRESS_BELOW_BPS: u64 = 4_000_000_000;

pub fn run(opts: PrimaryOptions) -> Result<(), DaemonError> {
    let signals = Signals::block()?;
    if opts.volumes.is_empty() {
        return Err(DaemonError::NoVolumes);
    }
    let _lock = daemon::lock_state_dir(&opts.state_dir)?;
    // Each volume's disk, then (replicated) its journal and state, then its write path.
    let mut opened: Vec<(ExportInfo, Arc<dyn Storage>)> = Vec::new();
    for spec in &opts.volumes {
        if opened.iter().any(|(info, _)| info.name == spec.name) {
            return Err(DaemonError::DuplicateName(spec.name.clone()));
        }
        let file = FileStorage::open(spec, IoMode::Direct)?;
        tracing::info!(volume = %spec.name, path = %spec.path.display(), size = file.size(),
            read_only = spec.read_only, direct_io = file.direct_io(), "volume open");
        let storage: Arc<dyn Storage> = if opts.faults.is_empty() {
            Arc::new(file)
        } else {
            let rules = opts
                .faults
                .iter()
                .map(|r| r.parse::<FaultRule>())
                .collect::<Result<Vec<_>, _>>();
            tracing::warn!(volume = %spec.name, rules = ?opts.faults, "fault injection is ON (test only)");
            Arc::new(Faulty::new(file, rules.map_err(DaemonError::Fault)?))
        };
        opened.push((
            ExportInfo {
                name: spec.name.clone(),
                size: storage.size(),
                read_only: spec.read_only,
                description: format!("blkmirror volume {}", spec.name),
            },
            storage,
        ));
    }
    let mut volumes: Vec<Arc<Volume>> = opened
        .iter()
        .map(|(info, storage)| {
            Arc::new(Volume {
                name: info.name.clone(),
                storage: storage.clone(),
                journal: None,
                locks: Arc::new(crate::disk::ranges::RangeLocks::new()),
            })
        })
        .collect();
    let control = opts
        .control
        .clone()
        .unwrap_or_else(|| control::default_path(&opts.state_dir));
    let mut shipping: Vec<Shipping> = Vec::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        // Shipping (encoding, in the blocking pool) runs at the clients' priority: lowering it
        // (nice 5) let a burst of client writes starve the link, 2-3 % less throughput over the
        // WAN and a longer RPO; the journal bounds how far clients can run ahead anyway. The two
        // workers that drive QUIC for every volume weigh more the more volumes there are
        // (`daemon::network_nice`, issue 13).
        .on_thread_park({
            let nice = daemon::network_nice(opts.volumes.len());
            move || daemon::prioritize_network_thread(nice)
        })
        .thread_name("repl")
        .build()?;
    let mut quic_endpoint = None;
    if let Some(repl) = &opts.replication {
        let mirror = daemon::resolve("--mirror", &repl.mirror)?;
        if repl.journal_bytes < MIN_JOURNAL_BYTES {
            return Err(DaemonError::Config(format!(
                "--journal-size must be at least {} MiB",
                MIN_JOURNAL_BYTES >> 20
            )));
        }
        let identity = Arc::new(Identity::load(&repl.tls)?);
        let endpoint = {
            let _rt = runtime.enter();
            crate::transport::client_endpoint(&identity, &repl.tuning)?
        };
        quic_endpoint = Some(endpoint.clone());
        let fs = crate::env::os();
        let reserve = Arc::new(crate::env::Reserve::new(fs.clone(), &opts.state_dir));
        for (spec, volume) in opts.volumes.iter().zip(volumes.iter_mut()) {
            let dir = opts.state_dir.join("journal").join(&spec.name);
            let journal = Arc::new(Journal::open(JournalOptions {
                ram_bytes: ram_ring_bytes(opts.volumes.len()),
                on_full: repl.on_journal_full,
                // The map is kept whatever the mode: an open resync must finish.
                volume_bytes: volume.storage.size(),
                region_bytes: repl.dirty_region,
                pace_above: repl.pace_above,
                clock: journal_clock(),
                ..JournalOptions::new(fs.clone(), dir, repl.journal_bytes)
            })?);
            let record = Arc::new(open_record(
                &fs,
                &reserve,
                &opts.state_dir,
                &spec.name,
                &journal,
                &*volume.storage,
            )?);
            *volume = Arc::new(Volume {
                journal: Some(journal.clone()),
                ..Volume::clone_parts(volume)
            });
            let stats = Arc::new(ShipStats::default());
            stats
                .corrupt_next
                .store(repl.corrupt_first_set, std::sync::atomic::Ordering::Relaxed);
            let shipper = Arc::new(Shipper {
                volume: spec.name.clone(),
                journal: journal.clone(),
                storage: volume.storage.clone(),
                reader: Arc::new(volume.reader()),
                endpoint: endpoint.clone(),
                mirror,
                identity: identity.clone(),
                stats: stats.clone(),
                record: record.clone(),
                limits: session_limits(),
                compress: repl
                    .compress
                    .unwrap_or(repl.tuning.link_rate_bps < COMPRESS_BELOW_BPS),
                encode_pool: crate::disk::buf::VecPool::new(
                    crate::repl::shipper::ENCODE_POOL_BYTES,
                ),
                records: {
                    let notify = Arc::new(tokio::sync::Notify::new());
                    let waker: Arc<dyn crate::wake::Wake> = notify.clone();
                    journal.subscribe(&waker);
                    notify
                },
            });
            let wake = shipper.records.clone();
            runtime.spawn(shipper.run());
            shipping.push(Shipping {
                name: spec.name.clone(),
                journal,
                stats,
                record,
                storage: volume.storage.clone(),
                wake,
            });
        }
        // Made (again) once every volume's state is saved: a full file system at start may have
        // needed it.
        if let Err(e) = reserve.ensure() {
            tracing::warn!(state_dir = %opts.state_dir.display(),
                "cannot keep a reserve in the state directory ({e}): a journal that fills its file system may keep replication from resuming");
        }
        tracing::info!(mirror = %mirror, peer = %repl.tls.peer_name, volumes = shipping.len(), "replicating");
    } else {
        for spec in &opts.volumes {
            let dir = opts.state_dir.join("journal").join(&spec.name);
            if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
                tracing::warn!(volume = %spec.name, "this volume has a journal from a replicated run; without --mirror its writes are NOT journaled and the mirror will miss them");
            }
        }
    }
    let volumes_for_status: Vec<String> = opts.volumes.iter().map(|v| v.name.clone()).collect();
    let shipping = Arc::new(shipping);
    let shipping_for_close = shipping.clone();
    let control_socket = daemon::serve_control(
        &control,
        Arc::new(move |words: &[&str]| match words {
            ["status"] => primary_status(&volumes_for_status, &shipping),
            ["accept-volume", name] => accept_volume(&shipping, name),
            ["retry"] => retry(&shipping, None),
            ["retry", name] => retry(&shipping, Some(name)),
            ["verify", args @ ..] => verify(&shipping, args),
            other => control::unknown(
                other,
                "status, accept-volume NAME, retry [NAME], verify [--repair] [NAME]",
            ),
        }),
    )?;
    let exports = opened
        .into_iter()
        .zip(volumes)
        .map(|((info, _), volume)| Export { info, volume })
        .collect();
    let server = Server::new(exports, opts.nbd_limits);
    let (unix, nbd_socket) = daemon::bind_unix(&opts.nbd_unix)?;
    server.spawn_unix(unix)?;
    if let Some(addr) = &opts.nbd_tcp {
        let tcp = TcpListener::bind(daemon::resolve("--nbd-tcp", addr)?).map_err(|source| {
            DaemonError::Listen {
                what: addr.clone(),
                source,
            }
        })?;
        server.spawn_tcp(tcp)?;
    }
    tracing::info!(socket = %opts.nbd_unix.display(), tcp = opts.nbd_tcp.as_deref().unwrap_or("-"),
        "serving NBD");
    let sig = signals.wait_for_termination()?;
    tracing::info!(signal = %sig, "shutting down");
    drop(nbd_socket);
    drop(control_socket);
    // Writes not yet admitted (parked on a full journal: only the mirror could make room) are
    // refused, so that every write admitted ends before the journal closes and the volume
    // is sealed.
    for s in shipping_for_close.iter() {
        s.journal.refuse_new_writes();
    }
    let drained = server.shutdown(std::time::Duration::from_secs(10));
    if let Some(ep) = quic_endpoint {
        // Tell the mirror now, rather than let it wait out the idle timeout.
        ep.close(0u32.into(), b"primary shutting down");
        runtime.block_on(async {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), ep.wait_idle()).await;
        });
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // A clean stop leaves a clean journal (the next start knows nothing was lost) and a
    // sealed volume (the next start notices a change made while stopped).
    if drained {
        for v in shipping_for_close.iter() {
            let sealed = v.journal.close().and_then(|()| {
                let disk = v.storage.fingerprint()?;
                v.record.seal(disk)
            });
            if let Err(e) = sealed {
                tracing::warn!(volume = %v.name, "cannot close the journal cleanly: {e}");
            }
        }
    }
    Ok(())
}

/// `accept-volume NAME`: the admin says the volume's disk as it is now is the volume (after a
/// replacement, or a change made while the daemon was stopped). A new generation with a
/// break starts; the mirror is brought to it by a comparison.
fn accept_volume(shipping: &[Shipping], name: &str) -> serde_json::Value {
    let Some(v) = shipping.iter().find(|v| v.name == name) else {
        return serde_json::json!({
            "error": format!("no replicated volume named {name:?}"),
            "code": "usage",
        });
    };
    let disk = match v.storage.fingerprint() {
        Ok(d) => d,
        Err(e) => {
            return serde_json::json!({ "error": format!("cannot read the disk: {e}"), "code": "io" })
        }
    };
    let next = v.journal.last_seq() + 1;
    let mut accepted = false;
    let saved = v.record.update(|st| {
        accepted = st.accept_volume(&disk, next, GenId::random());
    });
    match saved {
        Err(e) => serde_json::json!({
            "error": format!("cannot save the volume's state: {e}"),
            "code": "io",
        }),
        Ok(()) if !accepted => serde_json::json!({
            "ok": true,
            "result": "already",
            "message": format!("volume {name}: already accepted: its disk is the one its state describes, nothing to accept"),
        }),
        Ok(()) => {
            tracing::warn!(volume = %name, disk = %disk.describe(),
                "the admin accepted the volume's disk: the mirror will be compared with it");
            v.record.retry.notify_one();
            serde_json::json!({
                "ok": true,
                "result": "accepted",
                "message": format!(
                    "volume {name}: {} accepted; the mirror is brought to it by a comparison \
                     (only differing chunks are sent)",
                    disk.describe()
                ),
            })
        }
    }
}

/// `retry [NAME]`: try again now, after a refusal or while backing off.
fn retry(shipping: &[Shipping], name: Option<&str>) -> serde_json::Value {
    let mut woken = Vec::new();
    for v in shipping.iter().filter(|v| name.is_none_or(|n| n == v.name)) {
        v.record.retry.notify_one();
        woken.push(v.name.clone());
    }
    if woken.is_empty() {
        return serde_json::json!({
            "error": format!("no replicated volume named {:?}", name.unwrap_or("")),
            "code": "usage",
        });
    }
    serde_json::json!({ "ok": true, "result": "retrying", "volumes": woken })
}

/// `verify [--repair] [NAME]`: start an online verify of each volume named (default: all),
/// which must be replicating with a complete mirror. Answers the run number of each, which
/// status shows under `verify` ("already" for one running).
fn verify(shipping: &[Shipping], args: &[&str]) -> serde_json::Value {
    use crate::repl::shipper::{VerifyRun, VerifyState};
    use std::sync::atomic::Ordering::Relaxed;
    let (mut repair, mut name) = (false, None);
    for a in args {
        match *a {
            "--repair" => repair = true,
            n if !n.starts_with('-') && name.is_none() => name = Some(n),
            other => {
                return serde_json::json!({
                    "error": format!("verify: unexpected {other:?} (verify [--repair] [NAME])"),
                    "code": "usage",
                })
            }
        }
    }
    let chosen: Vec<&Shipping> = shipping
        .iter()
        .filter(|v| name.is_none_or(|n| n == v.name))
        .collect();
    if chosen.is_empty() {
        return serde_json::json!({
            "error": format!("no replicated volume named {:?}", name.unwrap_or("")),
            "code": "usage",
        });
    }
    // All or none: a script asking for every volume learns at once which cannot be verified.
    let not_ready: Vec<String> = chosen
        .iter()
        .filter_map(|v| {
            let why = if !v.stats.link_up.load(Relaxed) {
                "not connected to the mirror"
            } else if v.stats.copying.load(Relaxed) || !v.stats.mirror_consistent.load(Relaxed) {
                "a resync runs (the mirror is not yet a complete copy)"
            } else {
                return None;
            };
            Some(format!("{}: {why}", v.name))
        })
        .collect();
    if !not_ready.is_empty() {
        return serde_json::json!({
            "error": format!("cannot verify now: {}", not_ready.join("; ")),
            "code": "not-replicating",
        });
    }
    // A verify of the other kind running: following it would say nothing of the repair asked
    // for (or report one not asked for). Refused, to be asked again once it is done.
    let other_kind: Vec<String> = chosen
        .iter()
        .filter_map(|v| {
            let g = v.stats.verify.lock().unwrap();
            let r = g.as_ref()?;
            (matches!(r.state, VerifyState::Starting | VerifyState::Running) && r.repair != repair)
                .then(|| {
                    format!(
                        "{}: a verify {} repair runs (run {})",
                        v.name,
                        if r.repair { "with" } else { "without" },
                        r.run
                    )
                })
        })
        .collect();
    if !other_kind.is_empty() {
        return serde_json::json!({
            "error": format!("{}: wait for it to end", other_kind.join("; ")),
            "code": "busy",
        });
    }
    let mut runs = Vec::new();
    for v in chosen {
        let mut guard = v.stats.verify.lock().unwrap();
        let result = match guard.as_ref() {
            Some(r) if matches!(r.state, VerifyState::Starting | VerifyState::Running) => "already",
            last => {
                let run = last.map_or(1, |r| r.run + 1);
                *guard = Some(VerifyRun {
                    run,
                    repair,
                    state: VerifyState::Starting,
                    progress: Default::default(),
                    started: std::time::Instant::now(),
                    started_ms: crate::repl::core::primary::unix_ms(std::time::SystemTime::now()),
                    finished_ms: None,
                });
                v.wake.notify_one();
                "started"
            }
        };
        let r = guard.as_ref().expect("set");
        runs.push(serde_json::json!({
            "name": v.name,
            "run": r.run,
            "repair": r.repair,
            "result": result,
        }));
    }
    serde_json::json!({ "ok": true, "result": "started", "volumes": runs })
}

/// A replicated volume, as the daemon keeps it.
struct Shipping {
    name: String,
    journal: Arc<Journal>,
    stats: Arc<ShipStats>,
    record: Arc<VolumeRecord>,
    storage: Arc<dyn Storage>,
    /// Wakes the volume's shipper (an admin's verify is to start).
    wake: Arc<tokio::sync::Notify>,
}

/// The volume's state at this start: its disk checked against what the state describes, and
/// a new generation, persisted before any write is taken.
fn open_record(
    fs: &crate::env::Fs,
    reserve: &Arc<crate::env::Reserve>,
    state_dir: &std::path::Path,
    name: &str,
    journal: &Journal,
    storage: &dyn Storage,
) -> Result<VolumeRecord, DaemonError> {
    let disk = storage.fingerprint()?;
    let path = PrimaryVolumeState::path(state_dir, name);
    let loaded = PrimaryVolumeState::load(&**fs, &path)?;
    let st = PrimaryVolumeState::at_start(
        loaded,
        &disk,
        journal.last_stop(),
        journal.last_seq() + 1,
        GenId::random(),
    );
    reserve.write_through(|| st.save(&**fs, &path))?;
    // Only now: a failure before this leaves the journal's account of the last stop as it was.
    reserve.write_through(|| journal.mark_running())?;
    let current = st.identity.lineage.current().copied();
    tracing::info!(volume = %name, uuid = ?st.identity.uuid,
        generation = ?current.map(|s| s.gen), first_seq = ?current.map(|s| s.first_seq),
        continuous = ?current.map(|s| s.continuous), last_stop = ?journal.last_stop(),
        "volume identity");
    if let Some(why) = &st.volume_changed {
        tracing::error!(volume = %name, "{why}: nothing is shipped until an admin accepts the volume");
    }
    Ok(VolumeRecord::new(fs.clone(), path, st, disk).with_reserve(reserve.clone()))
}

/// The clock the journal stamps writes with. Test builds read
/// `BLKMIRROR_TEST_CLOCK_SKEW_MS` (a primary whose clock lies, by that much ahead).
fn journal_clock() -> crate::journal::WallClock {
    #[cfg(feature = "test-hooks")]
    if let Some(skew) = std::env::var("BLKMIRROR_TEST_CLOCK_SKEW_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Arc::new(move || {
            crate::repl::core::primary::unix_ms(std::time::SystemTime::now()) + skew
        });
    }
    crate::journal::system_clock()
}

/// Bytes a second the running resync has moved since it began.
fn resync_rate(s: &ShipStats) -> Option<f64> {
    let started = (*s.copy_started.lock().unwrap())?;
    let secs = started.elapsed().as_secs_f64();
    (secs > 0.0).then(|| s.copy_done.load(std::sync::atomic::Ordering::Relaxed) as f64 / secs)
}

/// The status document of a primary (keys are a contract: extend, never rename).
fn primary_status(volumes: &[String], shipping: &[Shipping]) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let vols: Vec<serde_json::Value> = volumes
        .iter()
        .map(|name| match shipping.iter().find(|v| &v.name == name) {
            None => serde_json::json!({ "name": name, "link": "none", "replicated": false, "state": "standalone" }),
            Some(v) => {
                let (j, s) = (&v.journal, &v.stats);
                let js = j.stats();
                let copying = s.copying.load(Relaxed);
                let state = *s.state.lock().unwrap();
                let rec = v.record.snapshot();
                // The RPO is known only while the mirror holds a consistent copy: during a
                // copy, or when the mirror refuses, there is no usable copy to be behind.
                let rpo_known = s.mirror_consistent.load(Relaxed)
                    && !matches!(state, ReplState::Resyncing | ReplState::Refused
                        | ReplState::SplitBrain | ReplState::Unrelated | ReplState::VolumeChanged);
                serde_json::json!({
                    "name": name,
                    "replicated": true,
                    "state": state,
                    "uuid": rec.identity.uuid,
                    "generation": rec.identity.lineage.current().map(|c| c.gen),
                    "link": if s.link_up.load(Relaxed) { "up" } else { "down" },
                    "lag_bytes": js.lag_bytes,
                    "lag_seconds": if rpo_known { serde_json::json!(js.lag.as_secs_f64()) } else { serde_json::Value::Null },
                    "stalls": s.stalls.load(Relaxed),
                    "last_decision": s.last_decision.lock().unwrap().clone(),
                    "journal_bytes": js.disk_bytes,
                    "journal_full": js.full,
                    "journal_error": js.failure,
                    "journal_seq": js.last_seq,
                    "journal_tracking": js.tracking,
                    "journal_folds": js.folds,
                    "dirty_bytes": js.dirty_bytes,
                    "dirty_map_error": js.map_failure,
                    "journal_paced_writes": js.paced_writes,
                    "acked_seq": js.acked_seq,
                    "sent_bytes": s.sent_bytes.load(Relaxed),
                    "wire_bytes": s.wire_bytes.load(Relaxed),
                    "sent_set": s.sent_set.load(Relaxed),
                    "acked_set": s.acked_set.load(Relaxed),
                    "applied_set": s.applied_set.load(Relaxed),
                    "reconnects": s.reconnects.load(Relaxed),
                    "quic": *s.quic.lock().unwrap(),
                    "last_error": s.last_error.lock().unwrap().clone(),
                    "verify": s.verify.lock().unwrap().as_ref().map(|v| v.status()),
                    "initial_copy": if copying { serde_json::json!({
                        "done_bytes": s.copy_done.load(Relaxed),
                        "total_bytes": s.copy_total.load(Relaxed),
                        "left_bytes": s.copy_total.load(Relaxed).saturating_sub(s.copy_done.load(Relaxed)),
                        "rate_bytes_per_second": resync_rate(s),
                        "eta_seconds": resync_rate(s).filter(|&r| r > 0.0).map(|r|
                            s.copy_total.load(Relaxed).saturating_sub(s.copy_done.load(Relaxed)) as f64 / r),
                        "compare": s.comparing.load(Relaxed),
                        // "dirty": the regions written while the journal was folded; the
                        // mirror stays consistent (at its older point) meanwhile.
                        "kind": if s.dirty_resync.load(Relaxed) { "dirty" }
                            else if s.comparing.load(Relaxed) { "compare" } else { "copy" },
                    }) } else { serde_json::Value::Null },
                })
            }
        })
        .collect();
    serde_json::json!({ "role": "primary", "volumes": vols })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_rings_share_one_budget() {
        assert_eq!(
            ram_ring_bytes(1),
            32 << 20,
            "one volume keeps the full ring"
        );
        assert_eq!(ram_ring_bytes(8), 32 << 20);
        assert_eq!(ram_ring_bytes(32), 8 << 20);
        assert_eq!(ram_ring_bytes(1000), 4 << 20, "never below 4 MiB");
    }
}
