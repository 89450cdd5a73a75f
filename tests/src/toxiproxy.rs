//! Shopify's toxiproxy (<https://github.com/Shopify/toxiproxy>): a TCP proxy whose proxies
//! can be disabled (connections closed, new ones refused) or given "toxics" (latency, a
//! connection that stops passing data) through its HTTP API. Built from Go modules at
//! [`TOXIPROXY_VERSION`] on first use; the server runs as a child process of the test.

use std::{
    io::{Read, Write},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{free_port, go_install};

/// toxiproxy version the tests use.
pub const TOXIPROXY_VERSION: &str = "v2.5.0";

/// A running toxiproxy server (killed on drop).
pub struct Toxiproxy {
    child: Child,
    api: String,
}

impl Toxiproxy {
    /// Builds (first time) and starts a toxiproxy server with its API on a free loopback
    /// port; waits up to 10 s for the API to answer.
    ///
    /// # Errors
    /// The build, the start or the API failed.
    pub fn start() -> anyhow::Result<Self> {
        let server = go_install(
            "github.com/Shopify/toxiproxy/v2/cmd/server",
            TOXIPROXY_VERSION,
            "server",
        )?;
        let port = free_port()?;
        let child = Command::new(server)
            .args(["-host", "127.0.0.1", "-port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting toxiproxy")?;
        let proxy = Self {
            child,
            api: format!("127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while proxy.request("GET", "/version", "").is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!(
                    "toxiproxy's API did not answer on {} within 10 s",
                    proxy.api
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(proxy)
    }

    /// Creates proxy `name` listening on `listen` (`HOST:PORT`) and forwarding to `upstream`.
    ///
    /// # Errors
    /// The API refused it (e.g. the port is taken).
    pub fn create(&self, name: &str, listen: &str, upstream: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "name": name, "listen": listen, "upstream": upstream, "enabled": true,
        });
        self.expect("POST", "/proxies", &body.to_string())
    }

    /// Enables or disables proxy `name`. Disabling closes its connections and refuses new
    /// ones (a host that cannot be reached).
    ///
    /// # Errors
    /// The API refused it.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> anyhow::Result<()> {
        let body = serde_json::json!({ "enabled": enabled });
        self.expect("POST", &format!("/proxies/{name}"), &body.to_string())
    }

    /// Adds toxic `toxic` of `kind` (toxiproxy's type: `latency`, `timeout`, `bandwidth`, …)
    /// with `attributes` (e.g. `{"latency": 200, "jitter": 50}`, ms) to both directions of
    /// proxy `name`, as toxics `<toxic>-up` and `<toxic>-down`.
    ///
    /// # Errors
    /// The API refused it.
    pub fn add_toxic(
        &self,
        name: &str,
        toxic: &str,
        kind: &str,
        attributes: &serde_json::Value,
    ) -> anyhow::Result<()> {
        for stream in ["upstream", "downstream"] {
            let body = serde_json::json!({
                "name": format!("{toxic}-{}", &stream[..stream.len() - 6]),
                "type": kind,
                "stream": stream,
                "toxicity": 1.0,
                "attributes": attributes,
            });
            self.expect(
                "POST",
                &format!("/proxies/{name}/toxics"),
                &body.to_string(),
            )?;
        }
        Ok(())
    }

    /// Removes toxic `toxic` (both directions) from proxy `name`.
    ///
    /// # Errors
    /// The API refused it.
    pub fn remove_toxic(&self, name: &str, toxic: &str) -> anyhow::Result<()> {
        for direction in ["up", "down"] {
            self.expect(
                "DELETE",
                &format!("/proxies/{name}/toxics/{toxic}-{direction}"),
                "",
            )?;
        }
        Ok(())
    }

    /// One API call that must answer 2xx.
    fn expect(&self, method: &str, path: &str, body: &str) -> anyhow::Result<()> {
        let (status, answer) = self.request(method, path, body)?;
        if !(200..300).contains(&status) {
            bail!("toxiproxy {method} {path}: {status} {answer}");
        }
        Ok(())
    }

    /// One HTTP/1.1 request to the API; the status code and the body.
    fn request(&self, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(&self.api)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("toxiproxy answered {out:?}"))?;
        let answer = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, answer.to_owned()))
    }
}

impl Drop for Toxiproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
