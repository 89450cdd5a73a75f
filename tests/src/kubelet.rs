//! A "loopback kubelet" for the test control plane: it runs the Pods of a label selector as
//! real local processes, so StatefulSets of brokers run for real without a container
//! runtime.
//!
//! For each Pod it: binds the Pod to its Node (there is no scheduler), gives it its own
//! loopback address `127.0.0.x` as the Pod IP, starts the container's program (the image name
//! maps to a local binary) with the container's args and env, writes the Pod status as a
//! kubelet would (`Running`, `Ready` once the process's gRPC health is `SERVING`, the restart
//! count when the process dies and is started again) and stops the process when the Pod is
//! deleted, then confirms the deletion. It keeps its Node object and Lease fresh.
//!
//! Rewrites so that processes behave like Pods on one machine: `0.0.0.0` in args and env
//! becomes the Pod IP (each process listens on its own address, on the same port), and a
//! path under a volume mount becomes a per-Pod directory that outlives restarts (as a
//! StatefulSet's volume does), one per volume claim UID (a claim deleted and made again is
//! a new, empty volume). Env `valueFrom.fieldRef` supports `metadata.name`,
//! `metadata.namespace`, `metadata.labels['…']` and `status.podIP`; `$(VAR)` in env values
//! and args expands to the container's variables, as the kubelet does.
//!
//! Names: there is no cluster DNS, so each process runs in its own mount namespace
//! (`unshare --mount`) whose `/etc/hosts` is the namespace's hosts file, listing every Pod
//! this kubelet runs by the names a real cluster gives a StatefulSet's Pods
//! (`<hostname>.<subdomain>.<namespace>.svc[.cluster.local]`, resolved there by the cluster
//! DNS through the headless Service) at its loopback Pod IP. What the Pods are given is
//! unchanged; only name resolution is local.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Binding, Container, Node, ObjectReference, Pod},
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use tokio::{process::Child, sync::Mutex};

/// Settings of a loopback kubelet.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Namespace of the Pods.
    pub namespace: String,
    /// Label selector of the Pods to run, e.g. `app=weir-broker`.
    pub selector: String,
    /// Node name the Pods are bound to.
    pub node: String,
    /// Image name → local binary.
    pub images: HashMap<String, PathBuf>,
    /// Directory for the Pods' volumes and logs.
    pub root: PathBuf,
    /// Last byte of the first Pod IP (`127.0.0.<first_ip>`).
    pub first_ip: u8,
    /// gRPC port checked for health when the container names none.
    pub default_grpc_port: u16,
}

/// What the kubelet knows of one Pod's process.
#[derive(Debug)]
struct Proc {
    uid: String,
    child: Option<Child>,
    restarts: i32,
    ready: bool,
    started: Timestamp,
    /// When the process was last started again after it died.
    restarted: Option<Instant>,
    last_status: Option<serde_json::Value>,
    /// UID of the volume claim behind each volume (by volume name), read when the Pod was
    /// first seen: the claim's directory holds the volume.
    claims: BTreeMap<String, String>,
}

/// A running loopback kubelet; stops (and kills its processes) when dropped.
#[derive(Debug)]
pub struct LoopbackKubelet {
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    procs: Arc<Mutex<BTreeMap<String, Proc>>>,
    ips: Arc<Mutex<BTreeMap<String, String>>>,
}

impl LoopbackKubelet {
    /// Registers the Node and starts running the Pods of `config.selector`.
    pub async fn start(client: Client, config: KubeletConfig) -> anyhow::Result<Self> {
        ensure_node(&client, &config.node).await?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let procs = Arc::new(Mutex::new(BTreeMap::new()));
        let ips = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn(run(
            client,
            config,
            Arc::clone(&procs),
            Arc::clone(&ips),
            stop_rx,
        ));
        Ok(Self {
            stop,
            task: Some(task),
            procs,
            ips,
        })
    }

    /// OS process id of the Pod's current process.
    pub async fn pid(&self, pod: &str) -> Option<u32> {
        self.procs
            .lock()
            .await
            .get(pod)
            .and_then(|p| p.child.as_ref())
            .and_then(Child::id)
    }

    /// The Pod IP given to `pod`.
    pub async fn ip(&self, pod: &str) -> Option<String> {
        self.ips.lock().await.get(pod).cloned()
    }

    /// Names of the Pods with a live process.
    pub async fn running(&self) -> Vec<String> {
        let mut procs = self.procs.lock().await;
        procs
            .iter_mut()
            .filter_map(|(name, p)| {
                let alive = p
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                alive.then(|| name.clone())
            })
            .collect()
    }

