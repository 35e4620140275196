//! Exit codes of every `blkmirror` command: a contract scripts rely on (README, "Exit codes").
//! Each error type says which code it maps to here, in one file, so the contract reads in one
//! place; values never change meaning, new ones are only added.

use crate::certs::CertError;
use crate::control::QueryError;
use crate::daemon::DaemonError;
use crate::disk::file::OpenError;
use crate::transport::TransportError;
use std::io;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// A bug or an error nobody planned for.
    Internal = 1,
    /// What was typed is wrong: flags, names, sizes, addresses (clap exits 2 too).
    Usage = 2,
    /// Refused, by the peer or to protect local state (an existing CA, key or volume size).
    Refused = 3,
    /// No daemon answers on the control socket.
    NotRunning = 4,
    /// Disk, state directory or files: missing, unreadable, unwritable or malformed.
    Io = 5,
    /// `status`: some replicated volume is not replicating.
    Degraded = 6,
    /// Held by another process: state directory, volume, NBD socket or address.
    Busy = 7,
    /// `verify`: the two sides held different bytes (repaired with `--repair`).
    Differences = 8,
    /// `promote`, `demote`, a daemon's start: not possible in the state things are in (the
    /// message says why: the peer not known to be demoted, a copy not consistent, a state
    /// directory of the other role).
    WrongState = 9,
    /// `demote --timeout`: the peer did not acknowledge every write in time; nothing changed.
    TimedOut = 10,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

impl Exit {
    /// The code for an I/O error.
    pub fn from_io(e: &io::Error) -> Exit {
        // Opening a volume deeper down (the mirror's, `recover`) wraps its OpenError.
        if let Some(open) = e.get_ref().and_then(|i| i.downcast_ref::<OpenError>()) {
            return open.exit_code();
        }
        match e.kind() {
            io::ErrorKind::AddrInUse => Exit::Busy,
            io::ErrorKind::AddrNotAvailable | io::ErrorKind::InvalidInput => Exit::Usage,
            _ => Exit::Io,
        }
    }
}

impl DaemonError {
    pub fn exit_code(&self) -> Exit {
        match self {
            DaemonError::NoVolumes
            | DaemonError::DuplicateName(_)
            | DaemonError::Fault(_)
            | DaemonError::Config(_)
            | DaemonError::BadAddress { .. } => Exit::Usage,
            DaemonError::StateDir { .. } => Exit::Io,
            DaemonError::StateDirLocked(_) => Exit::Busy,
            DaemonError::Open(e) => e.exit_code(),
            DaemonError::Listen { source, .. } => Exit::from_io(source),
            DaemonError::Transport(e) => e.exit_code(),
            DaemonError::Signals(_) => Exit::Internal,
            DaemonError::WrongRole(_) => Exit::WrongState,
            DaemonError::Io(e) => Exit::from_io(e),
        }
    }
}

impl OpenError {
    pub fn exit_code(&self) -> Exit {
        match self {
            OpenError::Locked { .. } => Exit::Busy,
            // blkmirror never resizes a volume: the file on disk wins over the command line.
            OpenError::SizeMismatch { .. } => Exit::Refused,
            OpenError::Missing { .. }
            | OpenError::NotADisk { .. }
            | OpenError::Empty { .. }
            | OpenError::Io { .. } => Exit::Io,
        }
    }
}

impl TransportError {
    pub fn exit_code(&self) -> Exit {
        match self {
            TransportError::Read { .. } | TransportError::BadFile { .. } => Exit::Io,
            // Certificate and key that do not fit together: files again.
            TransportError::Tls(_) => Exit::Io,
            TransportError::PeerName { .. } => Exit::Usage,
            TransportError::Socket { source, .. } => Exit::from_io(source),
            TransportError::Handshake { .. } | TransportError::Refused { .. } => Exit::Refused,
            TransportError::Connect { .. } => Exit::Internal,
        }
    }
}

impl CertError {
    pub fn exit_code(&self) -> Exit {
        match self {
            CertError::CaExists { .. } | CertError::CertExists { .. } => Exit::Refused,
            CertError::Io { .. } | CertError::NoCa { .. } | CertError::BadCa { .. } => Exit::Io,
            CertError::InvalidName { .. } | CertError::InvalidDays(_) => Exit::Usage,
            CertError::Generate(_) => Exit::Internal,
        }
    }
}

impl QueryError {
    pub fn exit_code(&self) -> Exit {
        match self {
            QueryError::NotRunning { .. } => Exit::NotRunning,
            QueryError::Io { source, .. } => Exit::from_io(source),
            QueryError::BadReply { .. } => Exit::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_the_documented_ones() {
        let all = [
            (Exit::Ok, 0),
            (Exit::Internal, 1),
            (Exit::Usage, 2),
            (Exit::Refused, 3),
            (Exit::NotRunning, 4),
            (Exit::Io, 5),
            (Exit::Degraded, 6),
            (Exit::Busy, 7),
        ];
        for (e, v) in all {
            assert_eq!(e as u8, v, "{e:?}");
        }
    }

    #[test]
    fn wrapped_open_errors_keep_their_code() {
        let locked = OpenError::Locked {
            name: "v".into(),
            path: "/x".into(),
        };
        let wrapped = io::Error::other(locked);
        assert_eq!(Exit::from_io(&wrapped), Exit::Busy);
        assert_eq!(DaemonError::Io(wrapped).exit_code(), Exit::Busy);
        let plain = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(Exit::from_io(&plain), Exit::Io);
    }
}
