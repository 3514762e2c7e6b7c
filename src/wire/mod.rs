//! What crosses the network: miggate hello/verdict frames and QEMU stream facts.

pub mod frames;
pub mod nbd;
pub mod qemu;
