//! Baseline servers this harness starts itself when given no URL: `redis-server`
//! on 127.0.0.1, a port the OS picked, its files in a temporary folder, stopped by
//! its pid (SIGTERM, then SIGKILL) when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a started server may take to answer its first PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

fn free_loopback_port() -> Result<u16> {
    // The port is free when asked; the tiny race with other programs is accepted
    // (redis-server would fail to bind, and the start would say so).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub appendfsync: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` with AOF on and `appendfsync` as given (`everysec`,
    /// `always`), RDB snapshots off, bound to 127.0.0.1 only.
    pub fn start(appendfsync: &str) -> Result<RedisServer> {
        let Some(binary) = which("redis-server") else {
            bail!("redis-server is not installed (apt-get install redis-server)");
        };
        let dir = tempfile::tempdir().context("creating Redis's folder")?;
        let port = free_loopback_port()?;
        let child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--dir", &dir.path().to_string_lossy()])
            .args(["--appendonly", "yes", "--appendfsync", appendfsync])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let server = RedisServer {
            child,
            port,
            appendfsync: appendfsync.to_string(),
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if let Ok(client) = redis::Client::open(server.url()) {
                if let Ok(mut conn) = client.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                        return Ok(server);
                    }
                }
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("redis-server on port {port} did not answer within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
