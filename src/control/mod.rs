//! The daemon's control API (HTTP + JSON): its server and its client.

pub mod client;
pub mod server;
pub mod types;

pub use client::{ApiAddr, ApiClient, ApiError};
