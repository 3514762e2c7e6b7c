#![no_main]
// Property and input format: miggate::fuzzing::glob.
libfuzzer_sys::fuzz_target!(|data: &[u8]| miggate::fuzzing::glob(data));
