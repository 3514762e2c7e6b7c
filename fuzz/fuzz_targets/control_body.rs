#![no_main]
// Property and input format: miggate::fuzzing::control_body.
libfuzzer_sys::fuzz_target!(|data: &[u8]| miggate::fuzzing::control_body(data));
