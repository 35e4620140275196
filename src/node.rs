//! A daemon whose role changes without a restart (docs/FAILOVER.md). `blkmirror primary` and
//! `blkmirror mirror` both run here: the command names the role a fresh state directory starts
//! in and who dials whom; from then on the role its volumes record rules, and `promote` and
//! `demote` (through the control socket) change it. The main thread runs one role's machinery
//! at a time (`primary::run_role`, `mirror_daemon::run_role`) and, on a role change, stops it
//! and starts the other's on the same volumes, state directory and lock.
//!
//! A role change of several volumes commits volume by volume (each state file is its own
//! commit point, `repl::role`), under an intent (`STATE/role-change.json`) written once every
//! volume passed its checks and removed once all are committed: a daemon that starts with the
//! intent still there completes the change for the volumes that had not committed it.

use crate::daemon::{self, DaemonError, RoleDesk, Signals};
use crate::disk::spec::VolumeSpec;
use crate::env::Fs;
use crate::mirror_daemon::MirrorOptions;
use crate::primary::PrimaryOptions;
use crate::repl::apply::VolumeState;
use crate::repl::core::primary::PrimaryVolumeState;
use crate::repl::role::Role;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Who dials whom: configuration, whatever the roles.
#[derive(Clone, Debug)]
pub enum Link {
    /// `--mirror HOST:PORT`: this side connects.
    Dial(String),
    /// `--listen ADDR`: the peer connects.
    Listen(String),
}

/// How one role's run ended.
#[derive(Debug)]
pub enum Outcome {
    /// SIGINT or SIGTERM: the daemon exits.
    Stopped,
    /// The volumes changed role (committed): run the other role now, and give the answer to
    /// the command that asked once that role is ready (serving, for a primary).
    Switched(Role, Answer),
    /// A role change failed after the machinery had stopped: run the same role again.
    /// `held`: the primary was not serving its clients yet (its peer had not answered, or
    /// is a primary too): it asks the peer again before it serves, as at a process start.
    Again { held: bool },
}

/// An answer to a role change, given by the role it made once that role is ready.
#[derive(Debug)]
pub struct Answer {
    pub to: std::sync::mpsc::Sender<serde_json::Value>,
    pub answer: serde_json::Value,
}

/// What a role's run is given besides its options.
pub struct Ctx<'a> {
    pub signals: &'a Signals,
    pub desk: Arc<RoleDesk>,
    /// The daemon's control socket: each role installs its handler.
    pub control: Arc<daemon::ControlSwitch>,
    /// The process starts with this role (not a role change of a running daemon, whose
    /// admin decided it): a primary then asks its peer before it serves.
    pub process_start: bool,
    /// The answer to the role change that made this role, to give once it is ready.
    pub answer: std::sync::Mutex<Option<Answer>>,
}

impl Ctx<'_> {
    /// This role is ready: answer the command that made it.
    pub fn ready(&self) {
        if let Some(a) = self.answer.lock().unwrap().take() {
            let _ = a.to.send(a.answer);
        }
    }
}

/// A role change under way, for a daemon that stops in the middle of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Intent {
    pub to: Role,
    pub force: bool,
    /// A demotion: each volume's data as its peer acknowledged it (generation, last seq); a
    /// promotion: what each volume's peer said it holds (the promotion continues it).
    #[serde(default)]
    pub held: std::collections::BTreeMap<String, (crate::repl::identity::GenId, u64)>,
    /// A failback or `resolve --discard-local`: each volume's state as a secondary (its
    /// own writes since the two sides parted saved already).
    #[serde(default)]
    pub discarded: std::collections::BTreeMap<String, VolumeState>,
}

pub fn intent_path(state_dir: &Path) -> PathBuf {
    state_dir.join("role-change.json")
}

pub fn write_intent(fs: &Fs, state_dir: &Path, intent: &Intent) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(intent).map_err(std::io::Error::other)?;
    crate::env::write_atomic(&**fs, &intent_path(state_dir), &bytes)
}

