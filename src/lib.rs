//! blkmirror: userspace block-level replication. See docs/ARCHITECTURE.md for the code map.

pub mod disk;
pub mod nbd;
pub mod primary;
