//! gRPC `PublishRequest` messages as the server handles them: event and header counts on the
//! wire, prost decoding, then Sluice's events (`sluice_protocols::grpc::decode_publish`). It
//! must never panic. Run with `cargo +nightly fuzz run grpc_message` from `protocols/`; seeds in
//! `corpus/grpc_message/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_protocols::grpc::decode_publish(data, 1000);
});
