//! Guest payloads of the test VMs: `miggate_lab::guest`, with RAM files in
//! the lab's default cache.
#![allow(dead_code, unused_imports)] // each integration test binary uses a different subset

use std::path::PathBuf;

pub use miggate_lab::guest::{
    boot_sector, random_ram, write_boot_disk, COUNTER_ADDR, DIRTY_END, DIRTY_START, RAM_CHUNK,
};
use miggate_lab::LabError;

/// A file holding `random_ram(seed, len)`, cached in the lab's default
/// cache directory (shared with `miggate bench`).
pub fn random_ram_file(seed: u64, len: usize) -> Result<PathBuf, LabError> {
    miggate_lab::random_ram_file(seed, len, &miggate_lab::default_cache_dir())
}
