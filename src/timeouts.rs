//! Timeouts.
