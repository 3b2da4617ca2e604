//! Compiles proto/sluice/v1/ingest.proto with protox (pure Rust: no `protoc` on the build
//! machine) and generates the tonic service and prost messages, plus the encoded descriptor set
//! that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["sluice/v1/ingest.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("sluice_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // google.rpc.Status comes from tonic-types, so its helpers (RetryInfo) apply.
        .extern_path(".google.rpc", "::tonic_types::pb")
        .bytes(".sluice.v1")
        // prost's codec, with event and header counts checked on the wire before decoding.
        .codec_path("crate::grpc::codec::LimitedCodec")
        .compile_fds(fds)?;
    Ok(())
}
