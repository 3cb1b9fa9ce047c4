//! Compiles `proto/` with protox (pure Rust, no `protoc`) and generates tonic code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "dapr/proto/runtime/v1/dapr.proto",
        "dapr/proto/runtime/v1/appcallback.proto",
        "dapr/proto/sentry/v1/sentry.proto",
        "dapr/proto/operator/v1/operator.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
