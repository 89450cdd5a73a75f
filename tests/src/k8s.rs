//! The test control plane (`tests/k8s/control-plane`) from Rust: one per test run, started
//! (or reused) on first use, with a namespace per test.
//!
//! The control plane is left running when the test process ends, so the next test binary
//! reuses it; `.ci/run` stops it with `tests/k8s/control-plane down` at the end.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use anyhow::{Context, bail};

/// A running control plane: its admin kubeconfig and the directory of its binaries.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// Directory with `kubectl`, `helm`, `kube-apiserver`, … of the pinned versions.
    pub bin: PathBuf,
}

/// The `tests/k8s/control-plane` script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("k8s")
        .join("control-plane")
}

/// Parses the `export` lines of `control-plane up`.
pub fn parse_exports(stdout: &str) -> anyhow::Result<ControlPlane> {
    let mut kubeconfig = None;
    let mut bin = None;
    for line in stdout.lines() {
        if let Some(v) = line.strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(PathBuf::from(v));
        } else if let Some(v) = line.strip_prefix("export PATH=") {
            bin = v.split(':').next().map(PathBuf::from);
        }
    }
    Ok(ControlPlane {
        kubeconfig: kubeconfig.context("no KUBECONFIG export")?,
        bin: bin.context("no PATH export")?,
    })
}

impl ControlPlane {
    /// Starts (building the first time) or reuses the control plane of this machine.
    ///
    /// # Panics
    ///
    /// When it cannot start: the tests that need it fail, they never skip.
    pub fn shared() -> &'static ControlPlane {
        static CP: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        match CP.get_or_init(|| {
            Self::from_env()
                .map_or_else(|| Self::up(&[]), Ok)
                .map_err(|e| format!("{e:#}"))
        }) {
            Ok(cp) => cp,
            Err(e) => panic!("the test control plane did not start: {e}"),
        }
    }

    /// A real cluster instead of the local control plane: `WEIR_TEST_KUBECONFIG` names its
    /// kubeconfig, and `kubectl`/`helm` come from `WEIR_TEST_BIN` (default `/usr/local/bin`).
    fn from_env() -> Option<ControlPlane> {
        let kubeconfig = std::env::var_os("WEIR_TEST_KUBECONFIG")?;
        let bin = std::env::var_os("WEIR_TEST_BIN").unwrap_or_else(|| "/usr/local/bin".into());
        Some(ControlPlane {
            kubeconfig: kubeconfig.into(),
            bin: bin.into(),
        })
    }

    /// Runs `control-plane up` with extra environment; returns what it exported.
    pub fn up(env: &[(&str, &str)]) -> anyhow::Result<ControlPlane> {
        let out = Command::new(script())
            .arg("up")
            .envs(env.iter().copied())
            .output()
            .context("running tests/k8s/control-plane up")?;
        if !out.status.success() {
            bail!(
                "tests/k8s/control-plane up failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_exports(&String::from_utf8_lossy(&out.stdout))
    }

    /// Runs a binary of the control plane's bin directory (`kubectl`, `helm`) with this
    /// kubeconfig.
    pub fn run(&self, tool: &str, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
        use std::io::Write;
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if stdin.is_some() {
            cmd.stdin(std::process::Stdio::piped());
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {tool}"))?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(data)?;
        }
        Ok(child.wait_with_output()?)
    }

    /// `kubectl ARGS` that must succeed; returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run("kubectl", args, None)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `kubectl apply -f -` of `yaml` in `namespace`.
    pub fn apply(&self, namespace: &str, yaml: &str) -> anyhow::Result<String> {
        let out = self.run(
            "kubectl",
            &["apply", "-n", namespace, "-f", "-"],
            Some(yaml.as_bytes()),
        )?;
        if !out.status.success() {
            bail!(
                "kubectl apply failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A kube client for this control plane.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates a namespace named after `test` with a unique suffix, for one test.
    pub fn namespace(&self, test: &str) -> anyhow::Result<String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name: String = format!("{test}-{}-{n}", std::process::id())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(63)
            .collect();
        self.kubectl(&["create", "namespace", &name])?;
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_name_the_kubeconfig_and_the_bin_directory() {
        let cp = parse_exports("export KUBECONFIG=/s/admin.kubeconfig\nexport PATH=/c/bin:$PATH\n")
            .expect("parses");
        assert_eq!(cp.kubeconfig, PathBuf::from("/s/admin.kubeconfig"));
        assert_eq!(cp.bin, PathBuf::from("/c/bin"));
        assert!(parse_exports("nothing").is_err());
    }
}
