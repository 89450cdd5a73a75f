//! The Helm chart against the real control plane: lint and render, install, the operator
//! running with exactly the chart's ServiceAccount and RBAC (a token for it, not the admin
//! credentials) reconciling a Topic, a permission it lacks refused, wrong values refused by
//! the schema, an upgrade that rolls the brokers, and uninstall.

#![allow(clippy::too_many_lines)]

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Context;
use weir_tests::{
    bin,
    helm::{chart, helm, ok, operator_from_deployment, repo, token_kubeconfig},
    k8s::ControlPlane,
    kubelet::{KubeletConfig, LoopbackKubelet},
    operator::{BROKER_IMAGE, Operator, install_crds, is_ready},
};

#[test]
fn the_chart_lints_renders_and_matches_the_crds_and_the_version() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    ok(
        helm(cp, &["lint", "--strict", &chart()])?,
        "helm lint --strict",
    )?;
    let defaults = ok(
        helm(cp, &["template", "weir", &chart(), "-n", "weir-system"])?,
        "helm template",
    )?;
    for kind in [
        "ServiceAccount",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(
            defaults.contains(&format!("kind: {kind}\n")),
            "default render has a {kind}"
        );
    }
    assert!(
        !defaults.contains("kind: ServiceMonitor") && !defaults.contains("kind: NetworkPolicy"),
        "optional objects are off by default"
    );
    let every = repo().join("tests/data/helm/every-option.yaml");
    let all = ok(
        helm(
            cp,
            &[
                "template",
                "weir",
                &chart(),
                "-n",
                "weir-system",
                "-f",
                &every.to_string_lossy(),
            ],
        )?,
        "helm template with every option",
    )?;
    for want in [
        "kind: ServiceMonitor",
        "kind: NetworkPolicy",
        "registry.example.com/weir-broker:9.9.8",
        "className: \"fast-ssd\"",
        "--namespace\n            - shop",
        "example.com/team: platform",
    ] {
        assert!(all.contains(want), "every-option render contains {want:?}");
    }
    assert!(
        !all.contains("kind: ClusterRole"),
        "a watched namespace gets namespaced RBAC only"
    );

    // The chart's CRDs are the generated ones, byte for byte.
    let chart_crds = std::fs::read_to_string(repo().join("helm/weir/crds/weir.dev.yaml"))?;
    let crds = std::fs::read_to_string(repo().join("crds/weir.dev.yaml"))?;
    assert!(
        chart_crds == crds,
        "helm/weir/crds/weir.dev.yaml differs from crds/weir.dev.yaml; copy it"
    );

    // version and appVersion follow the workspace version.
    let chart_yaml = std::fs::read_to_string(repo().join("helm/weir/Chart.yaml"))?;
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        chart_yaml.contains(&format!("\nversion: {version}\n")),
        "Chart.yaml version is {version}"
    );
    assert!(
        chart_yaml.contains(&format!("\nappVersion: \"{version}\"\n")),
        "Chart.yaml appVersion is {version}"
    );
    Ok(())
}

#[test]
fn wrong_values_fail_at_install_with_the_schemas_message() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("helm-bad")?;
    for (set, message) in [
        ("brokers.storage.size=-1Gi", "/brokers/storage/size"),
        (
            "brokers.replicaz=3",
            "additional properties 'replicaz' not allowed",
        ),
        ("operator.logFormat=xml", "/operator/logFormat"),
        ("brokers.minBrokers=0", "/brokers/minBrokers"),
    ] {
        let out = helm(cp, &["install", "bad", &chart(), "-n", &ns, "--set", set])?;
        assert!(!out.status.success(), "--set {set} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("values don't meet the specifications of the schema")
                && err.contains(message),
            "--set {set}: {err}"
        );
    }
    let releases = ok(helm(cp, &["list", "-n", &ns, "-q"])?, "helm list")?;
    assert!(releases.trim().is_empty(), "nothing installed: {releases}");
    Ok(())
}