    /// Stops the kubelet and every process it started.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        for (_, mut p) in std::mem::take(&mut *self.procs.lock().await) {
            if let Some(c) = p.child.as_mut() {
                let _ = c.kill().await;
            }
        }
    }
}

impl Drop for LoopbackKubelet {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Processes are started with kill_on_drop: dropping them kills them.
        if let Ok(mut procs) = self.procs.try_lock() {
            procs.clear();
        }
    }
}

fn now() -> Timestamp {
    Timestamp::now()
}

async fn ensure_node(client: &Client, node: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(node).await?.is_none() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": node, "labels": { "kubernetes.io/hostname": node } },
        }))?;
        match nodes.create(&PostParams::default(), &n).await {
            Ok(_) => {}
            // Another test's kubelet registered it meanwhile.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    heartbeat(client, node).await
}

/// Keeps the Node Ready and its Lease renewed, as a kubelet's heartbeat does.
async fn heartbeat(client: &Client, node: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let t = now();
    let status = serde_json::json!({
        "status": {
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "loopback kubelet is posting ready status",
                "lastHeartbeatTime": t, "lastTransitionTime": t,
            }],
            "addresses": [{ "type": "InternalIP", "address": "127.0.0.1" }],
            "capacity": { "cpu": "2", "memory": "24Gi", "pods": "110" },
            "allocatable": { "cpu": "2", "memory": "24Gi", "pods": "110" },
        }
    });
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("updating the node status")?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(node.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some(node.to_owned()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(t)),
            ..Default::default()
        }),
    };
    leases
        .patch(
            node,
            &PatchParams::apply("weir-loopback-kubelet").force(),
            &Patch::Apply(&lease),
        )
        .await
        .context("renewing the node lease")?;
    Ok(())
}

async fn run(
    client: Client,
    config: KubeletConfig,
    procs: Arc<Mutex<BTreeMap<String, Proc>>>,
    ips: Arc<Mutex<BTreeMap<String, String>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &config.namespace);
    let mut last_heartbeat = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if last_heartbeat.elapsed() > Duration::from_secs(10) {
            let _ = heartbeat(&client, &config.node).await;
            last_heartbeat = Instant::now();
        }
        let Ok(list) = pods
            .list(&ListParams::default().labels(&config.selector))
            .await
        else {
            continue;
        };
        let mut seen = Vec::new();
        for pod in list.items {
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            seen.push(name.clone());
            if let Err(e) = sync_pod(&pods, &config, &procs, &ips, &name, pod).await {
                eprintln!("loopback kubelet: pod {name}: {e:#}");
            }
        }
        let mut procs = procs.lock().await;
        procs.retain(|name, _| seen.contains(name));
    }
}

/// A Pod being deleted: its process is stopped, then the deletion confirmed (the
/// containers are gone).
async fn stop_deleted(pods: &Api<Pod>, procs: &Mutex<BTreeMap<String, Proc>>, name: &str) {
    if let Some(mut p) = procs.lock().await.remove(name)
        && let Some(c) = p.child.as_mut()
    {
        terminate(c).await;
    }
    let _ = pods
        .delete(name, &DeleteParams::default().grace_period(0))
        .await;
}

