//! Outcome.
