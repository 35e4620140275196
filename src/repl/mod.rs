//! Replication: the protocol as pure code (`fold`, `frame`), the primary's shipper, the mirror's
//! receiver (`mirror`), redo log (`redo`) and applier (`apply`).
pub mod apply;
pub mod core;
pub mod divergent;
pub mod export;
pub mod fold;
pub mod frame;
pub mod history;
pub mod identity;
pub mod mirror;
pub mod redo;
pub mod role;
pub mod shipper;
pub mod stream;
