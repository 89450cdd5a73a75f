//! Harness of Weir's end-to-end tests: real broker processes on loopback, the real `weir`
//! CLI, and real tools (grpcurl) built from pinned sources.
//!
//! - [`Broker`] starts `weir-broker` on `127.0.0.1:0` with its own data directory, reads the
//!   bound address from its JSON log, and can be killed (SIGKILL), stopped (SIGTERM) and
//!   restarted on the same directory.
//! - [`bin`] returns the path of a workspace binary, building it once per test run.
//! - [`grpcurl`] returns a grpcurl binary, built with `go install` at a pinned version into
//!   `~/.cache/weir/tools` on first use.
//! - [`toxiproxy::Toxiproxy`]: Shopify's fault-injecting TCP proxy (built with `go install`),
//!   between brokers for network faults.
//! - [`loghub`] reads the Loghub samples in `tests/data/loghub`.
//!
//! - [`k8s::ControlPlane`]: the real Kubernetes control plane of `tests/k8s/control-plane`.
//! - [`kubelet::LoopbackKubelet`]: runs Pods of that control plane as local processes.
//! - [`helm`]: the chart installed, and the operator run with its ServiceAccount's token.
//! - [`operator::Cluster`]: CRDs, a loopback kubelet and a `weir-operator` process for one
//!   test namespace.
//!
//! A missing tool or binary fails the test with what to do; nothing is skipped.

pub mod helm;
pub mod k8s;
pub mod kubelet;
pub mod operator;
pub mod toxiproxy;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// grpcio's version in the Python environment of the tests.
pub const GRPCIO_VERSION: &str = "1.85.1";

/// The Python interpreter of a virtual environment with `grpcio` and `grpcio-tools` at
/// [`GRPCIO_VERSION`], created under `~/.cache/weir/tools` on first use (python3 and PyPI are
/// needed then; prebuilt wheels, a few seconds).
///
/// # Errors
///
/// python3 is missing or pip cannot install the packages: the message says which.
pub fn python_grpc() -> anyhow::Result<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let env = cache_dir()
                .join("tools")
                .join(format!("python-grpcio-{GRPCIO_VERSION}"));
            let python = env.join("bin").join("python");
            let ready = env.join(".installed");
            if ready.exists() {
                return Ok(python);
            }
            let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
                let out = cmd
                    .output()
                    .map_err(|e| format!("{what}: {e} (is python3 installed?)"))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{what} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            };
            run(
                Command::new("python3").arg("-m").arg("venv").arg(&env),
                "creating a Python virtual environment",
            )?;
            run(
                Command::new(&python).args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    &format!("grpcio=={GRPCIO_VERSION}"),
                    &format!("grpcio-tools=={GRPCIO_VERSION}"),
                ]),
                "installing grpcio and grpcio-tools from PyPI",
            )?;
            std::fs::write(&ready, GRPCIO_VERSION).map_err(|e| e.to_string())?;
            Ok(python)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// A new temporary directory holding `data/`, a data directory written by the broker before
/// metadata schema 2 and before the cluster (`tests/data/schema-1-data-dir.tar.gz`: topic
/// `old` with 2 partitions and three keyed records, group `readers` that acked two of them,
/// topic `second`).
///
/// # Errors
///
/// `tar` is missing or fails.
pub fn schema_1_data_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let archive = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("schema-1-data-dir.tar.gz");
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.path())
        .status()?;
    anyhow::ensure!(status.success(), "unpacking {}", archive.display());
    Ok(dir)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then released) and that this
/// process has not handed out before.
///
/// Ports come from 20000–32767, below Linux's default ephemeral range (32768–60999,
/// `/proc/sys/net/ipv4/ip_local_port_range`): a port the kernel picked for `bind(0)` is
/// also what it picks for the next outgoing connection, so a port taken that way can be in
/// use as a client's source port by the time a broker binds it (seen in CI as "Address
/// already in use"). Each process starts at an offset from its pid, so test binaries run at
/// the same time rarely meet.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_768;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % COUNT,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..COUNT {
        let port = FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % COUNT;
        let port = u16::try_from(port)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!(
        "no free TCP port on 127.0.0.1 in {FIRST}..{}",
        FIRST + COUNT
    )
}

