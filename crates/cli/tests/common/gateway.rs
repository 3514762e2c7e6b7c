//! This package's `miggate` binary, run by the lab's launchers
//! ([`miggate_lab::Miggate`]); the PKI commands panic with their output.

use std::path::{Path, PathBuf};

pub use miggate_lab::{Gateway, Miggate};

pub const BIN: &str = env!("CARGO_BIN_EXE_miggate");

pub fn miggate() -> Miggate {
    Miggate::new(BIN)
}

/// `miggate pki init DIR [ARGS...]`
pub fn pki_init(dir: &Path, args: &[&str]) {
    miggate().pki_init(dir, args).unwrap()
}

/// A new directory holding the CA cert of `ca_dir` and a client cert for `dn`.
pub fn pki_issue(ca_dir: &Path, out: &Path, dn: &str) -> PathBuf {
    miggate().pki_issue(ca_dir, out, dn).unwrap()
}

pub fn run_ok(args: &[&str]) {
    miggate().run_ok(args).unwrap();
}
