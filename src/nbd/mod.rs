//! NBD front end: the protocol as pure code (`wire`, `handshake`, `transmission`) and the server
//! that drives it over sockets (`server`, `conn`).

pub mod conn;
pub mod handshake;
pub mod server;
pub mod transmission;
pub mod wire;
