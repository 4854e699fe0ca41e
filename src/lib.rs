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
//! - [`telemetry`]: `/metrics` (Prometheus, the stats read at scrape time) and `/healthz`.
//! - [`controller`]: the one writer of routing state (weight, pins, drains), its state
//!   store, its decisions and the `status` reply.
//! - [`cutover`]: the transparent cutover's setup checks (`pgshift cutover-setup`) and the
//!   guardrails a promote passes.
//! - [`admin`]: the Unix admin socket and the `pgshift ctl` client.
//! - [`server`]: all of the above started and stopped together.
//! - [`probe`]: `pgshift probe`, sessions that rehearse a migration and report what
//!   applications would see (errors, stalls, missing acknowledged writes).
//! - [`demo`]: `pgshift demo`, two throwaway clusters, a rollout rolled back, one promoted.
//! - [`auth`]: auth termination (`[auth] mode = "scram"`): SCRAM with clients, logins to
//!   either color with the recovered ClientKey, verifiers from a userlist or `auth_query`.
//! - [`tls`]: rustls configs for both hops (checked files, live copies swapped on reload) and
//!   the plain-or-TLS stream type.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod color;
pub mod config;
pub mod controller;
pub mod cutover;
pub mod demo;
pub mod log_limit;
pub mod probe;
pub mod protocol;
pub mod proxy;
pub mod rollout;
pub mod routing;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod tls;
