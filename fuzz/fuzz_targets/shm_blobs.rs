//! The `shm_blobs` target: see `flowipc_fuzz::blobs`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: flowipc_fuzz::init(), |data: &[u8]| flowipc_fuzz::blobs::run(data));
