//! The deterministic simulator (TigerBeetle's VOPR is the model): one seed drives a primary and
//! a mirror through link faults and crashes in virtual time, and every schedule is checked
//! against the promises of docs/DESIGN.md.

pub mod rng;
