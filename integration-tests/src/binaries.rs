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

/// A free TCP port on 127.0.0.1 for a process under test to listen on.
///
/// The port is released before that process binds it, so it is taken
/// below the kernel's ephemeral range: the source port of some other
/// connection never lands on it in between. A counter keeps the tests of
/// one binary apart; the start moves with the process id so that binaries
/// run one after another do not reuse the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, span) = outside_ephemeral();
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let offset = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(low + offset).expect("a port below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{}", low + span)
}

/// The ports tests listen on: from 10000 up to the ephemeral range's start
/// (from /proc), or 20000-29999 when that range starts too low to leave room.
fn outside_ephemeral() -> (u32, u32) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if ephemeral_start > 12000 {
        (10000, ephemeral_start - 10000)
    } else {
        (20000, 10000)
    }
}
