//! tokenwatch watches how API tokens are used and says, within seconds, when a token stops
//! behaving like itself: a new country or network, a burst, a 401/403 storm, an off-hours
//! export, calls outside its scopes or environment, slow exploration of rare endpoints, one
//! token used from two places.
//!
//! Layout:
//! - [`signal`]: the names of the signals (a leaf module shared by config and models).
//! - [`config`]: validated configuration (embedded `models/default.toml` < file < env).
//! - [`event`]: domain types and the one Arrow schema of events.
//! - [`ingest`]: CSV / JSON Lines / Parquet readers and row validation; the registry reader.
//! - [`window`]: event-time tumbling windows and per-(token, window) aggregates.
//! - [`model`]: per-token models (rate, seasonal, network, endpoints, telemetry, peers,
//!   registry) and the global isolation model; the signal contract.
//! - [`score`]: pure combination of signals into a risk 0..100 with reasons.
//! - [`engine`]: the sharded engine every door drives.
//! - [`eval`]: labelled replay and detection metrics; [`replay`] without labels.
//! - [`generate`]: synthetic labelled traffic with token archetypes and incidents.
//! - [`output`]: window-score files.
//! - [`respond`]: alert policies, webhooks, revocation, audit log.
//! - [`server`]: the gRPC service (`tokenwatch serve`) over the same engine.
//! - [`loadgen`]: a gRPC load generator measuring ingest rate and read latency.
//! - [`store`]: write-ahead log, Parquet event history, model snapshots.
//! - [`sys`]: thread priority, the one direct call to the operating system.
#![warn(missing_docs)]

pub mod cli;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod eval;
pub mod event;
pub mod generate;
pub mod ingest;
pub mod loadgen;
pub mod model;
pub mod output;
pub mod report;
pub mod respond;
pub mod scopes;
pub mod score;
pub mod server;
pub mod signal;
pub mod store;
pub mod svg;
pub mod sys;
pub mod window;

pub use config::Config;
pub use engine::{Engine, WindowScore};
pub use event::TokenId;
