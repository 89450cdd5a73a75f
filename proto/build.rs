//! Generates the `weir.v1` Rust code and its file descriptor set (for server reflection).
//!
//! `protoc` comes from the `protoc-bin-vendored` crate, so building needs no system package.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("weir_v1_descriptor.bin"))
        .compile_with_config(config, &["weir/v1/weir.proto"], &["."])?;
    println!("cargo:rerun-if-changed=weir/v1/weir.proto");
    Ok(())
}
