//! The `login_server` target: see `flowipc_fuzz::login_server`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: flowipc_fuzz::init(), |data: &[u8]| flowipc_fuzz::login_server::run(data));
