"""Smoke test of Sluice's gRPC surface from a second, independent implementation (Python
grpcio). Stubs are generated from protocols/proto at run time with grpcio-tools, so the wire
format is checked against the .proto itself, not against our Rust client.

Usage: grpc_smoke.py HOST:PORT PROTO_DIR
Prints one JSON object with what it saw; the Rust test tests/tests/grpc_python.rs asserts it.
"""

import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def main() -> None:
    target, proto_dir = sys.argv[1], sys.argv[2]
    out = tempfile.mkdtemp()
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
        f"--grpc_python_out={out}", "sluice/v1/ingest.proto", "google/rpc/status.proto",
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    from sluice.v1 import ingest_pb2 as pb, ingest_pb2_grpc as rpc  # noqa: E402

    seen = {}
    with grpc.insecure_channel(target) as channel:
        stub = rpc.IngestStub(channel)
        resp = stub.Publish(pb.PublishRequest(
            stream="py",
            content_type="text/plain",
            events=[
                pb.Event(value=b"hello", key=b"k1", id="p-1",
                         headers=[pb.Header(key="lang", value=b"python")]),
                pb.Event(value=b"world"),
            ],
        ), timeout=10, compression=grpc.Compression.Gzip)
        seen["publish"] = [[r.position.partition, r.position.offset] for r in resp.results]

        def batches():
            for seq in range(3):
                yield pb.PublishStreamRequest(
                    sequence=seq, stream="py",
                    events=[pb.Event(value=f"s{seq}-{i}".encode()) for i in range(4)])
        seen["stream"] = [
            [r.sequence, [[x.position.partition, x.position.offset] for x in r.results]]
            for r in stub.PublishStream(batches(), timeout=10)
        ]
        try:
            stub.Publish(pb.PublishRequest(stream="bad name!", events=[pb.Event(value=b"x")]),
                         timeout=10)
            seen["invalid"] = "OK"
        except grpc.RpcError as e:
            seen["invalid"] = e.code().name
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
