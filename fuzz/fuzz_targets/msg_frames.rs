//! The `msg_frames` target: see `flowipc_fuzz::msg_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: flowipc_fuzz::init(), |data: &[u8]| flowipc_fuzz::msg_frames::run(data));