/// Waits up to 30 s until the `Metadata` of every broker at `urls` lists `urls.len()`
/// brokers.
fn await_members(urls: &[String]) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for url in urls {
        loop {
            let seen = rt.block_on(async {
                let client = weir_client::Client::connect(url).await?;
                anyhow::Ok(client.metadata().await?.brokers.len())
            });
            match seen {
                Ok(n) if n == urls.len() => break,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                other => bail!(
                    "{url} lists {other:?} brokers after 30 s, not {}",
                    urls.len()
                ),
            }
        }
    }
    Ok(())
}

/// Path of the workspace binary `name` (`weir-broker`, `weir` or `weir-operator`) in the profile the tests
/// were built with. The first call runs `cargo build` for both binaries, which is a no-op
/// when they are fresh.
///
/// # Panics
///
/// When the build fails: a test cannot run without the binaries.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // Test executables live in <target>/<profile>/deps.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("test executable has no profile directory")?
            .to_path_buf();
        cargo_build(
            &profile_dir,
            &[
                "--bins",
                "-p",
                "weir-broker",
                "-p",
                "weir-client",
                "-p",
                "weir-operator",
            ],
        )?;
        Ok(profile_dir)
    });
    match dir {
        Ok(d) => d.join(name),
        Err(e) => panic!("{e}"),
    }
}

/// Runs `cargo build ARGS` into the target directory and profile of `profile_dir`.
fn cargo_build(profile_dir: &Path, args: &[&str]) -> Result<(), String> {
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").args(args);
    if release {
        cmd.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("running cargo build {args:?}: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build {args:?} failed: {status}"));
    }
    Ok(())
}

/// Path of the example program `name` of the client crate (`examples/*.rs`), built
/// once per test run in the profile the tests were built with.
///
/// # Panics
///
/// When the build fails.
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let profile_dir = bin("weir")
            .parent()
            .ok_or("binary without a directory")?
            .to_path_buf();
        cargo_build(&profile_dir, &["--examples", "-p", "weir-client"])?;
        Ok(profile_dir.join("examples"))
    });
    match dir {
        Ok(d) => d.join(name),
        Err(e) => panic!("{e}"),
    }
}

/// grpcurl version the tests use.
pub const GRPCURL_VERSION: &str = "v1.9.3";

/// Path of a grpcurl binary, built from Go modules with `go install` at
/// [`GRPCURL_VERSION`] into `$WEIR_CACHE/tools` (default `~/.cache/weir/tools`) on first use.
pub fn grpcurl() -> anyhow::Result<PathBuf> {
    go_install(
        "github.com/fullstorydev/grpcurl/cmd/grpcurl",
        GRPCURL_VERSION,
        "grpcurl",
    )
}

/// Path of the binary that `go install package@version` builds (named `binary`, the
/// package's last path element), built into `$WEIR_CACHE/tools/<binary>-<version>` on first
/// use (Go and the Go module proxy are needed then).
pub fn go_install(package: &str, version: &str, binary: &str) -> anyhow::Result<PathBuf> {
    let cache = cache_dir()
        .join("tools")
        .join(format!("{binary}-{version}"));
    let path = cache.join(binary);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&cache)?;
    let status = Command::new("go")
        .args(["install", &format!("{package}@{version}")])
        .env("GOBIN", &cache)
        .env("GOFLAGS", "-modcacherw")
        .status()
        .with_context(|| format!("running `go install` for {package} (is Go installed?)"))?;
    if !status.success() || !path.exists() {
        bail!("building {package}@{version} with go install failed: {status}");
    }
    Ok(path)
}

/// `GET path` over HTTP/1.0 from `addr` (the broker's HTTP port); the whole response, status
/// line first.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    // A paused or wedged server fails the read instead of holding the caller forever.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Total size in bytes of the files under `dir` (what `du -sb` counts, without directories).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Cache directory for tools: `$WEIR_CACHE`, else `~/.cache/weir`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEIR_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache").join("weir")
}

/// Directory of the Loghub samples.
pub fn loghub_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("loghub")
}

