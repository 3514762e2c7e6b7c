#![no_main]
// Property and input format: miggate::fuzzing::qemu_stream.
libfuzzer_sys::fuzz_target!(|data: &[u8]| miggate::fuzzing::qemu_stream(data));
