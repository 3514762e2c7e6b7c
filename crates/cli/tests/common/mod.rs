//! Shared test harness: real QEMU processes, the real miggate binary.
#![allow(dead_code)]

pub mod daemon;
pub mod gateway;
pub mod guest;
pub mod nobody;
pub mod qemu;
pub mod scenario;