/// Bytes of the Loghub sample `name` (e.g. `Apache_2k.log`).
///
/// # Panics
///
/// When the file cannot be read.
pub fn loghub(name: &str) -> Vec<u8> {
    let path = loghub_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Splits input into messages the way `weir produce` does: the bytes up to each `\n`, the
/// `\n` dropped, every other byte kept; a last line without `\n` counts.
pub fn lines(input: &[u8]) -> Vec<&[u8]> {
    if input.is_empty() {
        return Vec::new();
    }
    let body = input.strip_suffix(b"\n").unwrap_or(input);
    body.split(|b| *b == b'\n').collect()
}

/// A `weir-broker` process on loopback with its own data directory.
pub struct Broker {
    child: Option<Child>,
    data_dir: PathBuf,
    temp_dir: Option<tempfile::TempDir>,
    /// gRPC address, `127.0.0.1:port`.
    pub addr: String,
    /// HTTP address (metrics, health), `127.0.0.1:port`.
    pub http_addr: String,
    /// Every log line the broker wrote to stderr (JSON), across restarts.
    pub logs: Arc<Mutex<Vec<String>>>,
    /// Extra flags for `weir-broker`.
    args: Vec<String>,
    /// gRPC listen address for the next start (`127.0.0.1:0` until pinned).
    listen: String,
    /// Open-files limit (soft and hard) to start the broker under, if any.
    open_files: Option<u64>,
}

impl Broker {
    /// Starts a broker on a new temporary data directory.
    pub fn start() -> anyhow::Result<Self> {
        let temp = tempfile::tempdir()?;
        let mut b = Self::start_in(temp.path())?;
        b.temp_dir = Some(temp);
        Ok(b)
    }

    /// Starts a broker on `data_dir` (kept after the broker stops).
    pub fn start_in(data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(data_dir, &[])
    }

    /// Starts a broker on `data_dir` with extra `weir-broker` flags.
    pub fn start_with(data_dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::launch(data_dir, args, None)
    }

    /// Starts `n` brokers as one cluster on loopback: ids 0.., fixed free ports, every one
    /// with the same `--peers`, each on its own new data directory, plus `args`. Returns once
    /// every broker is ready (joined the metadata group).
    pub fn start_cluster(n: usize, args: &[&str]) -> anyhow::Result<Vec<Self>> {
        Self::start_cluster_with_peers(n, n, args)
    }

    /// Starts `n` brokers of which only the first `peers` are in `--peers` (the initial
    /// voters); the others join as learners (and are promoted to voters while the group has
    /// fewer than three). Waits until every broker is ready and lists all of them.
    pub fn start_cluster_with_peers(
        n: usize,
        peers: usize,
        args: &[&str],
    ) -> anyhow::Result<Vec<Self>> {
        Self::start_cluster_at(n, peers, args, None)
    }

    /// Starts `n` brokers as [`Broker::start_cluster`] does, each behind a proxy of `proxy`
    /// named `broker-<i>`: each advertises its proxy's address, so its peers' connections to
    /// it and clients routed to it pass through the proxy (disable it or add toxics to
    /// partition the broker or slow its network). [`Broker::url`] stays the broker's own
    /// address.
    pub fn start_cluster_behind(
        proxy: &toxiproxy::Toxiproxy,
        n: usize,
        args: &[&str],
    ) -> anyhow::Result<Vec<Self>> {
        Self::start_cluster_at(n, n, args, Some(proxy))
    }

    fn start_cluster_at(
        n: usize,
        peers: usize,
        args: &[&str],
        proxy: Option<&toxiproxy::Toxiproxy>,
    ) -> anyhow::Result<Vec<Self>> {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        let mut advertised = ports.clone();
        if let Some(proxy) = proxy {
            for (i, port) in ports.iter().enumerate() {
                advertised[i] = free_port()?;
                proxy.create(
                    &format!("broker-{i}"),
                    &format!("127.0.0.1:{}", advertised[i]),
                    &format!("127.0.0.1:{port}"),
                )?;
            }
        }
        let peers = advertised
            .iter()
            .take(peers)
            .enumerate()
            .map(|(i, p)| format!("{i}=127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut brokers = Vec::with_capacity(n);
        let mut waiting = Vec::with_capacity(n);
        for (i, port) in ports.iter().enumerate() {
            let temp = tempfile::tempdir()?;
            let mut all: Vec<String> = vec![
                "--node-id".into(),
                i.to_string(),
                "--peers".into(),
                peers.clone(),
            ];
            if proxy.is_some() {
                all.extend(["--advertise".into(), format!("127.0.0.1:{}", advertised[i])]);
            }
            all.extend(args.iter().map(|a| (*a).to_owned()));
            let mut b = Self {
                child: None,
                data_dir: temp.path().to_path_buf(),
                temp_dir: Some(temp),
                addr: String::new(),
                http_addr: String::new(),
                logs: Arc::new(Mutex::new(Vec::new())),
                args: all,
                listen: format!("127.0.0.1:{port}"),
                open_files: None,
            };
            waiting.push(b.spawn_process()?);
            brokers.push(b);
        }
        for (b, rx) in brokers.iter_mut().zip(&waiting) {
            b.await_ready(rx)?;
        }
        Self::await_members(&brokers)?;
        Ok(brokers)
    }

    /// Waits up to 30 s until every broker's `Metadata` lists all `brokers`. A broker is
    /// ready once a majority is up, so it may not yet have applied the registration of the
    /// last one to start.
    ///
    /// Runs on a thread of its own, since callers may be inside a Tokio runtime.
    fn await_members(brokers: &[Self]) -> anyhow::Result<()> {
        let urls: Vec<String> = brokers.iter().map(Self::url).collect();
        std::thread::scope(|s| {
            s.spawn(|| await_members(&urls))
                .join()
                .map_err(|_| anyhow::anyhow!("waiting for the cluster's members panicked"))?
        })
    }

    /// Starts the broker again without waiting for it to be ready; [`Broker::wait_ready`]
    /// waits. For a broker of a cluster, which is ready only once a majority is up.
    pub fn restart_nowait(&mut self) -> anyhow::Result<mpsc::Receiver<String>> {
        self.kill();
        self.spawn_process()
    }

    /// Waits for the "broker ready" line of a [`Broker::restart_nowait`].
    pub fn wait_ready(&mut self, ready: &mpsc::Receiver<String>) -> anyhow::Result<()> {
        self.await_ready(ready)
    }

    /// Starts a broker on `data_dir` with extra flags under an open-files limit of
    /// `open_files` (soft and hard, as `ulimit -n` sets them).
    pub fn start_with_open_files(
        data_dir: &Path,
        args: &[&str],
        open_files: u64,
    ) -> anyhow::Result<Self> {
        Self::launch(data_dir, args, Some(open_files))
    }

    fn launch(data_dir: &Path, args: &[&str], open_files: Option<u64>) -> anyhow::Result<Self> {
        let mut b = Self {
            child: None,
            data_dir: data_dir.to_path_buf(),
            temp_dir: None,
            addr: String::new(),
            http_addr: String::new(),
            logs: Arc::new(Mutex::new(Vec::new())),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            listen: "127.0.0.1:0".into(),
            open_files,
        };
        b.spawn()?;
        Ok(b)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let ready = self.spawn_process()?;
        self.await_ready(&ready)
    }

    /// Starts the process; the receiver gets its "broker ready" log line.
    fn spawn_process(&mut self) -> anyhow::Result<mpsc::Receiver<String>> {
        let mut command = match self.open_files {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin("weir-broker"));
                c
            }
            None => Command::new(bin("weir-broker")),
        };
        let mut child = command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", &self.listen, "--http-listen", "127.0.0.1:0"])
            .args(&self.args)
            .args(["--log-format", "json"])
            .env(
                "WEIR_LOG",
                std::env::var("WEIR_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting weir-broker")?;
        let stderr = child.stderr.take().context("broker stderr")?;
        let (tx, rx) = mpsc::channel();
        let logs = Arc::clone(&self.logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let ready = line.contains("\"broker ready\"").then(|| line.clone());
                // Kept before the ready line is passed on, so that the logs of a broker
                // whose start returned hold that line.
                if let Ok(mut l) = logs.lock() {
                    l.push(line);
                }
                if let Some(ready) = ready {
                    let _ = tx.send(ready);
                }
            }
        });
        self.child = Some(child);
        Ok(rx)
    }

    /// Waits up to 30 s for the "broker ready" line and takes the bound addresses from it.
    fn await_ready(&mut self, rx: &mpsc::Receiver<String>) -> anyhow::Result<()> {
        let Ok(ready) = rx.recv_timeout(Duration::from_secs(30)) else {
            bail!(
                "broker did not log \"broker ready\" within 30 s; logs:\n{}",
                self.log_text()
            );
        };
        self.addr = json_field(&ready, "grpc_addr").context("grpc_addr in ready line")?;
        self.http_addr = json_field(&ready, "http_addr").context("http_addr in ready line")?;
        Ok(())
    }

    /// `http://` URL of the gRPC server.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://` URL at which peers and routed clients reach the broker: its `--advertise`
    /// address (a proxy's, for [`Broker::start_cluster_behind`]), else [`Broker::url`].
    pub fn advertised_url(&self) -> String {
        self.args
            .iter()
            .position(|a| a == "--advertise")
            .and_then(|i| self.args.get(i + 1))
            .map_or_else(|| self.url(), |a| format!("http://{a}"))
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The value of metric `name` (a sample without labels, e.g.
    /// `weir_forwarded_requests_total`) on the broker's `/metrics`; 0 when absent.
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = http_get(&self.http_addr, "/metrics")?;
        Ok(text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }

    /// A connected client (in a cluster, routing calls straight to leaders and
    /// coordinators).
    pub async fn client(&self) -> anyhow::Result<weir_client::Client> {
        Ok(weir_client::Client::connect(&self.url()).await?)
    }

    /// A connected client that sends every call to this broker, which forwards what other
    /// brokers serve ([`weir_client::Client::without_routing`]).
    pub async fn client_through(&self) -> anyhow::Result<weir_client::Client> {
        Ok(self.client().await?.without_routing())
    }

    /// Kills the broker with SIGKILL and waits for it to die.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Adds `args` to the broker's flags from its next start on.
    pub fn add_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the broker process with `kill`.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let Some(c) = self.child.as_ref() else {
            bail!("broker is not running")
        };
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &c.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed: {status}");
        Ok(())
    }

    /// Sends SIGTERM and waits (up to 60 s) for the exit; returns the exit code. A broker
    /// still running then is killed, and the error carries its logs: a clean stop is bounded
    /// by the broker's grace period and hand-over wait, far below it.
    pub fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        self.signal("TERM")?;
        self.wait_exit(Duration::from_secs(60))
            .inspect_err(|_| self.kill())
    }

    /// Waits up to `timeout` for the broker to exit on its own; returns its exit code
    /// (`None` when a signal ended it), or an error when it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let Some(child) = self.child.as_mut() else {
            bail!("broker is not running")
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                bail!(
                    "broker still running after {timeout:?}; logs:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the broker and empties its data directory (a Pod whose volume was deleted);
    /// [`Broker::restart`] then starts it empty, with the same id and port.
    pub fn wipe(&mut self) -> anyhow::Result<()> {
        self.kill();
        std::fs::remove_dir_all(&self.data_dir)?;
        std::fs::create_dir_all(&self.data_dir)?;
        Ok(())
    }

    /// Starts the broker again on the same data directory (after [`kill`](Self::kill) or
    /// [`terminate`](Self::terminate)).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Keeps the current gRPC port for every later restart, so clients can reconnect to the
    /// same URL.
    pub fn pin_port(&mut self) {
        self.listen.clone_from(&self.addr);
    }

    /// Resident memory of the broker process in bytes (from `/proc`).
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// All log lines so far, joined.
    pub fn log_text(&self) -> String {
        self.logs.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Runs the `weir` CLI against this broker with `args` and `stdin`; returns the output.
    pub fn weir(&self, args: &[&str], stdin: &[u8]) -> anyhow::Result<std::process::Output> {
        use std::io::Write;
        let mut child = Command::new(bin("weir"))
            .args(args)
            .env("WEIR_BROKER", self.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting weir")?;
        let mut input = child.stdin.take().context("weir stdin")?;
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || input.write_all(&data));
        let out = child.wait_with_output()?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("stdin writer panicked"))??;
        Ok(out)
    }
}

impl Drop for Broker {
    /// Stops the broker; with `WEIR_TEST_LOGS` set to a directory, then writes its log there
    /// ([`Broker::write_log`]) for reading after a failed test.
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = std::env::var_os("WEIR_TEST_LOGS")
            && let Err(e) = self.write_log(Path::new(&dir))
        {
            eprintln!("{e:#}");
        }
    }
}

