//! Finds the workspace's binaries: `$INFERMESH_BIN_DIR`, else the target
//! directory this crate was built into. The test command builds them first.

use std::path::PathBuf;

/// Path of the binary `name`, or a panic that says how to build it.
pub fn path(name: &str) -> PathBuf {
    let dir = std::env::var_os("INFERMESH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("debug")
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first (or set INFERMESH_BIN_DIR)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
