//! The operator under test: CRDs installed on the test control plane, the loopback kubelet
//! running broker Pods as local processes, and `weir-operator run` as a real process with
//! its own metrics port, killable and restartable.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    bin,
    k8s::ControlPlane,
    kubelet::{KubeletConfig, LoopbackKubelet},
};

/// Path of the checked-in CRDs.
pub fn crds_path() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("crds")
        .join("weir.dev.yaml")
}

/// Applies the CRDs (server-side, idempotent) and waits until they are established.
pub fn install_crds(cp: &ControlPlane) -> anyhow::Result<()> {
    cp.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &crds_path().to_string_lossy(),
    ])?;
    for crd in ["topics.weir.dev", "consumergroups.weir.dev"] {
        cp.kubectl(&[
            "wait",
            "--for",
            "condition=established",
            &format!("crd/{crd}"),
            "--timeout=30s",
        ])?;
    }
    Ok(())
}

/// Image name the operator is told to use for brokers; the loopback kubelet maps it to the
/// `weir-broker` binary.
pub const BROKER_IMAGE: &str = "weir-broker:test";

pub use crate::free_port;

/// A running `weir-operator run` process; killed when dropped.
#[derive(Debug)]
pub struct Operator {
    child: Option<Child>,
    args: Vec<String>,
    kubeconfig: PathBuf,
    /// `host:port` of its metrics and health endpoints.
    pub http: String,
    logs: Arc<Mutex<Vec<String>>>,
    env: Vec<(String, String)>,
}