impl Broker {
    /// Writes what this broker logged so far to `<port>.log` in `dir`; returns its path.
    ///
    /// # Errors
    ///
    /// When the file cannot be written.
    pub fn write_log(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let port = self.addr.rsplit(':').next().unwrap_or("broker");
        let path = dir.join(format!("{port}.log"));
        std::fs::write(&path, self.log_text())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Produces through the wire API as idempotent producer `producer_id` with `sequence`
/// (what a retrying producer sends), for tests of the broker's deduplication.
pub async fn produce_as(
    client: &weir_client::Client,
    topic: &str,
    partition: Option<u32>,
    records: Vec<weir_client::Record>,
    producer_id: u64,
    sequence: u64,
) -> Result<Vec<weir_client::Ack>, tonic::Status> {
    let resp = client
        .raw()
        .producer
        .produce(weir_client::pb::ProduceRequest {
            topic: topic.to_owned(),
            partition,
            records: records.into_iter().map(Into::into).collect(),
            producer_id,
            sequence,
        })
        .await?;
    Ok(resp
        .into_inner()
        .acks
        .into_iter()
        .map(weir_client::Ack::from)
        .collect())
}

/// Creates a topic through the wire API with `config` exactly as given (including values
/// the typed API cannot express), for tests of the broker's validation.
pub async fn create_topic_raw(
    client: &weir_client::Client,
    name: &str,
    config: weir_client::pb::TopicConfig,
) -> Result<weir_client::pb::TopicDescription, tonic::Status> {
    let resp = client
        .raw()
        .admin
        .create_topic(weir_client::pb::CreateTopicRequest {
            name: name.to_owned(),
            config: Some(config),
        })
        .await?;
    resp.into_inner()
        .topic
        .ok_or_else(|| tonic::Status::internal("CreateTopicResponse.topic is missing"))
}

/// The string value of `"field":"…"` in a JSON log line (tracing's JSON puts event fields
/// under `fields`).
fn json_field(line: &str, field: &str) -> Option<String> {
    let pat = format!("\"{field}\":\"");
    let start = line.find(&pat)? + pat.len();
    let end = line.get(start..)?.find('"')? + start;
    line.get(start..end).map(str::to_owned)
}

/// The newest fjall journal file (`N.jnl`, the highest N) in `data_dir`.
///
/// # Errors
///
/// The directory cannot be read or holds no journal.
pub fn newest_journal(data_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(data_dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id: u64 = name.strip_suffix(".jnl")?.parse().ok()?;
            Some((id, e.path()))
        })
        .max_by_key(|(id, _)| *id)
        .map(|(_, path)| path)
        .ok_or_else(|| anyhow::anyhow!("no journal file in {}", data_dir.display()))
}

/// The length of a journal's written part: fjall preallocates its journal files (zeros), so
/// this is the offset after the last non-zero byte.
///
/// # Errors
///
/// The file cannot be read.
pub fn journal_data_len(path: &Path) -> anyhow::Result<u64> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i as u64 + 1))
}

