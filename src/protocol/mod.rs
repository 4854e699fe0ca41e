//! The Postgres wire protocol as pgshift needs it: framing by header only, the first packet a
//! client sends (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage), the `options`
//! startup parameter, the few messages pgshift builds or reads, the SASL messages read to
//! spot SCRAM channel binding, and the side conversation a transparent cutover holds with a
//! session's own backend (extended-protocol requests and the reader of their answers).
//!
//! Everything here is pure parsing and building over byte slices; no module in here does I/O,
//! so each piece can be tested and benchmarked alone.

pub mod framing;
pub mod messages;
pub mod options;
pub mod sasl;
pub mod side_query;
pub mod startup;

/// The largest first packet (StartupMessage, CancelRequest, …) accepted, as in Postgres.
pub const MAX_STARTUP_PACKET_SIZE: usize = 10_000;
