//! The daemon's control API (HTTP + JSON): its routes, how they are
//! served, and its client.

pub mod client;
pub mod serve;
pub mod server;
pub mod types;

pub use client::{ApiAddr, ApiClient, ApiError};
