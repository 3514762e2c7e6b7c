//! miggate: a secure gateway for VM live migration streams.
//!
//! The modules read in the order of the data path, bottom to top: one
//! connection goes `net` (sockets, the mTLS accept step) -> `creds` (peer
//! identity as a DN) -> `authz` (ACL) -> `wire` (hello/verdict frames,
//! QEMU stream facts) -> `admit` (the whole decision) -> `relay` (bytes
//! both ways) -> `gate` (the listeners that do the I/O of all this) ->
//! `outcome` (one record); beside it the control plane: `qmp`, `control`
//! (the daemon's API), `daemon`, `migrate` (the end-to-end command).
#![forbid(unsafe_code)]

// The data path.
pub mod net;
pub mod creds;
pub mod authz;
pub mod wire;
pub mod admit;
pub mod relay;
pub mod gate;
pub mod outcome;
/// Named durations and limits shared along the path.
pub mod timeouts;

// The control plane.
/// One rendering of an error chain, for every edge that prints one.
pub mod error;
pub mod qmp;
pub mod control;
pub mod daemon;
pub mod migrate;

/// Entry points of the fuzz targets and of their corpus replay test.
#[doc(hidden)]
pub mod fuzzing;
