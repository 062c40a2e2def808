//! The `shm_tables` target: see `flowipc_fuzz::tables`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: flowipc_fuzz::init(), |data: &[u8]| flowipc_fuzz::tables::run(data));
