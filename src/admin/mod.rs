//! The admin interface: a Unix socket that takes one command per line and answers one JSON
//! line each, and `pgshift ctl`, its command-line client.
//!
//! - [`command`]: the command language, parsed without I/O (shared by server and client).
//! - [`wire`]: line framing with a length limit, and reply encoding.
//! - [`socket_file`]: making the socket file safely (mode, group, stale sockets) and removing it.
//! - [`server`]: [`AdminServer`], which accepts peers and relays their commands to the
//!   controller.
//! - [`render`]: replies as text for people.
//! - [`client`]: `pgshift ctl` ([`CtlArgs`], [`run_ctl`]).

pub mod client;
pub mod command;
pub mod render;
pub mod server;
pub mod socket_file;
pub mod wire;

pub use client::{CtlArgs, run_ctl};
pub use command::parse_command;
pub use server::AdminServer;
