//! The `login_client` target: see `flowipc_fuzz::login_client`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: flowipc_fuzz::init(), |data: &[u8]| flowipc_fuzz::login_client::run(data));
