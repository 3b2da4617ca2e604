//! HTTP request bodies: content decoding (identity, gzip, zstd, bounded) and the JSON and NDJSON
//! event formats with the event-count limit (`sluice_protocols::http::body::decode_request`,
//! the first byte picks coding and format). It must never panic or exceed its limits. Run with
//! `cargo +nightly fuzz run http_body` from `protocols/`; seeds in `corpus/http_body/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_protocols::http::body::decode_request(data);
});
