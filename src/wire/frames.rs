//! miggate hello/verdict frames.
