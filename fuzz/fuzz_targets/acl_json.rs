#![no_main]
// Property and input format: miggate::fuzzing::acl_json.
libfuzzer_sys::fuzz_target!(|data: &[u8]| miggate::fuzzing::acl_json(data));
