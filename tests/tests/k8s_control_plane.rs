//! The test control plane is real: versions, CRDs and custom resources, StatefulSets that
//! get Pods from the controller-manager, and garbage collection of dependents.

use std::time::{Duration, Instant};

use weir_tests::k8s::ControlPlane;

fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kubectl_and_the_server_report_the_pinned_version() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    let pinned = std::fs::read_to_string(weir_tests::k8s::script().with_file_name("versions.env"))?;
    let version = pinned
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .ok_or_else(|| anyhow::anyhow!("K8S_VERSION missing"))?;
    let out = cp.kubectl(&["version", "-o", "json"])?;
    let want = format!("\"gitVersion\": \"v{version}\"");
    assert_eq!(
        out.matches(&want).count(),
        2,
        "client and server are v{version}:\n{out}"
    );
    Ok(())
}

#[test]
fn a_crd_is_applied_and_its_custom_resources_are_served() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("crd")?;
    cp.apply(
        &ns,
        r"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.test.weir.dev
spec:
  group: test.weir.dev
  names: {kind: Gadget, plural: gadgets, singular: gadget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
",
    )?;
    cp.kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "crd/gadgets.test.weir.dev",
        "--timeout=30s",
    ])?;
    cp.apply(
        &ns,
        "apiVersion: test.weir.dev/v1\nkind: Gadget\nmetadata: {name: g1}\nspec: {size: 3}\n",
    )?;
    let got = cp.kubectl(&[
        "get",
        "gadgets",
        "-n",
        &ns,
        "g1",
        "-o",
        "jsonpath={.spec.size}",
    ])?;
    assert_eq!(got, "3");
    // The real API server validates against the schema.
    let bad = cp.run(
        "kubectl",
        &["apply", "-n", &ns, "-f", "-"],
        Some(
            b"apiVersion: test.weir.dev/v1\nkind: Gadget\nmetadata: {name: g2}\nspec: {size: 0}\n",
        ),
    )?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("should be greater than or equal to 1"));
    Ok(())
}

#[test]
fn a_statefulset_gets_pods_and_deleting_it_collects_them() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("sts")?;
    cp.apply(
        &ns,
        r"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: brokers}
spec:
  replicas: 3
  podManagementPolicy: Parallel
  serviceName: brokers
  selector: {matchLabels: {app: brokers}}
  template:
    metadata: {labels: {app: brokers}}
    spec:
      containers: [{name: broker, image: weir-broker}]
",
    )?;
    let pods = |cp: &ControlPlane| -> anyhow::Result<Vec<String>> {
        Ok(cp
            .kubectl(&["get", "pods", "-n", &ns, "-l", "app=brokers", "-o", "name"])?
            .lines()
            .map(str::to_owned)
            .collect())
    };
    eventually("three pods", Duration::from_secs(30), || {
        Ok(pods(cp)?.len() == 3)
    })?;
    let mut names = pods(cp)?;
    names.sort();
    assert_eq!(
        names,
        vec!["pod/brokers-0", "pod/brokers-1", "pod/brokers-2"]
    );
    let owner = cp.kubectl(&[
        "get",
        "pod",
        "-n",
        &ns,
        "brokers-0",
        "-o",
        "jsonpath={.metadata.ownerReferences[0].kind}",
    ])?;
    assert_eq!(owner, "StatefulSet");
    cp.kubectl(&["delete", "statefulset", "-n", &ns, "brokers", "--wait=true"])?;
    eventually("pods garbage-collected", Duration::from_secs(30), || {
        Ok(pods(cp)?.is_empty())
    })?;
    Ok(())
}