impl Operator {
    /// Starts the operator for namespace `ns` (its Lease there too), with short intervals
    /// for tests and `extra` flags.
    pub fn start(cp: &ControlPlane, ns: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let http = format!("127.0.0.1:{}", free_port()?);
        let mut args: Vec<String> = [
            "run",
            "--namespace",
            ns,
            "--lease-namespace",
            ns,
            "--broker-image",
            BROKER_IMAGE,
            "--status-interval",
            "1s",
            "--lease-seconds",
            "4",
            "--http-listen",
            &http,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut op = Self {
            child: None,
            args,
            kubeconfig: cp.kubeconfig.clone(),
            http,
            logs: Arc::new(Mutex::new(Vec::new())),
            env: Vec::new(),
        };
        op.spawn()?;
        Ok(op)
    }

    /// Starts `weir-operator` with exactly `args` and `env`, talking to the API server with
    /// `kubeconfig` (e.g. one holding a ServiceAccount token); its HTTP endpoint must be
    /// `http` (`host:port`, as in its `--http-listen`).
    pub fn start_with(
        kubeconfig: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        http: String,
    ) -> anyhow::Result<Self> {
        let mut op = Self {
            child: None,
            args,
            kubeconfig,
            http,
            logs: Arc::new(Mutex::new(Vec::new())),
            env,
        };
        op.spawn()?;
        Ok(op)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        // `setpriv --pdeathsig`: the operator dies with the test process, even one killed
        // without running its destructors.
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(bin("weir-operator"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", &self.kubeconfig)
            // `WEIR_OPERATOR_RUST_LOG` overrides the operator's log filter (e.g. to add
            // `kube_runtime=debug`).
            .env(
                "RUST_LOG",
                std::env::var("WEIR_OPERATOR_RUST_LOG")
                    .unwrap_or_else(|_| "info,weir_operator=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting weir-operator")?;
        // The log (stdout) and what the process says when it cannot start (stderr).
        let stdout = child.stdout.take().context("operator stdout")?;
        let stderr = child.stderr.take().context("operator stderr")?;
        // `WEIR_OPERATOR_LOG=FILE` also appends the log to FILE, to read while a test runs.
        let copy = match std::env::var_os("WEIR_OPERATOR_LOG") {
            Some(path) => Some(Arc::new(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening WEIR_OPERATOR_LOG {}", path.display()))?,
            ))),
            None => None,
        };
        let readers: [Box<dyn std::io::Read + Send>; 2] = [Box::new(stdout), Box::new(stderr)];
        for out in readers {
            let logs = Arc::clone(&self.logs);
            let copy = copy.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(f) = copy.as_ref()
                        && let Ok(mut f) = f.lock()
                    {
                        use std::io::Write as _;
                        let _ = writeln!(f, "{line}");
                    }
                    if let Ok(mut l) = logs.lock() {
                        l.push(line);
                    }
                }
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL (no lease release, no cleanup), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again with the same flags.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Starts the process again with `args` (as a Deployment rolls to a new Pod template).
    pub fn restart_with(&mut self, args: Vec<String>) -> anyhow::Result<()> {
        self.kill();
        self.args = args;
        self.spawn()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.logs.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// GET `path` on its HTTP port; `None` when it does not answer.
    pub fn get(&self, path: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(&self.http).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// Peak resident memory of the operator process so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The share (0 to 1) of the reconciles of `kind` (`Topic`, `ConsumerGroup`) that took at
    /// most `seconds` (a bucket bound of `weir_operator_reconcile_duration_seconds`), from
    /// the histogram's cumulative buckets; `None` when the metric is unreadable or the
    /// bound is not a bucket's.
    pub fn reconciles_within(&self, kind: &str, seconds: f64) -> Option<f64> {
        let text = self.get("/metrics")?;
        let label = format!("kind=\"{kind}\"");
        let mut within = None;
        let mut total = None;
        for line in text.lines().filter(|l| l.contains(&label)) {
            let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
            if line.starts_with("weir_operator_reconcile_duration_seconds_count") {
                total = Some(value);
            } else if line.starts_with("weir_operator_reconcile_duration_seconds_bucket") {
                let le = line.split("le=\"").nth(1)?.split('"').next()?;
                if le
                    .parse::<f64>()
                    .ok()
                    .is_some_and(|b| (b - seconds).abs() < 1e-9)
                {
                    within = Some(value);
                }
            }
        }
        match (within, total) {
            (Some(w), Some(t)) if t > 0.0 => Some(w / t),
            _ => None,
        }
    }

    /// Value of the metric line starting with `prefix` (e.g. `weir_operator_leader`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.get("/metrics")?
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A namespace with CRDs, a loopback kubelet for its broker Pods and an operator.
#[derive(Debug)]
pub struct Cluster {
    /// The control plane.
    pub cp: &'static ControlPlane,
    /// The test's namespace.
    pub ns: String,
    /// Runs the broker Pods.
    pub kubelet: LoopbackKubelet,
    /// The operator process.
    pub operator: Operator,
    _root: tempfile::TempDir,
    _keep: Option<tempfile::TempDir>,
}

impl Cluster {
    /// A client of broker Pod `pod`, at its Pod IP.
    pub async fn pod_client(&self, pod: &str) -> anyhow::Result<weir_client::Client> {
        let ip = self
            .kubelet
            .ip(pod)
            .await
            .ok_or_else(|| anyhow::anyhow!("broker Pod {pod} has no IP"))?;
        Ok(weir_client::Client::connect(&format!("http://{ip}:7070")).await?)
    }

    /// A client through one address of the `weir` Service: one of its ready endpoints (there
    /// is no kube-proxy in the test cluster to give the Service's ClusterIP a route).
    pub async fn service_client(&self) -> anyhow::Result<weir_client::Client> {
        let address = self.service_endpoint().await?;
        Ok(weir_client::Client::connect(&format!("http://{address}")).await?)
    }

    /// `ip:port` of one ready endpoint of the `weir` Service, waiting up to a minute for
    /// one: a Ready Pod its selector matches, at the port its `grpc` port targets. That is
    /// what the endpoint-slice controller would list; here it cannot, since EndpointSlices
    /// refuse loopback addresses (the loopback kubelet's Pod IPs).
    pub async fn service_endpoint(&self) -> anyhow::Result<String> {
        let svc: serde_json::Value =
            serde_json::from_str(&self.kubectl(&["get", "service", "weir", "-o", "json"])?)?;
        let selector = svc["spec"]["selector"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .ok_or_else(|| anyhow::anyhow!("the weir Service has no selector: {svc}"))?;
        let port = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "grpc")
            .and_then(|p| p["port"].as_u64())
            .ok_or_else(|| anyhow::anyhow!("the weir Service has no grpc port: {svc}"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let pods: serde_json::Value = serde_json::from_str(
                &self.kubectl(&["get", "pods", "-l", &selector, "-o", "json"])?,
            )?;
            let mut ready: Vec<(String, String)> = pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| {
                    p["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .filter_map(|p| {
                    Some((
                        p["metadata"]["name"].as_str()?.to_owned(),
                        p["status"]["podIP"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            ready.sort();
            if let Some((_, ip)) = ready.first() {
                return Ok(format!("{ip}:{port}"));
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the weir Service has no ready endpoint after a minute"
            );
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Sets up namespace `test-…` with broker Pod IPs from `127.0.0.<first_ip>` and an
    /// operator started with `operator_args`.
    pub async fn start(test: &str, first_ip: u8, operator_args: &[&str]) -> anyhow::Result<Self> {
        let args: Vec<String> = operator_args.iter().map(|a| (*a).to_owned()).collect();
        Self::start_with(test, first_ip, move |cp, ns| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Ok((Operator::start(cp, ns, &args)?, None))
        })
        .await
    }

    /// Like [`Cluster::start`], with the operator (and a directory it needs kept) from
    /// `operator`, given the control plane and the namespace (e.g. [`crate::helm::install`]).
    pub async fn start_with<F>(test: &str, first_ip: u8, operator: F) -> anyhow::Result<Self>
    where
        F: FnOnce(
            &'static ControlPlane,
            &str,
        ) -> anyhow::Result<(Operator, Option<tempfile::TempDir>)>,
    {
        let cp = ControlPlane::shared();
        install_crds(cp)?;
        let ns = cp.namespace(test)?;
        let root = tempfile::tempdir()?;
        let kubelet = LoopbackKubelet::start(
            cp.client().await?,
            KubeletConfig {
                namespace: ns.clone(),
                selector: "app.kubernetes.io/name=weir,app.kubernetes.io/component=broker".into(),
                node: "loopback".into(),
                images: HashMap::from([(BROKER_IMAGE.to_owned(), bin("weir-broker"))]),
                root: root.path().to_path_buf(),
                first_ip,
                default_grpc_port: 7070,
            },
        )
        .await?;
        let (operator, keep) = operator(cp, &ns)?;
        Ok(Self {
            cp,
            ns,
            kubelet,
            operator,
            _root: root,
            _keep: keep,
        })
    }

    /// `kubectl ARGS -n <ns>`.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["-n", &self.ns]);
        self.cp.kubectl(&a)
    }

    /// `kubectl apply -f -` of `yaml` in the namespace.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        self.cp.apply(&self.ns, yaml)
    }

    /// The object `kind/name` as JSON; `None` when it does not exist.
    pub fn get(&self, kind: &str, name: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let out = self.cp.run(
            "kubectl",
            &["get", kind, name, "-n", &self.ns, "-o", "json"],
            None,
        )?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("NotFound") {
                return Ok(None);
            }
            bail!("kubectl get {kind} {name}: {err}");
        }
        Ok(Some(serde_json::from_slice(&out.stdout)?))
    }

    /// Waits until `check` on `kind/name` (as JSON) holds; fails after `timeout` with the
    /// last object and the operator's log tail.
    pub async fn wait_for<F>(
        &self,
        kind: &str,
        name: &str,
        timeout: Duration,
        what: &str,
        mut check: F,
    ) -> anyhow::Result<serde_json::Value>
    where
        F: FnMut(&serde_json::Value) -> bool,
    {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(obj) = self.get(kind, name)? {
                if check(&obj) {
                    return Ok(obj);
                }
                last = Some(obj);
            }
            if Instant::now() > deadline {
                let log = self.operator.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                bail!(
                    "{kind}/{name}: {what} not within {timeout:?}; last seen:\n{}\noperator log (last lines, newest first):\n{}",
                    serde_json::to_string_pretty(&last).unwrap_or_default(),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Notes of the Events with `reason` in the namespace (one per line).
    pub fn events(&self, reason: &str) -> anyhow::Result<Vec<String>> {
        let out = self.kubectl(&[
            "get",
            "events.events.k8s.io",
            "--field-selector",
            &format!("reason={reason}"),
            "-o",
            "jsonpath={range .items[*]}{.note}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Waits until the broker StatefulSet is gone (the operator deletes it with the last
    /// Topic) and no broker process runs.
    pub async fn wait_scaled_to_zero(&self) -> anyhow::Result<()> {
        self.wait_gone("statefulset", "weir-broker", Duration::from_secs(60))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.kubelet.running().await.is_empty() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "broker processes still run: {:?}",
                self.kubelet.running().await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Waits until `kind/name` is gone.
    pub async fn wait_gone(&self, kind: &str, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.get(kind, name)?.is_some() {
            if Instant::now() > deadline {
                bail!(
                    "{kind}/{name} still exists after {timeout:?}; operator log:\n{}",
                    self.operator.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

/// Whether `obj` has condition `Ready` with `status` for its current generation.
pub fn is_ready(obj: &serde_json::Value, status: &str) -> bool {
    let generation = obj["metadata"]["generation"].as_i64().unwrap_or(-1);
    obj["status"]["observedGeneration"].as_i64() == Some(generation)
        && obj["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == status)
        })
}

/// `status.placement` of a Topic as (partition, broker, address).
pub fn placement(topic: &serde_json::Value) -> Vec<(u32, String, String)> {
    topic["status"]["placement"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["partition"].as_u64().unwrap_or(u64::MAX) as u32,
                        p["broker"].as_str().unwrap_or_default().to_owned(),
                        p["address"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Per broker that leads partitions of a Topic (by Pod name, as its `status.placement`
/// names them): a client connected to the Pod's IP (the address a Pod of the cluster
/// would reach through the headless Service's name), and the partitions it leads.
pub async fn broker_clients(
    cluster: &Cluster,
    topic: &serde_json::Value,
) -> anyhow::Result<std::collections::BTreeMap<String, (weir_client::Client, Vec<u32>)>> {
    let mut out: std::collections::BTreeMap<String, (weir_client::Client, Vec<u32>)> =
        std::collections::BTreeMap::new();
    for (p, broker, _) in placement(topic) {
        if !out.contains_key(&broker) {
            let client = cluster.pod_client(&broker).await?;
            out.insert(broker.clone(), (client, Vec::new()));
        }
        if let Some((_, parts)) = out.get_mut(&broker) {
            parts.push(p);
        }
    }
    Ok(out)
}

/// Checks that every broker of `brokers` answers NOT_FOUND for `topic` (its data is gone).
pub async fn assert_deleted_from(
    brokers: &std::collections::BTreeMap<String, (weir_client::Client, Vec<u32>)>,
    topic: &str,
) -> anyhow::Result<()> {
    for (broker, (client, _)) in brokers {
        match client.describe_topic(topic).await {
            Ok(_) => anyhow::bail!("{broker} still has topic {topic}"),
            Err(e) => anyhow::ensure!(
                e.code() == Some(tonic::Code::NotFound),
                "{broker}: describing {topic} failed otherwise than NOT_FOUND: {e}"
            ),
        }
    }
    Ok(())
}
