//! blkmirror: userspace block-level replication. See docs/ARCHITECTURE.md for the code map.

pub mod certs;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod env;
pub mod events_cmd;
pub mod exit;
pub mod extent;
pub mod journal;
pub mod mirror_daemon;
pub mod nbd;
pub mod node;
pub mod primary;
pub mod repl;
#[cfg(any(test, feature = "test-hooks"))]
pub mod sim;
pub mod transport;
pub mod verify_cmd;
pub mod volume;
pub mod wake;
