//! The loopback kubelet runs a StatefulSet of real broker processes: each on its own
//! 127.0.0.x, Ready from gRPC health, restarted after SIGKILL with the restart count going
//! up, and stopped when the StatefulSet is scaled down or deleted.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use weir_client::TopicConfig;
use weir_tests::{
    bin,
    k8s::ControlPlane,
    kubelet::{KubeletConfig, LoopbackKubelet},
};

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const STATEFULSET: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: brokers}
spec:
  replicas: 3
  serviceName: brokers
  selector: {matchLabels: {app: weir-broker}}
  template:
    metadata: {labels: {app: weir-broker}}
    spec:
      containers:
      - name: broker
        image: weir-broker
        args: ["--data-dir", "/var/lib/weir", "--listen", "0.0.0.0:7070", "--http-listen", "0.0.0.0:7071", "--log-format", "json"]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        ports: [{name: grpc, containerPort: 7070}]
        readinessProbe: {grpc: {port: 7070}}
        volumeMounts: [{name: data, mountPath: /var/lib/weir}]
      volumes: [{name: data, emptyDir: {}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_of_brokers_runs_restarts_and_stops_as_local_processes() -> anyhow::Result<()>
{
    let cp = ControlPlane::shared();
    let ns = cp.namespace("kubelet")?;
    let root = tempfile::tempdir()?;
    let kubelet = LoopbackKubelet::start(
        cp.client().await?,
        KubeletConfig {
            namespace: ns.clone(),
            selector: "app=weir-broker".into(),
            node: "loopback".into(),
            images: HashMap::from([("weir-broker".to_owned(), bin("weir-broker"))]),
            root: root.path().to_path_buf(),
            first_ip: 20,
            default_grpc_port: 7070,
        },
    )
    .await?;
    cp.apply(&ns, STATEFULSET)?;
    let ready = |cp: &ControlPlane, ns: &str| -> anyhow::Result<Vec<String>> {
        let out = cp.kubectl(&[
            "get", "pods", "-n", ns, "-l", "app=weir-broker", "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
        ])?;
        Ok(out
            .lines()
            .filter(|l| l.ends_with("=True"))
            .map(|l| l.trim_end_matches("=True").to_owned())
            .collect())
    };
    // OrderedReady: brokers-1 is only created once brokers-0 is Ready, and so on.
    eventually("three Ready brokers", Duration::from_secs(90), || async {
        Ok(ready(cp, &ns)?.len() == 3)
    })
    .await?;

    // Each on its own loopback address, the same port, a real broker behind it.
    let mut ips = Vec::new();
    for i in 0..3 {
        let pod = format!("brokers-{i}");
        let ip = cp.kubectl(&[
            "get",
            "pod",
            "-n",
            &ns,
            &pod,
            "-o",
            "jsonpath={.status.podIP}",
        ])?;
        assert_eq!(Some(ip.clone()), kubelet.ip(&pod).await);
        let client = weir_client::Client::connect(&format!("http://{ip}:7070")).await?;
        client
            .create_topic(&format!("on-{i}"), &TopicConfig::new(1))
            .await?;
        let topics = client.list_topics().await?;
        assert_eq!(topics.len(), 1, "each broker has its own data directory");
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "distinct pod IPs");

    // SIGKILL one: the kubelet restarts it, the restart count goes up, Ready again, data kept.
    let pid = kubelet
        .pid("brokers-1")
        .await
        .ok_or_else(|| anyhow::anyhow!("no process"))?;
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    eventually("restart count 1", Duration::from_secs(30), || async {
        let n = cp.kubectl(&[
            "get",
            "pod",
            "-n",
            &ns,
            "brokers-1",
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ])?;
        Ok(n == "1")
    })
    .await?;
    eventually("brokers-1 Ready again", Duration::from_secs(30), || async {
        Ok(ready(cp, &ns)?.contains(&"brokers-1".to_owned()))
    })
    .await?;
    assert_ne!(kubelet.pid("brokers-1").await, Some(pid));
    let ip1 = kubelet.ip("brokers-1").await.unwrap_or_default();
    let client = weir_client::Client::connect(&format!("http://{ip1}:7070")).await?;
    assert_eq!(
        client.list_topics().await?[0].name,
        "on-1",
        "the volume outlives the restart"
    );

    // Scale down: brokers-2 and brokers-1 go, their processes stop.
    cp.kubectl(&["scale", "statefulset", "-n", &ns, "brokers", "--replicas=1"])?;
    eventually("one process left", Duration::from_secs(60), || async {
        Ok(kubelet.running().await == vec!["brokers-0".to_owned()])
    })
    .await?;
    // Delete: the last one stops too.
    cp.kubectl(&["delete", "statefulset", "-n", &ns, "brokers"])?;
    eventually("no process left", Duration::from_secs(60), || async {
        Ok(kubelet.running().await.is_empty())
    })
    .await?;
    kubelet.stop().await;
    Ok(())
}