async fn sync_pod(
    pods: &Api<Pod>,
    config: &KubeletConfig,
    procs: &Mutex<BTreeMap<String, Proc>>,
    ips: &Mutex<BTreeMap<String, String>>,
    name: &str,
    pod: Pod,
) -> anyhow::Result<()> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        stop_deleted(pods, procs, name).await;
        return Ok(());
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.node_name.is_none() {
        bind(pods, name, &config.node).await?;
    }
    let container = spec
        .containers
        .first()
        .cloned()
        .context("pod has no container")?;
    let ip = {
        let mut ips = ips.lock().await;
        let n = ips.len();
        ips.entry(name.to_owned())
            .or_insert_with(|| format!("127.0.0.{}", usize::from(config.first_ip) + n))
            .clone()
    };
    write_hosts(config, name, &spec, &ip)?;
    let claims = new_pod_claims(pods, config, procs, name, &uid, &spec).await?;
    let mut procs = procs.lock().await;
    if procs.get(name).is_some_and(|p| p.uid != uid) {
        // The Pod was deleted and created again under the same name: a new Pod.
        procs.remove(name);
    }
    let p = procs.entry(name.to_owned()).or_insert_with(|| Proc {
        uid: uid.clone(),
        child: None,
        restarts: 0,
        ready: false,
        started: now(),
        restarted: None,
        last_status: None,
        claims,
    });
    let exited = match p.child.as_mut() {
        None => true,
        Some(c) => !matches!(c.try_wait(), Ok(None)),
    };
    if exited {
        if p.child.is_some() {
            p.restarts += 1;
            p.ready = false;
            p.restarted = Some(Instant::now());
        }
        p.child = Some(spawn(config, name, &pod, &container, &ip, &p.claims)?);
        p.started = now();
    }
    let port = grpc_port(&container).unwrap_or(config.default_grpc_port);
    // A container that died is not Ready until its readiness probe passes on the probe's
    // period (a kubelet reports the dead container at once and probes the new one every
    // `periodSeconds`), so the Pod is seen not Ready for one period however fast the
    // process starts again.
    let period = Duration::from_secs(
        container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(10),
    );
    p.ready = p.restarted.is_none_or(|t| t.elapsed() >= period) && healthy(&ip, port).await;
    let ready = if p.ready { "True" } else { "False" };
    let status = serde_json::json!({
        "status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "hostIPs": [{ "ip": "127.0.0.1" }],
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "startTime": p.started,
            "conditions": [
                { "type": "PodScheduled", "status": "True" },
                { "type": "Initialized", "status": "True" },
                { "type": "ContainersReady", "status": ready },
                { "type": "Ready", "status": ready },
            ],
            "containerStatuses": [{
                "name": container.name,
                "image": container.image.clone().unwrap_or_default(),
                "imageID": "",
                "ready": p.ready,
                "started": true,
                "restartCount": p.restarts,
                "state": { "running": { "startedAt": p.started } },
            }],
        }
    });
    if p.last_status.as_ref() != Some(&status) {
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .context("writing the pod status")?;
        p.last_status = Some(status);
    }
    Ok(())
}

/// Binds a Pod to the node, as the scheduler would.
async fn bind(pods: &Api<Pod>, name: &str, node: &str) -> anyhow::Result<()> {
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.to_owned()),
            api_version: Some("v1".into()),
            ..ObjectReference::default()
        },
    };
    let _: serde_json::Value = pods
        .create_subresource("binding", name, &PostParams::default(), &binding)
        .await
        .context("binding the pod to the node")?;
    Ok(())
}

/// The gRPC port the readiness probe names, else a container port named `grpc`.
fn grpc_port(c: &Container) -> Option<u16> {
    let probe = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.grpc.as_ref())
        .and_then(|g| u16::try_from(g.port).ok());
    probe.or_else(|| {
        c.ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some("grpc"))
            .and_then(|p| u16::try_from(p.container_port).ok())
    })
}

async fn healthy(ip: &str, port: u16) -> bool {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{ip}:{port}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let resp = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(
            resp.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        )
    };
    tokio::time::timeout(Duration::from_millis(500), check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn terminate(c: &mut Child) {
    if let Some(pid) = c.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = c.kill().await;
}

/// For a Pod not seen before (or made again under its name), [`claim_uids`]; else nothing
/// (its process keeps the claims it was first given).
async fn new_pod_claims(
    pods: &Api<Pod>,
    config: &KubeletConfig,
    procs: &Mutex<BTreeMap<String, Proc>>,
    name: &str,
    uid: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> anyhow::Result<BTreeMap<String, String>> {
    if procs.lock().await.get(name).is_some_and(|p| p.uid == uid) {
        return Ok(BTreeMap::new());
    }
    claim_uids(pods, config, spec).await
}

/// The UID of the claim behind each volume of `spec` that names one (a StatefulSet's
/// `volumeClaimTemplates` become such volumes), by volume name.
async fn claim_uids(
    pods: &Api<Pod>,
    config: &KubeletConfig,
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> anyhow::Result<BTreeMap<String, String>> {
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(pods.clone().into_client(), &config.namespace);
    let mut out = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(claim) = &v.persistent_volume_claim {
            let pvc = claims
                .get(&claim.claim_name)
                .await
                .with_context(|| format!("volume claim {}", claim.claim_name))?;
            out.insert(v.name.clone(), pvc.metadata.uid.unwrap_or_default());
        }
    }
    Ok(out)
}

fn spawn(
    config: &KubeletConfig,
    name: &str,
    pod: &Pod,
    c: &Container,
    ip: &str,
    claims: &BTreeMap<String, String>,
) -> anyhow::Result<Child> {
    let image = c.image.clone().unwrap_or_default();
    let binary = config
        .images
        .get(&image)
        .with_context(|| format!("no local binary for image {image:?}"))?;
    let pod_dir = config.root.join(&config.namespace).join(name);
    let mounts: Vec<(String, PathBuf)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            // A claim's volume is its own directory: a new claim (the old one deleted) is
            // an empty volume, as a newly provisioned one is.
            let dir = match claims.get(&m.name) {
                Some(uid) => format!("{}-{uid}", m.name),
                None => m.name.clone(),
            };
            (m.mount_path.clone(), pod_dir.join("volumes").join(dir))
        })
        .collect();
    let rewrite = |s: &str| -> String {
        let mut s = s.replace("0.0.0.0", ip);
        for (mount, local) in &mounts {
            if s.starts_with(mount.as_str()) {
                s = format!("{}{}", local.display(), &s[mount.len()..]);
            }
        }
        s
    };
    let mut args: Vec<String> = c
        .command
        .iter()
        .flatten()
        .skip(1)
        .map(|a| rewrite(a))
        .collect();
    args.extend(c.args.iter().flatten().map(|a| rewrite(a)));
    for (_, local) in &mounts {
        std::fs::create_dir_all(local)?;
    }
    std::fs::create_dir_all(&pod_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pod_dir.join("container.log"))?;
    let meta = &pod.metadata;
    // Env first (each value may refer to the variables before it), then args.
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => expand(&rewrite(v), &vars),
            (None, Some(from)) => {
                let path = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                match path {
                    Some("metadata.name") => name.to_owned(),
                    Some("metadata.namespace") => meta.namespace.clone().unwrap_or_default(),
                    Some("status.podIP") => ip.to_owned(),
                    Some(p) => label_ref(p)
                        .and_then(|k| meta.labels.as_ref()?.get(k).cloned())
                        .unwrap_or_default(),
                    None => String::new(),
                }
            }
            (None, None) => String::new(),
        };
        vars.push((e.name.clone(), value));
    }
    let args: Vec<String> = args.iter().map(|a| expand(a, &vars)).collect();
    // The process sees the namespace's hosts file as /etc/hosts (see the module docs).
    // And dies with the test process, even one killed without running its destructors.
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "unshare"])
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(hosts_file(config))
        .arg(binary)
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    for (k, v) in &vars {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("starting {} for pod {name}", binary.display()))
}

