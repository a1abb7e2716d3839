//! Generates `demo.v1` from `proto/demo/demo.proto` with protox (no `protoc` needed). The file
//! lives beside the platform's other protocols; only this crate compiles it, so a change to it
//! rebuilds nothing else.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "../proto/demo/demo.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["../proto/demo"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
