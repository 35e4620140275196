//! The mirror daemon: opens (and recovers) its volumes, listens for authenticated primaries,
//! serves its control socket, runs until SIGINT or SIGTERM.

use crate::control;
use crate::disk::spec::VolumeSpec;
use crate::primary::{block_termination_signals, lock_state_dir, wait_for_signal, PrimaryError};
use crate::repl::mirror::Mirror;
use crate::transport::{Identity, TlsFiles, Tuning};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;

pub struct MirrorOptions {
    pub listen: String,
    pub volumes: Vec<VolumeSpec>,
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    pub tuning: Tuning,
    pub control: Option<PathBuf>,
}

pub fn run(opts: MirrorOptions) -> Result<(), PrimaryError> {
    let signals = block_termination_signals();
    if opts.volumes.is_empty() {
        return Err(PrimaryError::NoVolumes);
    }
    let _lock = lock_state_dir(&opts.state_dir)?;
    let listen = opts
        .listen
        .to_socket_addrs()
        .map_err(|e| PrimaryError::MirrorAddr(opts.listen.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| {
            PrimaryError::MirrorAddr(opts.listen.clone(), "resolves to nothing".into())
        })?;
    let identity = Identity::load(&opts.tls)?;
    let mirror = Mirror::open(&opts.volumes, &opts.state_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("repl")
        .build()?;
    let endpoint = {
        let _rt = runtime.enter();
        crate::transport::server_endpoint(listen, &identity, &opts.tuning)?
    };
    runtime.spawn(mirror.clone().serve(endpoint));
    let control = opts
        .control
        .clone()
        .unwrap_or_else(|| control::default_path(&opts.state_dir));
    let m = mirror.clone();
    control::serve(
        &control,
        Arc::new(move || {
            let vols: Vec<_> = m.volumes.iter().map(|v| v.status()).collect();
            serde_json::json!({ "role": "mirror", "volumes": vols })
        }),
    )
    .map_err(|source| PrimaryError::Listen {
        what: control.display().to_string(),
        source,
    })?;
    tracing::info!(%listen, peer = %opts.tls.peer_name, volumes = opts.volumes.len(), "mirror listening");
    let sig = wait_for_signal(&signals);
    tracing::info!(signal = sig, "shutting down");
    let _ = std::fs::remove_file(&control);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