pub fn clear_intent(fs: &Fs, state_dir: &Path) -> std::io::Result<()> {
    match fs.remove_file(&intent_path(state_dir)) {
        Ok(()) => fs.sync_dir(state_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The role the volumes of `state_dir` record, with how the last change came (None for a
/// fresh state directory). Volumes that disagree are reported as an error naming each.
fn recorded_role(
    fs: &Fs,
    state_dir: &Path,
    volumes: &[VolumeSpec],
) -> Result<Option<(Role, Option<String>)>, DaemonError> {
    let mut seen: Vec<(String, Role, Option<String>)> = Vec::new();
    for v in volumes {
        let Some(role) = crate::repl::role::recorded(fs, state_dir, &v.name)? else {
            continue;
        };
        let path = VolumeState::path(state_dir, &v.name);
        let changed = match role {
            Role::Primary => PrimaryVolumeState::load(&**fs, &path)?.and_then(|s| s.changed_role),
            Role::Secondary => VolumeState::load(&**fs, &path)?.changed_role,
        };
        seen.push((v.name.clone(), role, changed));
    }
    let Some((_, first, changed)) = seen.first().cloned() else {
        return Ok(None);
    };
    if seen.iter().any(|(_, r, _)| *r != first) {
        let list: Vec<String> = seen
            .iter()
            .map(|(n, r, _)| format!("{n} is {}", r.as_str()))
            .collect();
        return Err(DaemonError::WrongRole(format!(
            "the volumes of {} hold different roles ({}), and no role change is recorded as \
             under way: run each pair's volumes in its own daemon",
            state_dir.display(),
            list.join(", ")
        )));
    }
    Ok(Some((first, changed)))
}

/// Run the daemon: `command` is the role the command line names (`primary` or `mirror`),
/// `primary` and `mirror` this daemon's configuration in each role.
pub fn run(
    command: Role,
    primary: PrimaryOptions,
    mirror: MirrorOptions,
) -> Result<(), DaemonError> {
    let signals = Signals::block()?;
    if primary.volumes.is_empty() {
        return Err(DaemonError::NoVolumes);
    }
    let state_dir = primary.state_dir.clone();
    let _lock = daemon::lock_state_dir(&state_dir)?;
    let fs = crate::env::os();
    if let Some(intent) = read_intent(&fs, &state_dir)? {
        finish_intent(&fs, &state_dir, &primary.volumes, &intent)?;
    }
    let role = match recorded_role(&fs, &state_dir, &primary.volumes)? {
        None => command,
        Some((recorded, _)) if recorded == command => recorded,
        Some((recorded, Some(how))) => {
            tracing::warn!(state_dir = %state_dir.display(), role = recorded.as_str(), last_change = %how,
                "started as {} but the volumes were made {} by `{how}`: running as {}",
                command.as_str(), recorded.as_str(), recorded.as_str());
            recorded
        }
        Some((recorded, None)) => {
            return Err(DaemonError::WrongRole(match recorded {
                Role::Secondary => format!(
                    "{} holds a mirror's volumes (secondary): start it with `blkmirror mirror`, \
                     and make it the primary with `blkmirror promote --control SOCKET` (a \
                     mirror's state is never taken over by starting a primary on it)",
                    state_dir.display()
                ),
                Role::Primary => format!(
                    "{} holds a primary's volumes: start it with `blkmirror primary`, and make \
                     it a secondary with `blkmirror demote --control SOCKET`",
                    state_dir.display()
                ),
            }))
        }
    };
    // What only the other role uses, left by a role change that stopped after its commit.
    for v in &primary.volumes {
        crate::repl::role::clear_leftovers(
            &fs,
            &state_dir,
            &v.name,
            role,
            Some(crate::repl::role::HistoryDir {
                fs: &fs,
                dir: crate::repl::history::Keeper::dir(&state_dir, &v.name),
            }),
        )?;
    }
    let mut role = role;
    let desk = Arc::new(RoleDesk::default());
    let control_path = primary
        .control
        .clone()
        .unwrap_or_else(|| crate::control::default_path(&state_dir));
    let control = daemon::ControlSwitch::new(&control_path, desk.clone());
    let mut process_start = true;
    let mut answer = None;
    loop {
        let ctx = Ctx {
            signals: &signals,
            desk: desk.clone(),
            control: control.clone(),
            process_start,
            answer: std::sync::Mutex::new(answer.take()),
        };
        process_start = false;
        tracing::info!(role = role.as_str(), "running as {}", role.as_str());
        let outcome = match role {
            Role::Primary => crate::primary::run_role(&primary, &ctx)?,
            Role::Secondary => crate::mirror_daemon::run_role(&mirror, &ctx)?,
        };
        match outcome {
            Outcome::Stopped => {
                control.close();
                return Ok(());
            }
            Outcome::Switched(to, a) => {
                role = to;
                answer = Some(a);
            }
            Outcome::Again { held } => process_start = held,
        }
        wait_until_released(&primary.volumes);
    }
}

/// The last role's handles on the volumes are closed (a control client still being answered
/// may hold one for a moment): wait, a bounded time, until each volume's lock is free.
fn wait_until_released(volumes: &[VolumeSpec]) {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    for v in volumes {
        loop {
            match crate::disk::file::FileStorage::open(v, crate::disk::file::IoMode::Buffered) {
                Err(crate::disk::file::OpenError::Locked { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => break,
            }
        }
    }
}

/// How long a role change waits for the previous role's last handles on the volumes.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

fn read_intent(fs: &Fs, state_dir: &Path) -> Result<Option<Intent>, DaemonError> {
    match fs.read(&intent_path(state_dir)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| DaemonError::Config(format!("{}: {e}", intent_path(state_dir).display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Complete a role change a stop interrupted: every volume had passed its checks before the
/// intent was written (a demotion: its peer had acknowledged every write and no write was
/// taken since; a promotion: everything received applied and checkpointed).
fn finish_intent(
    fs: &Fs,
    state_dir: &Path,
    volumes: &[VolumeSpec],
    intent: &Intent,
) -> Result<(), DaemonError> {
    for v in volumes {
        if crate::repl::role::recorded(fs, state_dir, &v.name)? == Some(intent.to) {
            continue;
        }
        tracing::warn!(volume = %v.name, to = intent.to.as_str(),
            "completing a role change a stop interrupted");
        let storage = crate::disk::file::FileStorage::open(v, crate::disk::file::IoMode::Buffered)?;
        let disk = crate::disk::Storage::fingerprint(&storage)?;
        let path = VolumeState::path(state_dir, &v.name);
        match intent.to {
            Role::Secondary if intent.discarded.contains_key(&v.name) => {
                crate::repl::role::commit_demotion(
                    fs,
                    state_dir,
                    &v.name,
                    &intent.discarded[&v.name],
                    None,
                )?;
            }
            Role::Secondary => {
                let st = PrimaryVolumeState::load(&**fs, &path)?.ok_or_else(|| {
                    DaemonError::Config(format!("{}: no state to demote", v.name))
                })?;
                let &(held, last) = intent.held.get(&v.name).ok_or_else(|| {
                    DaemonError::Config(format!(
                        "{}: the demotion's intent does not name it",
                        v.name
                    ))
                })?;
                let m = crate::repl::role::demoted(&st, last, held, &disk, 0)
                    .map_err(DaemonError::WrongRole)?;
                crate::repl::role::commit_demotion(fs, state_dir, &v.name, &m, None)?;
            }
            Role::Primary => {
                let mut st = VolumeState::load(&**fs, &path)?;
                st.peer_demoted = intent.held.get(&v.name).copied();
                let (p, next) = crate::repl::role::promoted(
                    &st,
                    crate::repl::identity::GenId::random(),
                    &disk,
                    intent.force,
                )
                .map_err(DaemonError::WrongRole)?;
                let history = fs.clone();
                crate::repl::role::commit_promotion(
                    fs,
                    state_dir,
                    &v.name,
                    &p,
                    &crate::repl::role::journal_start(
                        &st,
                        next,
                        crate::disk::Storage::size(&storage),
                    ),
                    &crate::journal::boot_id(),
                    Some(crate::repl::role::HistoryDir {
                        fs: &history,
                        dir: crate::repl::history::Keeper::dir(state_dir, &v.name),
                    }),
                )?;
            }
        }
    }
    clear_intent(fs, state_dir)?;
    Ok(())
}
