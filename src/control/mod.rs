//! The daemon's local control API (HTTP + JSON) and its client.

pub mod types;
