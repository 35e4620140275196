//! The primary daemon: opens the volumes, locks the state directory, serves NBD until SIGINT or
//! SIGTERM.

use crate::control;
use crate::daemon::{self, DaemonError, Event, RoleRequest};
use crate::disk::faults::{FaultRule, Faulty};
use crate::disk::file::{FileStorage, IoMode};
use crate::disk::spec::VolumeSpec;
use crate::disk::Storage;
use crate::journal::{Journal, JournalOptions, OnFull, MIN_JOURNAL_BYTES};
use crate::nbd::handshake::ExportInfo;
use crate::nbd::server::{Export, Limits, Server};
use crate::node::{Ctx, Link, Outcome};
use crate::repl::core::primary::{Limits as SessionLimits, PrimaryVolumeState};
use crate::repl::core::ReplState;
use crate::repl::identity::GenId;
use crate::repl::role::Role;
use crate::repl::shipper::{Pulled, ShipLink};
use crate::repl::shipper::{ShipStats, Shipper, VolumeRecord};
use crate::transport::{Identity, TlsFiles, Tuning};
use crate::volume::Volume;
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct PrimaryOptions {
    /// What a primary that replicated before does at start when its peer does not answer.
    pub peer_unreachable: PeerUnreachable,
    pub volumes: Vec<VolumeSpec>,
    /// Where the volumes are served (None: a mirror's command line without `--nbd-unix`,
    /// which cannot be promoted).
    pub nbd_unix: Option<PathBuf>,
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
    /// Who dials: `--mirror HOST:PORT` (a primary's command line), or `--listen` (a promoted
    /// mirror's: its peer dials and asks for the volumes).
    pub peer: crate::node::Link,
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

/// Run as the primary until stopped or demoted (`node::run` calls it with the lock held).
pub fn run_role(opts: &PrimaryOptions, ctx: &Ctx<'_>) -> Result<Outcome, DaemonError> {
    let signals = ctx.signals;
    let Some(nbd_unix) = opts.nbd_unix.clone() else {
        return Err(DaemonError::Config(
            "this daemon has no --nbd-unix: it cannot serve its volumes as a primary".into(),
        ));
    };
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
    let mut pull_routes: HashMap<String, tokio::sync::mpsc::Sender<Pulled>> = HashMap::new();
    let mut shippers: Vec<Arc<Shipper>> = Vec::new();
    if let Some(repl) = &opts.replication {
        if repl.journal_bytes < MIN_JOURNAL_BYTES {
            return Err(DaemonError::Config(format!(
                "--journal-size must be at least {} MiB",
                MIN_JOURNAL_BYTES >> 20
            )));
        }
        // The address first: a typo is a usage error whatever the certificates.
        let addr = match &repl.peer {
            Link::Dial(a) => daemon::resolve("--mirror", a)?,
            Link::Listen(a) => daemon::resolve("--listen", a)?,
        };
        let identity = Arc::new(Identity::load(&repl.tls)?);
        let (endpoint, dial) = match &repl.peer {
            Link::Dial(_) => {
                let _rt = runtime.enter();
                let ep = crate::transport::client_endpoint(&identity, &repl.tuning)?;
                (ep, Some(addr))
            }
            Link::Listen(_) => {
                let listen = addr;
                let _rt = runtime.enter();
                let key = crate::mirror_daemon::reset_key(&opts.state_dir)?;
                let ep = crate::transport::server_endpoint_with_reset_key(
                    listen,
                    &identity,
                    &repl.tuning,
                    &key,
                )?;
                (ep, None)
            }
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
            let link = match dial {
                Some(peer) => ShipLink::Dial {
                    endpoint: endpoint.clone(),
                    peer,
                },
                None => {
                    let (tx, rx) = tokio::sync::mpsc::channel(crate::repl::shipper::PULLS_QUEUED);
                    pull_routes.insert(spec.name.clone(), tx);
                    ShipLink::Answer(tokio::sync::Mutex::new(rx))
                }
            };
            let shipper = Arc::new(Shipper {
                volume: spec.name.clone(),
                journal: journal.clone(),
                storage: volume.storage.clone(),
                reader: Arc::new(volume.reader()),
                link,
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
            shippers.push(shipper.clone());
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
        if dial.is_none() {
            let sizes: HashMap<String, PullTarget> = shipping
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        PullTarget {
                            size: s.storage.size(),
                            stats: s.stats.clone(),
                            record: s.record.clone(),
                            journal: s.journal.clone(),
                        },
                    )
                })
                .collect();
            runtime.spawn(answer_pulls(endpoint.clone(), pull_routes, sizes));
        }
        tracing::info!(peer = ?repl.peer, peer_name = %repl.tls.peer_name, volumes = shipping.len(), "replicating");
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
    // No two writers: a primary that replicated before serves its clients only once its peer
    // answered as a secondary (it may have been promoted while this side was down).
    let gate = Arc::new(StartGate::default());
    let must_ask = ctx.process_start
        && opts.replication.is_some()
        && shipping
            .iter()
            .any(|v| v.record.snapshot().identity.uuid.is_some());
    if must_ask {
        *gate.holding.lock().unwrap() =
            Some("asking the peer whether it is still a secondary".into());
    }
    let gate_for_control = gate.clone();
    ctx.control.install(Arc::new(move |words: &[&str]| {
            match words {
            ["status"] => {
                let mut doc = primary_status(&volumes_for_status, &shipping);
                let holding = gate_for_control.holding.lock().unwrap().clone();
                doc["serving"] = holding.is_none().into();
                doc["not_serving_why"] = holding.into();
                doc
            }
            ["accept-volume", name] => accept_volume(&shipping, name),
            ["retry"] => retry(&shipping, None),
            ["retry", name] => retry(&shipping, Some(name)),
            ["verify", args @ ..] => verify(&shipping, args),
            other => control::unknown(
                other,
                "status, accept-volume NAME, retry [NAME], verify [--repair] [NAME], demote SECS, promote",
            ),
        }
    }))?;
    let exports = opened
        .into_iter()
        .zip(volumes)
        .map(|((info, _), volume)| Export { info, volume })
        .collect();
    let server = Server::new(exports, opts.nbd_limits);
    if !must_ask {
        for v in shipping_for_close.iter() {
            v.stats
                .serving
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    } else {
        server.hold_doors();
        let volumes = shipping_for_close
            .iter()
            .map(|v| (v.stats.clone(), v.record.clone()))
            .collect();
        gate.clone().spawn(
            server.clone(),
            volumes,
            opts.peer_unreachable,
            ctx.desk.clone(),
        );
    }
    let (unix, nbd_socket) = daemon::bind_unix(&nbd_unix)?;
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
    tracing::info!(socket = %nbd_unix.display(), tcp = opts.nbd_tcp.as_deref().unwrap_or("-"),
        "serving NBD");
    // A promotion's answer: its volumes are served now.
    ctx.ready();
    let mut nbd_socket = Some(nbd_socket);
    // Waits for a stop, or carries out a demotion asked through the control socket.
    // How this role's run ends: stopped, serving again after a demotion that failed once its
    // clients were disconnected, or demoted.
    enum End {
        Stop,
        Again,
        Demote(RoleRequest, Vec<(String, GenId, u64)>),
        DiscardLocal(RoleRequest),
    }
    let end = loop {
        match signals.wait_for_event()? {
            Event::Stop(sig) => {
                tracing::info!(signal = %sig, "shutting down");
                break End::Stop;
            }
            Event::RoleChange => {
                let Some(req) = ctx.desk.take() else { continue };
                if req.to == Role::Primary {
                    let _ = req.reply.send(gate.promote(req.force));
                    continue;
                }
                if req.discard_local.is_some() {
                    match discard_check(opts, &shipping_for_close) {
                        Ok(()) => break End::DiscardLocal(req),
                        Err(why) => {
                            // A failback the start gate asked for has nobody waiting for the
                            // answer: the log says why it did not happen.
                            tracing::error!("not giving this side's writes up: {why}");
                            let _ = req
                                .reply
                                .send(serde_json::json!({ "error": why, "code": "wrong-state" }));
                            continue;
                        }
                    }
                }
                match prepare_demotion(
                    opts,
                    &shipping_for_close,
                    &shippers,
                    &server,
                    &mut nbd_socket,
                    req.timeout,
                ) {
                    Ok(names) => break End::Demote(req, names),
                    Err((answer, stopped_serving)) => {
                        let _ = req.reply.send(answer);
                        // Its clients were disconnected: the primary starts again (a new
                        // generation), serving as before.
                        if stopped_serving {
                            break End::Again;
                        }
                    }
                }
            }
        }
    };
    // One clean stop of this role's machinery, whatever comes next. After a demotion's checks
    // every volume's peer holds every write and nothing is written any more: the shippers stop
    // (a session's end mints a generation with no write: the names taken stay right), the
    // journals close cleanly, then each volume's role changes on disk.
    shutdown(
        &shipping_for_close,
        &server,
        quic_endpoint,
        runtime,
        nbd_socket,
        &ctx.control,
        Role::Primary,
    );
    let (req, names) = match end {
        End::Stop => return Ok(Outcome::Stopped),
        End::Again => {
            return Ok(Outcome::Again {
                held: gate.holding.lock().unwrap().is_some(),
            })
        }
        End::Demote(req, names) => (req, names),
        End::DiscardLocal(req) => {
            let how = req.discard_local.expect("a discard was asked");
            return match commit_discards(opts, &shipping_for_close, how) {
                Ok(volumes) => {
                    tracing::warn!(volumes = ?volumes,
                        "{how}: this daemon is now a secondary of its peer; the writes it gave up are saved");
                    Ok(now_secondary(
                        ctx,
                        req.reply,
                        serde_json::json!({
                            "ok": true,
                            "result": "resolved",
                            "how": how,
                            "role": "secondary",
                            "volumes": volumes,
                            "message": "this side is a secondary of its peer now; the writes it \
                                        gave up are saved (blkmirror divergent)",
                        }),
                    ))
                }
                Err(why) => {
                    // Its clients are gone and its own writes may be saved already: it stops
                    // rather than serve next to a peer that is a primary.
                    tracing::error!("{how} failed: {why}");
                    let _ = req
                        .reply
                        .send(serde_json::json!({ "error": why.clone(), "code": "io" }));
                    Err(DaemonError::Config(format!("{how} failed: {why}")))
                }
            };
        }
    };
    match commit_demotions(opts, &shipping_for_close, &names) {
        Ok(volumes) => {
            tracing::warn!(volumes = ?volumes, "demoted: this daemon is now a secondary");
            Ok(now_secondary(
                ctx,
                req.reply,
                serde_json::json!({
                    "ok": true,
                    "result": "demoted",
                    "role": "secondary",
                    "volumes": volumes,
                    "message": "every write is durable at the peer; this side is a secondary \
                                now (its NBD exports are closed)",
                }),
            ))
        }
        Err(why) => {
            tracing::error!("demotion failed: {why}");
            let _ = req
                .reply
                .send(serde_json::json!({ "error": why, "code": "io" }));
            Ok(Outcome::Again {
                held: gate.holding.lock().unwrap().is_some(),
            })
        }
    }
}

/// The volumes are a secondary's now (committed): the control socket says so meanwhile, and
/// `answer` goes to `reply` once the secondary role runs.
fn now_secondary(
    ctx: &Ctx<'_>,
    reply: std::sync::mpsc::Sender<serde_json::Value>,
    answer: serde_json::Value,
) -> Outcome {
    ctx.control.install_transition(Role::Secondary);
    Outcome::Switched(Role::Secondary, crate::node::Answer { to: reply, answer })
}

/// What a primary that replicated before does at start when its peer does not answer within
/// [`PEER_CHECK`] (`--peer-unreachable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerUnreachable {
    /// Serve anyway: production first (two writers if the peer was promoted meanwhile; a
    /// split brain then refused, never merged).
    Serve,
    /// Serve only once the peer answered as a secondary (or the admin runs `promote --force`).
    Wait,
}

/// How long a starting primary waits for its peer's answer before `--peer-unreachable serve`
/// serves anyway: a QUIC handshake and a decision take a few round trips, even across Europe.
pub const PEER_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// A starting primary's clients wait behind this until its peer answered (module doc of
/// `node`: no two writers).
#[derive(Default)]
struct StartGate {
    /// Why the clients are not served yet (None: served).
    holding: Mutex<Option<String>>,
    /// `promote --force` on this primary: serve without the peer's word.
    admin_says_serve: std::sync::atomic::AtomicBool,
}

impl StartGate {
    /// `promote` on this primary: "already", unless it does not serve yet (its peer has not
    /// answered): then `--force` serves without the peer's word, and without it, why not.
    fn promote(&self, force: bool) -> serde_json::Value {
        let holding = self.holding.lock().unwrap().clone();
        match holding {
            None => serde_json::json!({
                "ok": true, "result": "already", "role": "primary",
                "message": "already the primary",
            }),
            Some(_) if force => {
                self.admin_says_serve
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!(
                    "promote --force: serving without the peer's word (the admin's choice)"
                );
                serde_json::json!({
                    "ok": true,
                    "result": "serving",
                    "role": "primary",
                    "message": "serving its clients without the peer's word, as the admin asked",
                })
            }
            Some(why) => serde_json::json!({
                "error": format!(
                    "this primary does not serve yet: {why}; promote --force serves without the \
                     peer's word (two writers if the peer was promoted)"
                ),
                "code": "wrong-state",
            }),
        }
    }

    fn spawn(
        self: Arc<Self>,
        server: Arc<Server>,
        volumes: Vec<(Arc<ShipStats>, Arc<VolumeRecord>)>,
        policy: PeerUnreachable,
        desk: Arc<daemon::RoleDesk>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let started = std::time::Instant::now();
        let stats: Vec<Arc<ShipStats>> = volumes.iter().map(|(s, _)| s.clone()).collect();
        let _ = std::thread::Builder::new()
            .name("start-gate".into())
            .spawn(move || {
                let mut told = String::new();
                let mut failback_asked = false;
                loop {
                    if server.is_stopping() {
                        return;
                    }
                    // The peer was promoted from this side's data while it was away, and this
                    // side has not served since: it becomes that primary's secondary, its own
                    // writes the peer never got saved first (no two writers, nothing lost).
                    if !failback_asked && superseded_by_peer(&volumes) {
                        failback_asked = desk.ask(RoleRequest {
                            to: Role::Secondary,
                            force: false,
                            point: None,
                            timeout: std::time::Duration::ZERO,
                            discard_local: Some("failback"),
                            reply: std::sync::mpsc::channel().0,
                        });
                        if failback_asked {
                            tracing::warn!(
                                "the peer was promoted from this side's data while it was away: \
                                 this side becomes its secondary (failback); its writes the \
                                 peer never got are saved first"
                            );
                        }
                    }
                    let primary_peer = stats.iter().any(|s| {
                        s.peer_is_primary.load(Relaxed) && !s.peer_superseded.load(Relaxed)
                    });
                    let answered = stats.iter().all(|s| {
                        s.peer_is_secondary.load(Relaxed)
                            || (s.peer_is_primary.load(Relaxed) && s.peer_superseded.load(Relaxed))
                    });
                    let split_brain = volumes.iter().any(|(_, r)| {
                        let st = r.snapshot();
                        st.split_brain.is_some() || st.served_unconfirmed
                    });
                    let why = if self.admin_says_serve.load(Relaxed) {
                        None
                    } else if primary_peer && split_brain {
                        Some(
                            "split brain: this side served its clients without its peer's \
                             word, and its peer was promoted from its data; not serving: \
                             blkmirror resolve --discard-local on the side whose writes are \
                             given up (or promote --force here to serve, beside the peer that \
                             serves too: two writers); see docs/FAILOVER.md"
                                .to_string(),
                        )
                    } else if primary_peer {
                        Some(
                            "the peer is a primary too (promoted while this side was away?): \
                              not serving; see docs/FAILOVER.md"
                                .to_string(),
                        )
                    } else if answered {
                        None
                    } else if started.elapsed() >= PEER_CHECK && policy == PeerUnreachable::Serve {
                        tracing::warn!(
                            "the peer did not answer within {} s: serving anyway \
                            (--peer-unreachable serve)",
                            PEER_CHECK.as_secs()
                        );
                        None
                    } else {
                        Some("waiting for the peer to answer (--peer-unreachable wait)".to_string())
                            .filter(|_| started.elapsed() >= PEER_CHECK)
                            .or_else(|| {
                                Some("asking the peer whether it is still a secondary".into())
                            })
                    };
                    match why {
                        None => {
                            if !answered {
                                // Serving without the peer's word: said durably first, so
                                // that no restart takes these writes for a tail.
                                let said = volumes.iter().try_for_each(|(_, r)| {
                                    r.update(|st| st.served_unconfirmed = true)
                                });
                                if let Err(e) = said {
                                    tracing::error!(
                                        "cannot record serving without the \
                                        peer's word: {e}; not serving yet"
                                    );
                                    std::thread::sleep(std::time::Duration::from_secs(1));
                                    continue;
                                }
                            }
                            for s in &stats {
                                s.serving.store(true, Relaxed);
                            }
                            server.open_doors();
                            *self.holding.lock().unwrap() = None;
                            tracing::info!("serving the clients");
                            return;
                        }
                        Some(why) => {
                            if why != told {
                                if primary_peer {
                                    tracing::error!("{why}");
                                } else {
                                    tracing::info!("{why}");
                                }
                                told = why.clone();
                            }
                            *self.holding.lock().unwrap() = Some(why);
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
    }
}

/// Every volume's peer is a primary whose promotion continued this side's data
/// (`identity::supersedes`): this side is the old primary, back.
fn superseded_by_peer(volumes: &[(Arc<ShipStats>, Arc<VolumeRecord>)]) -> bool {
    !volumes.is_empty()
        && volumes.iter().all(|(stats, record)| {
            let ours = record.snapshot();
            stats.fresh_peer_claim().is_some_and(|c| {
                // A split brain with this peer seen before a restart is the admin's to
                // resolve.
                let promoted = c.lineage.latest_promoted().map(|i| c.lineage.spans[i].gen);
                crate::repl::identity::supersedes(&c.lineage, &ours.identity.lineage)
                    && ours.split_brain != promoted
                    && !ours.served_unconfirmed
            })
        })
}

/// A clean stop of the primary's machinery: NBD drained, the link closed, journals closed
/// and volumes sealed.
fn shutdown(
    shipping: &[Shipping],
    server: &Arc<Server>,
    quic_endpoint: Option<quinn::Endpoint>,
    runtime: tokio::runtime::Runtime,
    nbd_socket: Option<daemon::SocketFile>,
    control: &daemon::ControlSwitch,
    next: Role,
) {
    drop(nbd_socket);
    control.install_transition(next);
    // Writes not yet admitted (parked on a full journal: only the mirror could make room) are
    // refused, so that every write admitted ends before the journal closes and the volume
    // is sealed.
    for s in shipping {
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
        for v in shipping {
            // The volume's writes are durable before the journal says nothing was lost.
            let sealed = v
                .storage
                .sync_durable()
                .and_then(|()| v.journal.close())
                .and_then(|()| {
                    let disk = v.storage.fingerprint()?;
                    v.record.seal(disk)
                });
            if let Err(e) = sealed {
                tracing::warn!(volume = %v.name, "cannot close the journal cleanly: {e}");
            }
        }
    }
}

/// Stop the clients' writes (the NBD exports close) and wait until every volume's peer
/// acknowledged every write in a live session. The name of each volume's data then,
/// (generation, last seq); or the answer to give and whether serving stopped.
#[allow(clippy::type_complexity)]
fn prepare_demotion(
    opts: &PrimaryOptions,
    shipping: &[Shipping],
    shippers: &[Arc<Shipper>],
    server: &Arc<Server>,
    nbd_socket: &mut Option<daemon::SocketFile>,
    timeout: std::time::Duration,
) -> Result<Vec<(String, GenId, u64)>, (serde_json::Value, bool)> {
    let refuse = |why: String| {
        (
            serde_json::json!({ "error": why, "code": "wrong-state" }),
            false,
        )
    };
    if opts.replication.is_none() || shipping.is_empty() {
        return Err(refuse(
            "this primary replicates to no peer (no --mirror): there is nobody to take over".into(),
        ));
    }
    for v in shipping {
        let st = v.record.snapshot();
        if st.identity.uuid.is_none() {
            return Err(refuse(format!(
                "volume {}: its peer never received it (no initial copy yet)",
                v.name
            )));
        }
        if let Some(why) = st.volume_changed {
            return Err(refuse(format!("volume {}: {why}", v.name)));
        }
    }
    tracing::warn!("demote: closing the NBD exports; waiting for the peer to hold every write");
    *nbd_socket = None;
    server.shutdown(std::time::Duration::from_secs(10));
    for (v, s) in shipping.iter().zip(shippers) {
        // A fresh answer, with no write in flight any more.
        *v.stats.demotable.lock().unwrap() = None;
        v.stats
            .demotion_asked
            .store(true, std::sync::atomic::Ordering::Relaxed);
        s.records.notify_one();
    }
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let answers: Vec<(String, Option<Result<(GenId, u64), String>>)> = shipping
            .iter()
            .map(|v| (v.name.clone(), v.stats.demotable.lock().unwrap().clone()))
            .collect();
        if answers.iter().all(|(_, a)| matches!(a, Some(Ok(_)))) {
            return Ok(answers
                .into_iter()
                .map(|(n, a)| {
                    let (g, seq) = a.expect("checked").expect("checked");
                    (n, g, seq)
                })
                .collect());
        }
        if std::time::Instant::now() >= deadline {
            let why: Vec<String> = answers
                .iter()
                .filter_map(|(n, a)| match a {
                    Some(Ok(_)) => None,
                    Some(Err(why)) => Some(format!("{n}: {why}")),
                    None => Some(format!("{n}: not connected to the peer")),
                })
                .collect();
            return Err((
                serde_json::json!({
                    "error": format!(
                        "not demoted: after {} s the peer does not hold every write ({}); this \
                         side stays the primary, serving again if it served (a primary that \
                         held its clients back asks its peer again first)",
                        timeout.as_secs(),
                        why.join("; ")
                    ),
                    "code": "timed-out",
                }),
                true,
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        for s in shippers {
            s.records.notify_one();
        }
    }
}

/// Each volume's role changes on disk, under the intent (`node::Intent`).
fn commit_demotions(
    opts: &PrimaryOptions,
    shipping: &[Shipping],
    names: &[(String, GenId, u64)],
) -> Result<Vec<serde_json::Value>, String> {
    let fs = crate::env::os();
    let intent = crate::node::Intent {
        to: Role::Secondary,
        force: false,
        held: names
            .iter()
            .map(|(n, g, seq)| (n.clone(), (*g, *seq)))
            .collect(),
        discarded: Default::default(),
    };
    crate::node::write_intent(&fs, &opts.state_dir, &intent).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, gen, seq) in names {
        let v = shipping
            .iter()
            .find(|v| &v.name == name)
            .expect("named from shipping");
        let last = v.journal.last_seq();
        if last != *seq {
            return Err(format!(
                "volume {name}: its journal ends at seq {last}, not {seq} as acknowledged"
            ));
        }
        let disk = v.storage.fingerprint().map_err(|e| e.to_string())?;
        // Every write up to now is held at both sites (the writes stopped before the check).
        let newest = crate::repl::core::primary::unix_ms(std::time::SystemTime::now());
        let st = crate::repl::role::demoted(&v.record.snapshot(), last, *gen, &disk, newest)?;
        crate::repl::role::commit_demotion(&fs, &opts.state_dir, name, &st, None)
            .map_err(|e| format!("volume {name}: {e}"))?;
        out.push(serde_json::json!({ "name": name, "generation": gen, "seq": seq }));
    }
    crate::node::clear_intent(&fs, &opts.state_dir).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Whether every volume can give its own writes up for its peer's: the peer is a primary
/// that said lately what it holds, and the two parted at a known state.
fn discard_check(opts: &PrimaryOptions, shipping: &[Shipping]) -> Result<(), String> {
    if opts.replication.is_none() || shipping.is_empty() {
        return Err(
            "this primary replicates to no peer (no --mirror): there is no peer to give \
             its writes up for"
                .into(),
        );
    }
    for v in shipping {
        let Some(claim) = v.stats.fresh_peer_claim() else {
            return Err(format!(
                "volume {}: the peer is not known to be a primary now (resolve is for two \
                 primaries that reach each other: status shows both_primary, link attempts \
                 answered within {} s)",
                v.name,
                crate::repl::shipper::PEER_CLAIM_FRESH.as_secs()
            ));
        };
        crate::repl::role::parting_point(&v.record.snapshot(), &claim.lineage)
            .map_err(|e| format!("volume {}: {e}", v.name))?;
    }
    Ok(())
}

/// Give every volume's own writes since it parted from its peer up: save them
/// (`repl::divergent`), then make the volume a secondary holding the state both held, under
/// an intent naming each volume's new state (a stop in the middle completes it).
fn commit_discards(
    opts: &PrimaryOptions,
    shipping: &[Shipping],
    how: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let fs = crate::env::os();
    // An attempt a stop cut short before its intent: its saves go (this one saves again).
    crate::repl::divergent::remove_pending(&*fs, &opts.state_dir).map_err(|e| e.to_string())?;
    let mut saved_now = Vec::new();
    let result = save_and_commit_discards(opts, shipping, how, &mut saved_now);
    if result.is_err()
        && !fs
            .exists(&crate::node::intent_path(&opts.state_dir))
            .unwrap_or(true)
    {
        // No volume changed role: the next attempt saves every tail again, so these go.
        if let Err(e) = crate::repl::divergent::remove_pending(&*fs, &opts.state_dir) {
            tracing::warn!("cannot remove the saves of a role change that failed: {e}");
        }
    }
    result
}

fn save_and_commit_discards(
    opts: &PrimaryOptions,
    shipping: &[Shipping],
    how: &str,
    saved_now: &mut Vec<String>,
) -> Result<Vec<serde_json::Value>, String> {
    let fs = crate::env::os();
    let now = crate::repl::core::primary::unix_ms(std::time::SystemTime::now());
    let mut states = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for v in shipping {
        let claim = v
            .stats
            .peer_claim
            .lock()
            .unwrap()
            .clone()
            .map(|(c, _)| c)
            .ok_or_else(|| format!("volume {}: the peer's claim is gone", v.name))?;
        let st = v.record.snapshot();
        let parted = crate::repl::role::parting_point(&st, &claim.lineage)?;
        let (regions, whole) = crate::repl::role::given_up_regions(
            &v.journal,
            &st.identity.lineage,
            parted,
            v.storage.size(),
        );
        if whole {
            tracing::warn!(volume = %v.name, "its own writes since the parting point cannot be \
                told apart (a host crash, or a journal trimmed past that point): the whole \
                volume is saved and resynced");
        }
        let storage = v.storage.clone();
        let saved = crate::repl::divergent::save(
            &*fs,
            &opts.state_dir,
            &crate::repl::divergent::Tail {
                volume: &v.name,
                size: storage.size(),
                why: how,
                parted,
                ranges: &regions,
                time_ms: now,
            },
            &mut |at, buf| storage.read_sync(at, buf),
        )
        .map_err(|e| format!("volume {}: cannot save its divergent writes: {e}", v.name))?;
        saved_now.push(saved.id.clone());
        crate::repl::divergent::note_pending(&*fs, &opts.state_dir, Some(saved_now))
            .map_err(|e| e.to_string())?;
        tracing::warn!(volume = %v.name, saved = %saved.id, bytes = saved.bytes,
            ranges = saved.ranges.len(), parted_gen = %parted.0, parted_seq = parted.1,
            "the writes this side gives up are saved");
        let disk = storage.fingerprint().map_err(|e| e.to_string())?;
        let m = crate::repl::role::discarded(&st, &claim, regions, &disk, how, saved.id.clone())
            .map_err(|e| format!("volume {}: {e}", v.name))?;
        out.push(serde_json::json!({
            "name": v.name,
            "parted_generation": parted.0,
            "parted_seq": parted.1,
            "saved": saved.id,
            "saved_bytes": saved.bytes,
            "saved_ranges": saved.ranges.len(),
        }));
        states.insert(v.name.clone(), m);
    }
    // The intent owns the saves from here (a stop after it completes the change); a stop
    // between these two steps leaves saves nobody removes, never removes committed ones.
    crate::repl::divergent::note_pending(&*fs, &opts.state_dir, None).map_err(|e| e.to_string())?;
    let intent = crate::node::Intent {
        to: Role::Secondary,
        force: false,
        held: Default::default(),
        discarded: states.clone(),
    };
    crate::node::write_intent(&fs, &opts.state_dir, &intent).map_err(|e| e.to_string())?;
    for (name, m) in &states {
        crate::repl::role::commit_demotion(&fs, &opts.state_dir, name, m, None)
            .map_err(|e| format!("volume {name}: {e}"))?;
    }
    crate::node::clear_intent(&fs, &opts.state_dir).map_err(|e| e.to_string())?;
    Ok(out)
}

/// What the listener needs of a volume to answer a peer that dials for it.
struct PullTarget {
    size: u64,
    stats: Arc<ShipStats>,
    record: Arc<VolumeRecord>,
    journal: Arc<Journal>,
}

/// A promoted mirror's listener: its secondary peer dials and asks for each volume
/// (`Message::Pull`); the stream goes to that volume's shipper. A primary that dials is
/// refused (both sides would be primaries).
async fn answer_pulls(
    endpoint: quinn::Endpoint,
    routes: HashMap<String, tokio::sync::mpsc::Sender<Pulled>>,
    sizes: HashMap<String, PullTarget>,
) {
    use crate::repl::frame::{Message, RefuseCode};
    let routes = Arc::new(routes);
    let sizes = Arc::new(sizes);
    let pool = crate::disk::buf::SharedPool::new(1 << 20);
    let mut acceptor = crate::transport::Acceptor::new(endpoint);
    while let Some(incoming) = acceptor.accept().await {
        let Ok(conn) = incoming else { continue };
        let (routes, sizes, pool) = (routes.clone(), sizes.clone(), pool.clone());
        tokio::spawn(async move {
            let peer = conn.remote_address();
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            let first = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                crate::repl::stream::read_message(&mut recv, &pool),
            )
            .await;
            let refuse = |code: RefuseCode, why: String| (code, why);
            let refusal = match first {
                Ok(Ok(Some((
                    Message::Pull {
                        version,
                        volume,
                        size,
                        ..
                    },
                    _,
                )))) => match (routes.get(&volume), sizes.get(&volume)) {
                    (Some(route), Some(&PullTarget { size: here, .. })) => {
                        match crate::repl::core::mirror::check_hello(version, &volume, size, here) {
                            Err(r) => r,
                            Ok(()) => match route.try_send(Pulled {
                                conn: conn.clone(),
                                send,
                                recv,
                            }) {
                                Ok(()) => return,
                                Err(e) => {
                                    let p = e.into_inner();
                                    send = p.send;
                                    refuse(
                                        RefuseCode::Stopping,
                                        format!("volume {volume} is busy: ask again"),
                                    )
                                }
                            },
                        }
                    }
                    _ => refuse(
                        RefuseCode::UnknownVolume,
                        format!("no volume named {volume:?} here"),
                    ),
                },
                Ok(Ok(Some((Message::Hello { volume, .. }, _)))) => {
                    // A primary dials: both sides are primaries. Its Identify says whether
                    // this side's promotion continued its data (it is the old primary, back:
                    // this side goes on serving) or not (neither may serve on a guess).
                    let claim = match tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        crate::repl::stream::read_message(&mut recv, &pool),
                    )
                    .await
                    {
                        Ok(Ok(Some((Message::Identify(c), _)))) => Some(c),
                        _ => None,
                    };
                    let mut own_claim = None;
                    let why = match (sizes.get(&volume), claim) {
                        (
                            Some(PullTarget {
                                stats,
                                record,
                                journal,
                                ..
                            }),
                            Some(claim),
                        ) => {
                            let st = record.snapshot();
                            // What this side holds goes to the peer before the refusal: the
                            // point where the two parted (a failback, `resolve`).
                            own_claim = Some(st.claim(journal, &record.disk));
                            let ours = st.identity.lineage;
                            let superseded =
                                crate::repl::identity::supersedes(&ours, &claim.lineage);
                            *stats.peer_claim.lock().unwrap() =
                                Some(((*claim).clone(), std::time::Instant::now()));
                            stats
                                .peer_is_primary
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                            stats
                                .peer_superseded
                                .store(superseded, std::sync::atomic::Ordering::Relaxed);
                            if superseded {
                                format!(
                                    "volume {volume}: this side was promoted from your data while \
                                     you were away: it is the primary; you must not serve \
                                     (make this side's peer a secondary)"
                                )
                            } else {
                                format!(
                                    "volume {volume}: this side is a primary too, and neither \
                                     continues the other's data: split brain (demote one of \
                                     the two)"
                                )
                            }
                        }
                        _ => format!("volume {volume}: this side is a primary too"),
                    };
                    if let Some(c) = own_claim {
                        let _ = crate::repl::stream::write_message(
                            &mut send,
                            &Message::Identify(Box::new(c)),
                        )
                        .await;
                    }
                    refuse(RefuseCode::BothPrimary, why)
                }
                _ => refuse(RefuseCode::BadMessage, "expected Pull".into()),
            };
            tracing::warn!(%peer, code = ?refusal.0, "refused the peer: {}", refusal.1);
            let _ = crate::repl::stream::write_message(
                &mut send,
                &Message::Refuse {
                    code: refusal.0 as u16,
                    reason: refusal.1,
                },
            )
            .await;
            let _ = send.finish();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            conn.close(0u32.into(), b"refused");
        });
    }
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
            None => serde_json::json!({ "name": name, "link": "none", "replicated": false,
                "state": "standalone", "role": "primary", "disk_state": "UpToDate",
                "peer_role": "none" }),
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
                        | ReplState::SplitBrain | ReplState::Unrelated | ReplState::VolumeChanged
                        | ReplState::BothPrimary);
                let link_up = s.link_up.load(Relaxed);
                let mut doc = serde_json::json!({
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
                    // Regions a peer gave up (its divergent tail), resynced from here.
                    "taken_over_bytes": s.taken_over_bytes.load(Relaxed),
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
                });
                doc["role"] = "primary".into();
                doc["peer_role"] = if link_up {
                    "secondary"
                } else if state == ReplState::BothPrimary || s.peer_is_primary.load(Relaxed) {
                    "primary"
                } else {
                    "unknown"
                }
                .into();
                // The primary's own disk holds the newest data by definition.
                doc["disk_state"] = "UpToDate".into();
                doc["promotion"] =
                    serde_json::json!({ "allowed": false, "why": "already the primary" });
                doc
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
