//! miggate: a secure gateway for VM live migration streams.
//!
//! The path of one connection, as the module list reads:
//! `gate` (listen, TLS) -> `creds` (peer identity as a DN) -> `authz` (ACL)
//! -> `wire` (hello/verdict frames, QEMU stream sniffing) -> `admit`
//! (the decision) -> `relay` (bytes both ways) -> `outcome` (one record).
#![forbid(unsafe_code)]

pub mod admit;
pub mod authz;
pub mod control;
pub mod creds;
pub mod daemon;
pub mod gate;
pub mod migrate;
pub mod outcome;
pub mod qmp;
pub mod relay;
pub mod timeouts;
pub mod wire;
