//! The `struc_dispatch` target: see `flowipc_fuzz::struc_dispatch`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: flowipc_fuzz::init(), |data: &[u8]| flowipc_fuzz::struc_dispatch::run(data));