/// Cuts the file at `path` to `keep` bytes; returns its length before.
///
/// # Errors
///
/// The file cannot be opened or resized.
pub fn cut_file(path: &Path, keep: u64) -> anyhow::Result<u64> {
    let len = std::fs::metadata(path)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(keep.min(len))?;
    Ok(len)
}

/// Every table file (keys and blob pointers) of the records keyspace (the key-value
/// separated one, with a `blobs` directory) in `data_dir`, sorted.
pub fn table_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(keyspaces) = std::fs::read_dir(data_dir.join("keyspaces")) {
        for ks in keyspaces.filter_map(Result::ok) {
            if !ks.path().join("blobs").is_dir() {
                continue;
            }
            if let Ok(tables) = std::fs::read_dir(ks.path().join("tables")) {
                out.extend(tables.filter_map(Result::ok).map(|t| t.path()));
            }
        }
    }
    out.sort();
    out
}

/// Overwrites the 32 bytes before the last 8 of the file at `path` (a table's trailer) with
/// their complement: the storage engine refuses the file and the broker quarantines it
/// (`docs/storage-integrity.md`).
///
/// # Errors
///
/// The file cannot be read or written, or is shorter than 40 bytes.
pub fn damage_trailer(path: &Path) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(path)?;
    let n = bytes.len();
    anyhow::ensure!(n >= 40, "{} is only {n} bytes", path.display());
    for b in &mut bytes[n - 40..n - 8] {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

/// Every record of `topic`/`partition` from offset `from` on that `broker` itself stores (the
/// call carries the forwarded mark, so the broker answers from its own replica), up to its
/// high watermark, checking the offsets are dense.
pub async fn replica_records(
    broker: &Broker,
    topic: &str,
    partition: u32,
    from: u64,
) -> anyhow::Result<std::collections::BTreeMap<u64, Vec<u8>>> {
    let mut client = weir_proto::v1::consumer_client::ConsumerClient::connect(broker.url()).await?;
    let mut out = std::collections::BTreeMap::new();
    let mut offset = from;
    loop {
        let mut request = tonic::Request::new(weir_proto::v1::FetchRequest {
            topic: topic.into(),
            partition,
            offset,
            max_records: 1000,
            ..weir_proto::v1::FetchRequest::default()
        });
        request
            .metadata_mut()
            .insert("weir-forwarded", "1".parse()?);
        let answer = client.fetch(request).await?.into_inner();
        if answer.records.is_empty() {
            anyhow::ensure!(
                offset == answer.next_offset,
                "{topic}/{partition} on {}: no records at {offset} below its end {}",
                broker.addr,
                answer.next_offset
            );
            return Ok(out);
        }
        for r in answer.records {
            anyhow::ensure!(
                r.offset == offset,
                "{topic}/{partition} on {}: offset {} where {offset} was expected (not dense)",
                broker.addr,
                r.offset
            );
            out.insert(
                r.offset,
                r.record.map(|rec| rec.value.to_vec()).unwrap_or_default(),
            );
            offset += 1;
        }
    }
}

/// `(earliest, next)` offsets of `topic`/`partition` as `broker`'s own replica has them (the
/// describe carries the forwarded mark, so the broker answers from its log).
pub async fn replica_ends(
    broker: &Broker,
    topic: &str,
    partition: u32,
) -> anyhow::Result<(u64, u64)> {
    let mut admin = weir_proto::v1::admin_client::AdminClient::connect(broker.url()).await?;
    let mut request =
        tonic::Request::new(weir_proto::v1::DescribeTopicRequest { name: topic.into() });
    request
        .metadata_mut()
        .insert("weir-forwarded", "1".parse()?);
    let answer = admin.describe_topic(request).await?.into_inner();
    let p = answer
        .topic
        .and_then(|t| t.partitions.into_iter().find(|p| p.partition == partition))
        .ok_or_else(|| anyhow::anyhow!("{topic}/{partition} not described by {}", broker.addr))?;
    Ok((p.earliest_offset, p.next_offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_the_cli_rule() {
        assert_eq!(lines(b""), Vec::<&[u8]>::new());
        assert_eq!(lines(b"a\n"), vec![&b"a"[..]]);
        assert_eq!(lines(b"a"), vec![&b"a"[..]]);
        assert_eq!(lines(b"a\r\n\nb"), vec![&b"a\r"[..], b"", b"b"]);
        assert_eq!(lines(b"\n"), vec![&b""[..]]);
    }

    #[test]
    fn a_brokers_log_is_written_where_asked() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let broker = Broker::start()?;
        let path = broker.write_log(dir.path())?;
        let port = broker.addr.rsplit(':').next().unwrap_or_default();
        assert_eq!(path, dir.path().join(format!("{port}.log")));
        let text = std::fs::read_to_string(&path)?;
        assert!(text.contains("broker ready"), "{text}");
        Ok(())
    }

    #[test]
    fn json_field_reads_the_ready_line() {
        let line = r#"{"level":"INFO","fields":{"message":"broker ready","grpc_addr":"127.0.0.1:4000","http_addr":"127.0.0.1:4001"}}"#;
        assert_eq!(
            json_field(line, "grpc_addr").as_deref(),
            Some("127.0.0.1:4000")
        );
        assert_eq!(
            json_field(line, "http_addr").as_deref(),
            Some("127.0.0.1:4001")
        );
    }
}
