//! The mirror daemon: opens (and recovers) its volumes, listens for authenticated primaries,
//! serves its control socket, runs until SIGINT or SIGTERM.

use crate::control;
use crate::daemon::{self, DaemonError, Signals};
use crate::disk::spec::VolumeSpec;
use crate::repl::mirror::Mirror;
use crate::transport::{Identity, TlsFiles, Tuning};
use std::path::PathBuf;

pub struct MirrorOptions {
    pub listen: String,
    pub volumes: Vec<VolumeSpec>,
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    pub tuning: Tuning,
    pub control: Option<PathBuf>,
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

pub fn run(opts: MirrorOptions) -> Result<(), DaemonError> {
    let signals = Signals::block()?;
    if opts.volumes.is_empty() {
        return Err(DaemonError::NoVolumes);
    }
    let _lock = daemon::lock_state_dir(&opts.state_dir)?;
    let listen = daemon::resolve("--listen", &opts.listen)?;
    let identity = Identity::load(&opts.tls)?;
    let mirror = Mirror::open(&crate::env::os(), &opts.volumes, &opts.state_dir)?;
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
    let control_socket = daemon::serve_control(
        &control,
        control::status_only(move || {
            let vols: Vec<_> = m.volumes.iter().map(|v| v.status()).collect();
            serde_json::json!({ "role": "mirror", "volumes": vols })
        }),
    )?;
    tracing::info!(%listen, peer = %opts.tls.peer_name, volumes = opts.volumes.len(), "mirror listening");
    let sig = signals.wait_for_termination()?;
    tracing::info!(signal = %sig, "shutting down");
    drop(control_socket);
    endpoint.close(0u32.into(), b"mirror shutting down");
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // What was received is made durable, applied and checkpointed: a clean stop.
    mirror.close();
    Ok(())
}
