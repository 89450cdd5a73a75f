//! The Helm chart from the tests: `helm` of the control plane, and the operator run the way
//! the chart's Deployment runs it (its args and broker settings, with a token of the chart's
//! ServiceAccount instead of the admin credentials), as a local process.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::{
    k8s::ControlPlane,
    operator::{BROKER_IMAGE, Operator, free_port},
};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of the chart, `helm/weir`.
pub fn chart() -> String {
    repo()
        .join("helm")
        .join("weir")
        .to_string_lossy()
        .into_owned()
}

/// Runs the control plane's pinned `helm` with its kubeconfig.
pub fn helm(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<std::process::Output> {
    cp.run("helm", args, None)
}

/// The stdout of a command that must have succeeded; otherwise an error with its output.
pub fn ok(out: std::process::Output, what: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A kubeconfig for the control plane that authenticates with `token`.
pub fn token_kubeconfig(cp: &ControlPlane, token: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let server = cp.kubectl(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ])?;
    let ca = cp.kubectl(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ])?;
    let ca_line = if ca.is_empty() {
        let path = cp.kubectl(&[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority}",
        ])?;
        format!("certificate-authority: {path}")
    } else {
        format!("certificate-authority-data: {ca}")
    };
    let path = dir.join("operator.kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    {ca_line}\nusers:\n- name: operator\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: operator}}\ncurrent-context: c\n"
        ),
    )?;
    Ok(path)
}

/// Arguments, environment and HTTP address of an operator process.
pub type OperatorCommand = (Vec<String>, Vec<(String, String)>, String);

/// The operator's command line from the installed Deployment, with its config file, HTTP
/// port and environment mapped to this machine.
pub fn operator_from_deployment(
    cp: &ControlPlane,
    ns: &str,
    release: &str,
    dir: &Path,
) -> anyhow::Result<OperatorCommand> {
    let deploy: serde_json::Value = serde_json::from_str(&cp.kubectl(&[
        "get",
        "deployment",
        &format!("{release}-operator"),
        "-n",
        ns,
        "-o",
        "json",
    ])?)?;
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    let config = cp.kubectl(&[
        "get",
        "configmap",
        &format!("{release}-brokers"),
        "-n",
        ns,
        "-o",
        "jsonpath={.data.brokers\\.yaml}",
    ])?;
    let config_path = dir.join("brokers.yaml");
    std::fs::write(&config_path, config)?;
    let http = format!("127.0.0.1:{}", free_port()?);
    let args: Vec<String> = container["args"]
        .as_array()
        .context("args")?
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap_or_default();
            if a == "/etc/weir/brokers.yaml" {
                config_path.to_string_lossy().into_owned()
            } else if a.starts_with("0.0.0.0:") {
                http.clone()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let env = vec![
        ("POD_NAMESPACE".to_owned(), ns.to_owned()),
        ("POD_NAME".to_owned(), format!("{release}-operator-local")),
    ];
    Ok((args, env, http))
}

/// `helm install RELEASE helm/weir` into `system`, watching `apps`, with the test broker
/// image and short intervals (plus `sets`, each `key=value`); then the operator as its
/// Deployment would run, with a token of the chart's ServiceAccount. Returns the operator
/// and the directory holding its kubeconfig and broker config (keep it while it runs).
pub fn install(
    cp: &ControlPlane,
    system: &str,
    apps: &str,
    release: &str,
    sets: &[&str],
) -> anyhow::Result<(Operator, Option<tempfile::TempDir>)> {
    let chart = chart();
    let (repository, tag) = BROKER_IMAGE.split_once(':').context("image")?;
    let watch = format!("operator.watchNamespace={apps}");
    let repo = format!("image.repository={repository}");
    let tag = format!("image.tag={tag}");
    let mut args = vec!["install", release, &chart, "-n", system, "--wait=false"];
    for set in [
        watch.as_str(),
        repo.as_str(),
        tag.as_str(),
        "operator.statusInterval=1s",
        "operator.leaseSeconds=4",
    ]
    .into_iter()
    .chain(sets.iter().copied())
    {
        args.extend(["--set", set]);
    }
    ok(helm(cp, &args)?, "helm install")?;
    let dir = tempfile::tempdir()?;
    let token = cp.kubectl(&["create", "token", release, "-n", system, "--duration", "1h"])?;
    let kubeconfig = token_kubeconfig(cp, token.trim(), dir.path())?;
    let (args, env, http) = operator_from_deployment(cp, system, release, dir.path())?;
    Ok((
        Operator::start_with(kubeconfig, args, env, http)?,
        Some(dir),
    ))
}
