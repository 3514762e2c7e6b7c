//! QEMU migration stream sniffing.
