#![no_main]
// Property and input format: miggate::fuzzing::daemon_toml.
libfuzzer_sys::fuzz_target!(|data: &[u8]| miggate::fuzzing::daemon_toml(data));
