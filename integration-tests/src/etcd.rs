//! A real etcd server (Debian's `etcd-server`) in a temporary directory on
//! free loopback ports.

use std::path::Path;
use std::time::Duration;

use crate::binaries::free_port;
use crate::client::Http;
use crate::process::Process;
use crate::wait;

/// A running single-member etcd.
pub struct Etcd {
    /// Client URL, e.g. `http://127.0.0.1:23790`.
    pub url: String,
    _process: Process,
}

impl Etcd {
    /// Starts etcd with its data under `dir` and waits until it is healthy.
    pub async fn start(dir: &Path) -> Self {
        let etcd = which("etcd")
            .expect("etcd not found: install Debian's etcd-server (the test command does)");
        let client = free_port();
        let peer = free_port();
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args = [
            "--name",
            "test",
            "--data-dir",
            &dir.join("etcd-data").to_string_lossy(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("test={peer_url}"),
            "--log-level",
            "warn",
        ]
        .map(String::from);
        let process = Process::spawn("etcd", &etcd, &args, dir, &[]);
        let http = Http::new();
        let health = format!("{url}/health");
        wait::until("etcd to be healthy", Duration::from_secs(20), || {
            let http = http.clone();
            let health = health.clone();
            async move {
                let r = http.get(&health).await.ok()?;
                (r.status == 200 && r.text().contains("true")).then_some(())
            }
        })
        .await;
        Self {
            url,
            _process: process,
        }
    }
}

/// Finds `name` on `$PATH`.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
