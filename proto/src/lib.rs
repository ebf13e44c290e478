//! The infermesh.v1 wire types and gRPC services, generated from the
//! `.proto` files beside this crate. Processes convert these into their own
//! domain types at the boundary; nothing else belongs here.

/// Generated code of package `infermesh.v1`.
pub mod v1 {
    // Generated: its docs are the .proto comments, and not every field has one.
    #![allow(
        missing_docs,
        clippy::large_enum_variant,
        clippy::doc_lazy_continuation
    )]
    tonic::include_proto!("infermesh.v1");
}

/// Encoded `FileDescriptorSet` of every infermesh.v1 file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/infermesh_descriptor.bin"));