/// `key` of a `metadata.labels['key']` field path.
fn label_ref(path: &str) -> Option<&str> {
    path.strip_prefix("metadata.labels['")?.strip_suffix("']")
}

/// `s` with every `$(NAME)` of a variable in `vars` replaced by its value; `$$(NAME)` stays
/// `$(NAME)` and unknown names stay as written (the kubelet's rules for args and env).
fn expand(s: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix("$(") {
            out.push_str("$(");
            rest = escaped;
            continue;
        }
        if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = vars.iter().rev().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
            continue;
        }
        out.push('$');
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The hosts file of the kubelet's namespace.
fn hosts_file(config: &KubeletConfig) -> PathBuf {
    config.root.join(&config.namespace).join("hosts")
}

/// Adds `pod` (its `hostname` and `subdomain`, as a StatefulSet sets them) at `ip` to the
/// namespace's hosts file, written in place so every process's bind mount sees it.
fn write_hosts(
    config: &KubeletConfig,
    pod: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    ip: &str,
) -> anyhow::Result<()> {
    let path = hosts_file(config);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    let host = spec.hostname.clone().unwrap_or_else(|| pod.to_owned());
    let ns = &config.namespace;
    let names = match &spec.subdomain {
        Some(sub) => format!(
            "{host}.{sub}.{ns}.svc.cluster.local {host}.{sub}.{ns}.svc {host}.{sub}.{ns} {host}.{sub}"
        ),
        None => host,
    };
    let line = format!("{ip} {names}");
    let mut lines: Vec<String> = current
        .lines()
        .filter(|l| !l.starts_with("127.0.0.1 localhost") && !l.starts_with(&format!("{ip} ")))
        .map(str::to_owned)
        .collect();
    lines.push(line);
    lines.sort();
    let mut text = String::from("127.0.0.1 localhost\n");
    for l in lines {
        text.push_str(&l);
        text.push('\n');
    }
    if text != current {
        // In place (truncate and write), never a rename: the bind mounts keep the inode.
        std::fs::write(&path, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand_as_the_kubelet_expands_them() {
        let vars = vec![
            ("POD_NAME".to_owned(), "weir-broker-1".to_owned()),
            ("NS".to_owned(), "shop".to_owned()),
        ];
        assert_eq!(
            expand("$(POD_NAME).weir-broker.$(NS).svc:7070", &vars),
            "weir-broker-1.weir-broker.shop.svc:7070"
        );
        assert_eq!(expand("$$(POD_NAME)", &vars), "$(POD_NAME)");
        assert_eq!(expand("$(MISSING) $5 $", &vars), "$(MISSING) $5 $");
        assert_eq!(
            label_ref("metadata.labels['apps.kubernetes.io/pod-index']"),
            Some("apps.kubernetes.io/pod-index")
        );
    }
}
