//! pgshift: a Postgres wire-protocol proxy for blue-green database cutovers.
//!
//! The crate's map (docs/ARCHITECTURE.md says more):
//!
//! - [`config`]: the TOML config, validated whole, every problem named by its key.
//! - [`protocol`]: wire-protocol parsing and building, no I/O (framing, startup packets,
//!   the messages pgshift reads or sends).
//! - [`routing`]: which color a new session goes to (drains, pins, weight, sticky hash).
//! - [`proxy`]: the listener, each session's relay, cancel keys, close orders, shutdown.
//! - [`stats`]: per-color cumulative counters and latency histograms.
//! - [`controller`]: the one writer of routing state (weight, pins, drains), its state
//!   store, its decisions and the `status` reply.
//! - [`admin`]: the Unix admin socket and the `pgshift ctl` client.
//! - [`server`]: all of the above started and stopped together.
#![forbid(unsafe_code)]

pub mod admin;
pub mod color;
pub mod config;
pub mod controller;
pub mod protocol;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod stats;
