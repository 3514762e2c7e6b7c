//! Shared test harness: the lab's real QEMU processes and launchers
//! (`miggate-lab`) run with this package's `miggate` binary, panicking
//! where the lab returns an error, and the scenarios built from them.
#![allow(dead_code)]

pub mod cut_path;
pub mod managed_run;
pub mod daemon;
pub mod faults;
pub mod gateway;
pub mod guest;
pub mod longstream;
pub mod native;
pub mod netns;
pub mod nobody;
pub mod postcopy;
pub mod qemu;
pub mod scenario;
pub mod soak;
pub mod storage;
