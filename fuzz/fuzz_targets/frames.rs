#![no_main]
// Property and input format: miggate::fuzzing::frames.
libfuzzer_sys::fuzz_target!(|data: &[u8]| miggate::fuzzing::frames(data));
