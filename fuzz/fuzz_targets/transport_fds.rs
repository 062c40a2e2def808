//! The `transport_fds` target: see `flowipc_fuzz::transport`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: flowipc_fuzz::init(), |data: &[u8]| flowipc_fuzz::transport::run_fds(data));
