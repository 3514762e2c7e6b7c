//! Captured QEMU 7.2 migration streams (how: fixtures/streams/README.txt).
//! The product's stream parser is tested against every file of the
//! directory; the bench and the tests send these bytes where a gateway
//! must see the start of a real stream.

/// A main channel without a UUID (no `validate-uuid`).
pub const QEMU72_MAIN_PLAIN: &[u8] = include_bytes!("../fixtures/streams/qemu72-main-plain.bin");

/// A main channel whose configuration section carries the VM's UUID.
pub const QEMU72_MAIN_UUID: &[u8] = include_bytes!("../fixtures/streams/qemu72-main-uuid.bin");
