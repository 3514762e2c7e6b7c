//! QMP client.
