//! Compiles the node-to-node protocol and the owners and entities services with a vendored `protoc` (no
//! system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(&protoc);
    config.compile_protos(&["proto/cluster.proto"], &["proto"])?;

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("services_descriptor.bin"))
        .compile_with_config(
            config,
            &["proto/owners.proto", "proto/entities.proto"],
            &["proto"],
        )?;
    Ok(())
}
