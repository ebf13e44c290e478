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
        let args = member_args(
            "test",
            &dir.join("etcd-data"),
            &url,
            &peer_url,
            &format!("test={peer_url}"),
        );
        let mut etcd = Self {
            url,
            process: None,
            args,
            dir: dir.to_path_buf(),
        };
        etcd.restart().await;
        etcd
    }

    /// Runs the real `etcdctl` against this server with `args` (and
    /// `stdin` piped in, e.g. a binary value for `put`); panics with its
    /// stderr when it fails; returns its stdout.
    pub async fn ctl(&self, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
        use std::process::Stdio;
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("etcdctl")
            .arg("--endpoints")
            .arg(&self.url)
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("etcdctl runs");
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(bytes).await.expect("etcdctl stdin");
        }
        let out = child.wait_with_output().await.expect("etcdctl finishes");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::pid)
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

/// The flags of one etcd member on loopback.
fn member_args(name: &str, data: &Path, url: &str, peer_url: &str, initial: &str) -> Vec<String> {
    [
        "--name",
        name,
        "--data-dir",
        &data.to_string_lossy(),
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        initial,
        "--log-level",
        "warn",
    ]
    .map(String::from)
    .to_vec()
}

/// Finds `name` on `$PATH`.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// A multi-member etcd cluster on loopback, members killable one by one.
pub struct EtcdCluster {
    /// Client URLs of the members, in member order.
    pub urls: Vec<String>,
    members: Vec<Option<Process>>,
}

impl EtcdCluster {
    /// Starts `size` members with data under `dir`; waits until each is healthy.
    pub async fn start(dir: &Path, size: usize) -> Self {
        let etcd = which("etcd")
            .expect("etcd not found: install Debian's etcd-server (the test command does)");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        let mut urls = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut args = member_args(
                &format!("m{i}"),
                &dir.join(format!("m{i}")),
                &url,
                &peer_url,
                &initial,
            );
            args.extend(
                [
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "infermesh-test",
                ]
                .map(String::from),
            );
            members.push(Some(Process::spawn(
                &format!("etcd-m{i}"),
                &etcd,
                &args,
                dir,
                &[],
            )));
            urls.push(url);
        }
        let http = Http::new();
        for url in &urls {
            let health = format!("{url}/health");
            wait::until("etcd member to be healthy", Duration::from_secs(30), || {
                let (http, health) = (http.clone(), health.clone());
                async move {
                    let r = http.get(&health).await.ok()?;
                    (r.status == 200 && r.text().contains("true")).then_some(())
                }
            })
            .await;
        }
        Self { urls, members }
    }

    /// The member that leads now (by etcd's maintenance status), if one answers.
    pub async fn leader(&self) -> Option<usize> {
        let http = Http::new();
        for (i, url) in self.urls.iter().enumerate() {
            if self.members[i].is_none() {
                continue;
            }
            let Ok(reply) = http
                .post_json(
                    &format!("{url}/v3/maintenance/status"),
                    &serde_json::json!({}),
                )
                .await
            else {
                continue;
            };
            let status = reply.json();
            if status["header"]["member_id"].is_string()
                && status["header"]["member_id"] == status["leader"]
            {
                return Some(i);
            }
        }
        None
    }

    /// Kills member `i` (SIGKILL).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut process) = self.members[i].take() {
            process.kill().await;
        }
    }
}
