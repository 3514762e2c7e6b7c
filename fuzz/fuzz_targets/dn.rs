#![no_main]
// Property and input format: miggate::fuzzing::dn.
libfuzzer_sys::fuzz_target!(|data: &[u8]| miggate::fuzzing::dn(data));
