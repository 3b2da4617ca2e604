//! WebSocket text frames on `/v1/ws`: the `{"stream", "events"}` envelope, the stream name and
//! the events in it (`sluice_protocols::http::ws::decode_frame`). It must never panic. Run with
//! `cargo +nightly fuzz run ws_frame` from `protocols/`; seeds in `corpus/ws_frame/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_protocols::http::ws::decode_frame(&bytes::Bytes::copy_from_slice(data), 1000);
});
