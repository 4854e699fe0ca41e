//! pgshift: a Postgres wire-protocol proxy for blue-green database cutovers.
#![forbid(unsafe_code)]

pub mod color;
pub mod config;
pub mod protocol;
pub mod proxy;
pub mod routing;
pub mod stats;
