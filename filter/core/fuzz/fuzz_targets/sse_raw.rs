//! Raw bytes through the response tracker with stripping on: no panic, the client gets every
//! byte when nothing is stripped, and the output does not depend on where chunks were cut.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flyball_filter_core::fuzzing::sse_raw(data);
});
