//! Feeds arbitrary bytes to the MQTT connection decoder the way a connection would: version
//! from the CONNECT, then packets until the bytes run out or one fails. It must never panic
//! and never grow its buffer past the input. Run with `cargo +nightly fuzz run mqtt_decoder`
//! from `protocols/`; `corpus/mqtt_decoder/` holds the seeds (replayed by a unit test in CI).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_protocols::mqtt::codec::decode_all(data, 64 * 1024);
});
