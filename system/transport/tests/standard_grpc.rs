//! The standard gRPC services (grpc.health.v1 and grpc.reflection.v1) answer a client
//! that is not ours: Python's grpcio (from ./.venv, made by scripts/python-venv.sh),
//! with an operator certificate, as grpcurl or grpc_health_probe would call them. A
//! connection without a client certificate reaches neither.

mod common;

use std::path::Path;
use std::process::Command;

use rollout_transport::CertFiles;

const CLIENT: &str = r#"
import sys
import grpc

ca, key, cert, addr = sys.argv[1:5]
def channel(with_cert):
    creds = grpc.ssl_channel_credentials(
        open(ca, "rb").read(),
        open(key, "rb").read() if with_cert else None,
        open(cert, "rb").read() if with_cert else None,
    )
    return grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])

ident = lambda b: b
def check(ch, service):
    call = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=ident, response_deserializer=ident)
    name = service.encode()
    request = (b"\x0a" + bytes([len(name)]) + name) if name else b""
    return call(request, timeout=10)

ch = channel(True)
# HealthCheckResponse.status is field 1: SERVING = 1.
print("overall", check(ch, "").hex())
print("coordinator", check(ch, "rollout.transport.v1.Coordinator").hex())
print("operator", check(ch, "rollout.transport.v1.Operator").hex())
try:
    check(ch, "no.such.Service")
    print("unknown answered")
except grpc.RpcError as e:
    print("unknown", e.code().name)
# ServerReflectionRequest.list_services is field 7 (a string).
reflect = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                           request_serializer=ident, response_deserializer=ident)
answer = next(reflect(iter([b"\x3a\x00"]), timeout=10))
names = [n for n in (b"rollout.transport.v1.Coordinator", b"rollout.transport.v1.Operator",
                     b"grpc.health.v1.Health") if n in answer]
print("reflection", ",".join(n.decode() for n in names))
try:
    check(channel(False), "")
    print("anonymous answered")
except grpc.RpcError as e:
    print("anonymous", e.code().name)
"#;

fn venv_python(root: &Path) -> std::path::PathBuf {
    let status = Command::new(root.join("scripts/python-venv.sh")).status().expect("run scripts/python-venv.sh");
    assert!(status.success(), "scripts/python-venv.sh failed");
    root.join(".venv/bin/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_checks_health_and_lists_the_services_by_reflection() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = venv_python(&root);
    let started = common::start(common::fast_config(), &[]).await;
    let tls = &started.config.transport.tls_dir;
    let operator = CertFiles::operator(tls, "ops");
    let args = (CertFiles::ca(tls).cert, operator.key.clone(), operator.cert.clone(), started.addr.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python).arg("-c").arg(CLIENT).arg(args.0).arg(args.1).arg(args.2).arg(args.3).output()
    })
    .await
    .expect("join")
    .expect("run the grpcio client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "grpcio client failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "overall 0801",
            "coordinator 0801",
            "operator 0801",
            "unknown NOT_FOUND",
            "reflection rollout.transport.v1.Coordinator,rollout.transport.v1.Operator,grpc.health.v1.Health",
            "anonymous UNAUTHENTICATED",
        ],
        "{stdout}"
    );
    started.coordinator.shutdown().await.expect("clean shutdown");
}
