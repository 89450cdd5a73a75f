//! `tests/k8s/control-plane down` leaves no process and no listening port behind. Runs its
//! own control plane (own state directory and ports) so the shared one is untouched.

use std::{net::TcpStream, process::Command, time::Duration};

use weir_tests::k8s::{ControlPlane, script};

#[test]
fn down_stops_every_process_and_frees_every_port() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let state_dir = state.path().join("cp");
    let state_str = state_dir.to_string_lossy().into_owned();
    let env = [
        ("WEIR_K8S_STATE", state_str.as_str()),
        ("WEIR_K8S_PORT_BASE", "28000"),
    ];
    let cp = ControlPlane::up(&env)?;
    assert!(cp.kubectl(&["get", "namespaces"])?.contains("kube-system"));
    // Running it twice is harmless: it reuses what runs.
    let again = ControlPlane::up(&env)?;
    assert_eq!(again.kubeconfig, cp.kubeconfig);
    let pids: Vec<u32> = ["etcd", "kube-apiserver", "kube-controller-manager"]
        .iter()
        .map(|c| std::fs::read_to_string(state_dir.join(format!("{c}.pid"))))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()?;
    let out = Command::new(script()).arg("down").envs(env).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still runs"
        );
    }
    for port in [28379, 28380, 28443, 28257] {
        let addr = format!("127.0.0.1:{port}").parse()?;
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
            "port {port} still listens"
        );
    }
    assert!(!state_dir.exists(), "state directory left behind");
    Ok(())
}
