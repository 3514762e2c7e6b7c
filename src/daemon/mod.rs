//! `miggate daemon`: target gateway listeners sharing one registry of
//! incoming migrations, the control API, metrics, reload.

pub mod config;
pub mod metrics;
pub mod run;
pub mod rundir;
pub mod target_qemu;

pub use config::Config;
pub use run::{run, DaemonError};
