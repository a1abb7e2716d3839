//! Generates the Rust code for every .proto file under this crate with protox (pure Rust, so no
//! `protoc` is needed to build the workspace).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "etcd/kv.proto",
        "etcd/auth.proto",
        "etcd/rpc.proto",
        "peer/peer.proto",
        "registry/registry.proto",
        "config/config.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["etcd", "peer", "registry", "config"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