async fn eventually<F: FnMut() -> anyhow::Result<bool>>(
    what: &str,
    mut check: F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check()? {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within 90 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_runs_the_operator_with_the_charts_rbac_upgrades_and_uninstalls()
-> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    install_crds(cp)?;
    let system = cp.namespace("helm-system")?;
    let apps = cp.namespace("helm-apps")?;
    let release = "weir";
    let chart = chart();
    let (repository, tag) = BROKER_IMAGE.split_once(':').context("image")?;
    let base = [
        "--set",
        &format!("operator.watchNamespace={apps}"),
        "--set",
        &format!("image.repository={repository}"),
        "--set",
        &format!("image.tag={tag}"),
        "--set",
        "operator.statusInterval=1s",
        "--set",
        "operator.leaseSeconds=4",
    ];
    let mut install = vec!["install", release, &chart, "-n", &system, "--wait=false"];
    install.extend(base);
    ok(helm(cp, &install)?, "helm install")?;

    // The operator, as the Deployment would run it, with a token of the chart's account.
    let dir = tempfile::tempdir()?;
    let token = cp.kubectl(&[
        "create",
        "token",
        release,
        "-n",
        &system,
        "--duration",
        "1h",
    ])?;
    let kubeconfig = token_kubeconfig(cp, token.trim(), dir.path())?;
    let (args, env, http) = operator_from_deployment(cp, &system, release, dir.path())?;
    let mut operator = Operator::start_with(kubeconfig.clone(), args, env, http)?;
    let kubelet_root = tempfile::tempdir()?;
    let kubelet = LoopbackKubelet::start(
        cp.client().await?,
        KubeletConfig {
            namespace: apps.clone(),
            selector: "app.kubernetes.io/name=weir,app.kubernetes.io/component=broker".into(),
            node: "loopback".into(),
            images: HashMap::from([(BROKER_IMAGE.to_owned(), bin("weir-broker"))]),
            root: kubelet_root.path().to_path_buf(),
            first_ip: 80,
            default_grpc_port: 7070,
        },
    )
    .await?;
    cp.apply(&apps, "apiVersion: weir.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders}\nspec: {partitions: 1}\n")?;
    let topic_ready = || -> anyhow::Result<bool> {
        let t: serde_json::Value = serde_json::from_str(
            &cp.kubectl(&["get", "topic", "orders", "-n", &apps, "-o", "json"])?,
        )?;
        Ok(is_ready(&t, "True"))
    };
    eventually("Topic Ready under the chart's RBAC", topic_ready)
        .await
        .with_context(|| operator.log_text())?;
    let sts_memory = || {
        cp.kubectl(&[
            "get",
            "statefulset",
            "weir-broker",
            "-n",
            &apps,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].resources.requests.memory}",
        ])
    };
    let sts = sts_memory()?;
    assert_eq!(
        sts, "256Mi",
        "the chart's broker settings reached the StatefulSet"
    );

    // What the account may not do is refused.
    let as_operator = |args: &[&str]| {
        let mut a = vec!["--kubeconfig", kubeconfig.to_str().unwrap_or_default()];
        a.extend_from_slice(args);
        cp.run("kubectl", &a, None)
    };
    let secrets = as_operator(&["get", "secrets", "-n", "kube-system"])?;
    assert!(
        !secrets.status.success() && String::from_utf8_lossy(&secrets.stderr).contains("forbidden"),
        "reading Secrets in another namespace is refused"
    );
    // It deletes the broker objects when the last Topic goes, never a broker Pod.
    let del = as_operator(&[
        "delete",
        "pod",
        "weir-broker-0",
        "-n",
        &apps,
        "--dry-run=server",
    ])?;
    assert!(
        !del.status.success() && String::from_utf8_lossy(&del.stderr).contains("forbidden"),
        "deleting a broker Pod is refused"
    );
    let other = as_operator(&["get", "topics", "-n", &system])?;
    assert!(
        !other.status.success(),
        "Topics outside the watched namespace are not readable"
    );

    // Upgrade with other broker resources: the operator rolls (the Deployment's checksum
    // changes), re-applies the StatefulSet, and the broker Pod is replaced.
    let checksum = |cp: &ControlPlane| {
        cp.kubectl(&[
            "get",
            "deployment",
            "weir-operator",
            "-n",
            &system,
            "-o",
            "jsonpath={.spec.template.metadata.annotations.weir\\.dev/broker-config-checksum}",
        ])
    };
    let before = checksum(cp)?;
    let pod_uid = |cp: &ControlPlane| {
        cp.kubectl(&[
            "get",
            "pod",
            "weir-broker-0",
            "-n",
            &apps,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
    };
    let old_pod = pod_uid(cp)?;
    let mut upgrade = vec![
        "upgrade",
        release,
        &chart,
        "-n",
        &system,
        "--wait=false",
        "--set",
        "brokers.resources.requests.memory=300Mi",
    ];
    upgrade.extend(base);
    ok(helm(cp, &upgrade)?, "helm upgrade")?;
    assert_ne!(
        checksum(cp)?,
        before,
        "the operator Pod template changes with the broker settings"
    );
    let (args, _, _) = operator_from_deployment(cp, &system, release, dir.path())?;
    operator.restart_with(
        args.into_iter()
            .map(|a| {
                if a.starts_with("127.0.0.1:") {
                    operator.http.clone()
                } else {
                    a
                }
            })
            .collect(),
    )?;
    eventually("StatefulSet template with 300Mi", || {
        Ok(sts_memory()? == "300Mi")
    })
    .await
    .with_context(|| operator.log_text())?;
    eventually(
        "broker Pod replaced by the rolling update and Ready",
        || {
            let uid = pod_uid(cp).unwrap_or_default();
            let ready = cp
                .kubectl(&[
                    "get",
                    "pod",
                    "weir-broker-0",
                    "-n",
                    &apps,
                    "-o",
                    r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
                ])
                .unwrap_or_default();
            Ok(!uid.is_empty() && uid != old_pod && ready == "True")
        },
    )
    .await?;
    eventually("Topic Ready after the roll", topic_ready).await?;

    // Uninstall removes what the chart installed; the CRDs stay, as Helm does.
    operator.kill();
    ok(
        helm(cp, &["uninstall", release, "-n", &system, "--wait"])?,
        "helm uninstall",
    )?;
    for (kind, name) in [
        ("deployment", "weir-operator"),
        ("serviceaccount", "weir"),
        ("configmap", "weir-brokers"),
        ("role", "weir-leader-election"),
        ("service", "weir-operator"),
    ] {
        let out = cp.run("kubectl", &["get", kind, name, "-n", &system], None)?;
        assert!(
            !out.status.success(),
            "{kind}/{name} is gone after uninstall"
        );
    }
    let out = cp.run("kubectl", &["get", "role", "weir", "-n", &apps], None)?;
    assert!(
        !out.status.success(),
        "the Role in the watched namespace is gone"
    );
    cp.kubectl(&["get", "crd", "topics.weir.dev", "consumergroups.weir.dev"])?;
    kubelet.stop().await;
    Ok(())
}
