//! The gRPC wire format checked by a second implementation: Python grpcio (installed by
//! scripts/install-deps.sh) runs tests/python/grpc_smoke.py against the real binary, with stubs
//! generated from the repository's .proto; the events it publishes are read back from the log.

use sluice_tests::OutputWithin;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use sluice_tests::{Sluice, read_log};

#[test]
fn python_grpcio_publishes_and_streams_and_sees_native_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("tests/python/grpc_smoke.py"))
        .arg(s.grpc.unwrap().to_string())
        .arg(root.join("protocols/proto"))
        .output_within(std::time::Duration::from_secs(300))
        .expect("python3 (run scripts/install-deps.sh for grpcio)");
    assert!(
        out.status.success(),
        "grpc_smoke.py failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["publish"], json!([[0, 0], [0, 1]]), "{seen}");
    let stream = seen["stream"].as_array().unwrap();
    assert_eq!(stream.len(), 3, "{seen}");
    for (i, b) in stream.iter().enumerate() {
        assert_eq!(b[0], i as u64);
        let offs: Vec<u64> = b[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_u64().unwrap())
            .collect();
        let first = 2 + 4 * i as u64;
        assert_eq!(offs, (first..first + 4).collect::<Vec<_>>(), "{seen}");
    }
    assert_eq!(seen["invalid"], "INVALID_ARGUMENT", "{seen}");

    let log = read_log(&s.data_dir, "py", &[]).unwrap();
    assert_eq!(log.len(), 14);
    assert_eq!(log[0]["value"], "hello");
    assert_eq!(log[0]["key"], "k1");
    assert_eq!(log[0]["id"], "p-1");
    assert_eq!(log[0]["headers"]["lang"], "python");
    assert_eq!(log[0]["headers"]["content-type"], "text/plain");
    assert_eq!(log[13]["value"], "s2-3");
}
