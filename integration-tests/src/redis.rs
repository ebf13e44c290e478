//! A real `redis-server` (Debian's package) on a free loopback port, with
//! no persistence, that a test can kill and start again on the same port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::binaries::free_port;
use crate::process::Process;
use crate::wait;

/// A running (or stopped) Redis.
pub struct Redis {
    /// `redis://127.0.0.1:PORT/0`.
    pub url: String,
    port: u16,
    dir: PathBuf,
    process: Option<Process>,
}

impl Redis {
    /// Starts Redis with its working directory under `dir`; waits for PONG.
    pub async fn start(dir: &Path) -> Self {
        let port = free_port();
        let mut redis = Self {
            url: format!("redis://127.0.0.1:{port}/0"),
            port,
            dir: dir.to_path_buf(),
            process: None,
        };
        redis.restart().await;
        redis
    }

    /// Starts it again on the same port (after `kill`); waits for PONG.
    pub async fn restart(&mut self) {
        let binary = crate::etcd::which("redis-server")
            .expect("redis-server not found: the test command installs Debian's redis-server");
        let args = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.to_string_lossy(),
        ]
        .map(String::from);
        self.process = Some(Process::spawn("redis", &binary, &args, &self.dir, &[]));
        let port = self.port;
        wait::until(
            "redis to answer PING",
            Duration::from_secs(20),
            || async move { ping(port).await.then_some(()) },
        )
        .await;
    }

    /// Kills it (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await;
        }
    }
}

async fn ping(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"+PONG\r\n"
    )
}
