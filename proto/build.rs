//! Generates the infermesh.v1 types and gRPC services from the `.proto` files
//! and the descriptor set server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "infermesh/v1/registry.proto",
        "infermesh/v1/access.proto",
        "infermesh/v1/explain.proto",
        "infermesh/v1/discovery.proto",
        "infermesh/v1/fleet.proto",
        "infermesh/v1/load.proto",
        "infermesh/v1/admin.proto",
        "infermesh/v1/identity.proto",
    ];
    // google/protobuf/field_mask.proto is vendored beside them so that the
    // build needs protoc alone, not the system's well-known .proto files;
    // its Rust type comes from prost-types.
    for f in files.iter().chain(&["google/protobuf/field_mask.proto"]) {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("infermesh_descriptor.bin"))
        .compile_protos(&files, &["."])?;
    Ok(())
}
