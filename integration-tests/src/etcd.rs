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
    process: Option<Process>,
    args: Vec<String>,
    dir: std::path::PathBuf,
}

impl Etcd {
    /// Starts etcd with its data under `dir` and waits until it is healthy.
    pub async fn start(dir: &Path) -> Self {
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
        .map(String::from)
        .to_vec();
        let mut etcd = Self {
            url,
            process: None,
            args,
            dir: dir.to_path_buf(),
        };
        etcd.restart().await;
        etcd
    }

    /// Starts it again with the same data and ports (after `kill`); waits until healthy.
    pub async fn restart(&mut self) {
        let binary = which("etcd")
            .expect("etcd not found: install Debian's etcd-server (the test command does)");
        self.process = Some(Process::spawn("etcd", &binary, &self.args, &self.dir, &[]));
        let http = Http::new();
        let health = format!("{}/health", self.url);
        wait::until("etcd to be healthy", Duration::from_secs(20), || {
            let http = http.clone();
            let health = health.clone();
            async move {
                let r = http.get(&health).await.ok()?;
                (r.status == 200 && r.text().contains("true")).then_some(())
            }
        })
        .await;
    }

    /// Kills it (SIGKILL), as a crash would; its data stays.
    pub async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await;
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
