//! A real HAProxy (Debian's `haproxy`, installed by `scripts/install-deps.sh --with-redis`) on
//! free loopback ports in front of gateways, started from a config the test writes, killed when
//! dropped.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::kafka::free_port;

/// A running HAProxy.
pub struct Haproxy {
    child: Child,
    /// Its frontends' ports, in the order the config named them.
    pub ports: Vec<u16>,
}

impl Haproxy {
    /// Starts HAProxy with `frontends` (each a frontend's body after its `bind` line, e.g.
    /// `mode tcp\n  server s 127.0.0.1:1883 send-proxy-v2`), each on a free port, and waits
    /// until every one accepts connections. `dir` holds the config file.
    pub fn start(dir: &Path, frontends: &[&str]) -> Result<Haproxy> {
        let binary = ["/usr/sbin/haproxy", "haproxy"]
            .into_iter()
            .find(|b| Path::new(b).exists() || which(b))
            .context(
                "haproxy is not installed (scripts/install-deps.sh --with-redis installs it)",
            )?;
        let ports: Vec<u16> = frontends.iter().map(|_| free_port()).collect();
        let mut cfg = String::from(
            "global\n  maxconn 1000\ndefaults\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
        );
        for (i, (f, port)) in frontends.iter().zip(&ports).enumerate() {
            let (mode, rest) = f.split_once('\n').unwrap_or((f, ""));
            cfg.push_str(&format!(
                "listen l{i}\n  bind 127.0.0.1:{port}\n  {mode}\n  {}\n",
                rest.trim()
            ));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, &cfg)?;
        let child = Command::new(binary)
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning haproxy")?;
        let mut h = Haproxy { child, ports };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = h.child.try_wait()? {
                bail!("haproxy exited ({status}) with config:\n{cfg}");
            }
            if h.ports
                .iter()
                .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!("haproxy did not listen within 20 s with config:\n{cfg}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn which(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
