//! Pure builders of the Kubernetes objects the operator applies for a namespace's brokers,
//! and how many brokers there are. Where partitions go is the cluster's business (its
//! controller places them; `docs/cluster.md`).
//!
//! Nothing here talks to the API server: each function takes settings and returns an object,
//! so every shape is unit-tested on its own (the pipeline of stackabletech's operators:
//! dereference → validate → build → apply → status).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec},
        core::v1::{
            Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, GRPCAction,
            ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
            PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
            SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, Toleration,
            VolumeMount, VolumeResourceRequirements,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

/// Name of the broker StatefulSet, its headless Service and its PodDisruptionBudget.
pub const BROKERS: &str = "weir-broker";
/// Name of the client Service.
pub const CLIENT_SERVICE: &str = "weir";
/// gRPC port of a broker.
pub const GRPC_PORT: i32 = 7070;
/// HTTP port of a broker (metrics, health).
pub const HTTP_PORT: i32 = 7071;
/// Mount path of a broker's data volume.
pub const DATA_DIR: &str = "/var/lib/weir";

/// Settings for the brokers of a namespace (from the operator's flags and its broker config
/// file, which the chart renders from its values).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BrokerSettings {
    /// Container image of the broker.
    pub image: String,
    /// Image pull policy; the cluster default when `None`.
    pub image_pull_policy: Option<String>,
    /// Broker Pods.
    pub replicas: i32,
    /// Size of each broker's volume, e.g. `10Gi`.
    pub storage_size: String,
    /// Storage class of the volumes; the cluster default when `None`.
    pub storage_class: Option<String>,
    /// Container resources.
    pub resources: Option<ResourceRequirements>,
    /// Pod security context; [`default_pod_security`] when `None`.
    pub pod_security_context: Option<PodSecurityContext>,
    /// Container security context; [`default_container_security`] when `None`.
    pub security_context: Option<SecurityContext>,
    /// Tolerations of the broker Pods.
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of the broker Pods.
    pub affinity: Option<Affinity>,
    /// Node selector of the broker Pods.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Extra environment of the broker container, after the operator's own (every broker
    /// flag has a `WEIR_…` variable, e.g. `WEIR_REPLICA_LAG_MAX`).
    pub env: Option<Vec<EnvVar>>,
}

/// The broker config file (`--broker-config`, YAML, camelCase): every field optional; a field
/// that is set replaces what the flags gave. Unknown fields are refused, so a typo is an
/// error at start-up rather than a setting silently ignored.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerConfigFile {
    /// Container image.
    pub image: Option<String>,
    /// Image pull policy (`Always`, `IfNotPresent`, `Never`).
    pub image_pull_policy: Option<String>,
    /// Fewest brokers in a namespace with Topics.
    pub min_brokers: Option<i32>,
    /// Most brokers a namespace is sized to.
    pub max_brokers: Option<i32>,
    /// Volume of each broker.
    pub storage: Option<StorageConfig>,
    /// Container resources.
    pub resources: Option<ResourceRequirements>,
    /// Pod security context.
    pub pod_security_context: Option<PodSecurityContext>,
    /// Container security context.
    pub security_context: Option<SecurityContext>,
    /// Tolerations.
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity.
    pub affinity: Option<Affinity>,
    /// Node selector.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Extra environment variables of the broker container.
    pub env: Option<Vec<EnvVar>>,
}

/// Volume settings in the broker config file.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageConfig {
    /// Size, a Kubernetes quantity such as `10Gi`.
    pub size: Option<String>,
    /// Storage class; empty or absent for the cluster default.
    pub class_name: Option<String>,
}

impl BrokerConfigFile {
    /// Lays the file's settings over `s` (and the broker bounds `min`, `max`).
    pub fn apply(self, s: &mut BrokerSettings, min: &mut i32, max: &mut i32) {
        fn set<T>(dst: &mut Option<T>, src: Option<T>) {
            if src.is_some() {
                *dst = src;
            }
        }
        if let Some(image) = self.image.filter(|i| !i.is_empty()) {
            s.image = image;
        }
        set(
            &mut s.image_pull_policy,
            self.image_pull_policy.filter(|p| !p.is_empty()),
        );
        if let Some(n) = self.min_brokers {
            *min = n;
        }
        if let Some(n) = self.max_brokers {
            *max = n;
        }
        if let Some(st) = self.storage {
            if let Some(size) = st.size.filter(|v| !v.is_empty()) {
                s.storage_size = size;
            }
            if let Some(class) = st.class_name {
                s.storage_class = Some(class).filter(|c| !c.is_empty());
            }
        }
        set(&mut s.resources, self.resources);
        set(&mut s.pod_security_context, self.pod_security_context);
        set(&mut s.security_context, self.security_context);
        set(&mut s.tolerations, self.tolerations);
        set(&mut s.affinity, self.affinity);
        set(&mut s.node_selector, self.node_selector);
        set(&mut s.env, self.env);
    }
}

/// UID and GID the broker runs as by default (distroless's `nonroot`).
pub const NONROOT: i64 = 65532;

/// The broker Pod's security context unless configured: non-root (UID/GID 65532, the
/// volume group-owned by it) with the runtime's default seccomp profile (Pod Security
/// Standards, "restricted").
pub fn default_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NONROOT),
        run_as_group: Some(NONROOT),
        fs_group: Some(NONROOT),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// The broker container's security context unless configured: no privilege escalation, a
/// read-only root filesystem (the broker writes only to its volume), every capability
/// dropped.
pub fn default_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Labels of every broker object.
pub fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "weir".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "broker".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "weir-operator".to_owned(),
        ),
    ])
}

/// Labels that select broker Pods.
pub fn selector() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "weir".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "broker".to_owned(),
        ),
    ])
}

/// [`selector`] as a label selector string (`k=v,k=v`), for lists and watches.
pub fn selector_string() -> String {
    selector()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels()),
        ..ObjectMeta::default()
    }
}

/// An env var from a field of the Pod (the downward API).
fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The stable name of broker `ordinal` in the namespace of variable `$(POD_NAMESPACE)`,
/// through the headless Service, with the gRPC port.
fn broker_dns(pod: &str) -> String {
    format!("{pod}.{BROKERS}.$(POD_NAMESPACE).svc:{GRPC_PORT}")
}

/// The broker container: args, env, ports, gRPC probes, the data volume, resources and
/// security context. Every Pod gets the same arguments (`docs/cluster.md`, "Kubernetes"):
/// its id is its ordinal (the `apps.kubernetes.io/pod-index` label the StatefulSet
/// controller sets, Kubernetes 1.28+), it advertises its stable name, and `--peers` names
/// broker 0 only: the others join the metadata group it started, so growing the
/// StatefulSet changes no Pod's arguments.
fn broker_container(s: &BrokerSettings) -> Container {
    Container {
        name: "broker".into(),
        image: Some(s.image.clone()),
        args: Some(vec![
            "--data-dir".into(),
            DATA_DIR.into(),
            "--listen".into(),
            format!("0.0.0.0:{GRPC_PORT}"),
            "--http-listen".into(),
            format!("0.0.0.0:{HTTP_PORT}"),
            "--log-format".into(),
            "json".into(),
            "--advertise".into(),
            broker_dns("$(POD_NAME)"),
            "--peers".into(),
            format!("0={}", broker_dns(&broker_name(0))),
        ]),
        env: Some(
            [
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env(
                    "WEIR_NODE_ID",
                    "metadata.labels['apps.kubernetes.io/pod-index']",
                ),
            ]
            .into_iter()
            .chain(s.env.iter().flatten().cloned())
            .collect(),
        ),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(grpc_probe(5)),
        liveness_probe: Some(grpc_probe(10)),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        }]),
        resources: s.resources.clone(),
        image_pull_policy: s.image_pull_policy.clone(),
        security_context: Some(
            s.security_context
                .clone()
                .unwrap_or_else(default_container_security),
        ),
        ..Container::default()
    }
}

/// The broker StatefulSet: one broker per Pod, each with its own volume (volume claim
/// template `data`), stable names through the headless Service, gRPC readiness and liveness
/// probes on the health service, and `Parallel` Pod management: brokers start together and
/// those beyond broker 0 join the metadata group once it is up.
pub fn statefulset(namespace: &str, s: &BrokerSettings) -> StatefulSet {
    let container = broker_container(s);
    StatefulSet {
        metadata: meta(BROKERS, namespace),
        spec: StatefulSetSpec {
            replicas: Some(s.replicas),
            service_name: Some(BROKERS.into()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(
                        s.pod_security_context
                            .clone()
                            .unwrap_or_else(default_pod_security),
                    ),
                    tolerations: s.tolerations.clone(),
                    affinity: s.affinity.clone(),
                    node_selector: s.node_selector.clone(),
                    // Brokers do not call the Kubernetes API.
                    automount_service_account_token: Some(false),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(DATA_CLAIM.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: s.storage_class.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_owned(),
                            Quantity(s.storage_size.clone()),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

fn grpc_probe(period: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port: GRPC_PORT,
            ..GRPCAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    }
}

/// The headless Service that gives each broker Pod a stable DNS name
/// (`weir-broker-0.weir-broker.<namespace>.svc`); it publishes not-ready addresses so
/// brokers can be reached while they start.
pub fn headless_service(namespace: &str) -> Service {
    Service {
        metadata: meta(BROKERS, namespace),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector()),
            ports: Some(ports()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The client Service (`weir.<namespace>.svc:7070`) in front of the Ready brokers.
pub fn client_service(namespace: &str) -> Service {
    Service {
        metadata: meta(CLIENT_SERVICE, namespace),
        spec: Some(ServiceSpec {
            selector: Some(selector()),
            ports: Some(ports()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn ports() -> Vec<ServicePort> {
    vec![
        ServicePort {
            name: Some("grpc".into()),
            port: GRPC_PORT,
            target_port: Some(IntOrString::String("grpc".into())),
            ..ServicePort::default()
        },
        ServicePort {
            name: Some("http".into()),
            port: HTTP_PORT,
            target_port: Some(IntOrString::String("http".into())),
            ..ServicePort::default()
        },
    ]
}

/// At most one broker down at a time for voluntary disruptions (drains, upgrades).
pub fn pod_disruption_budget(namespace: &str) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(BROKERS, namespace),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// Name of the broker Pod with `ordinal` (a StatefulSet names its Pods `<name>-<ordinal>`).
pub fn broker_name(ordinal: i32) -> String {
    format!("{BROKERS}-{ordinal}")
}

/// Name of the brokers' volume claim template.
pub const DATA_CLAIM: &str = "data";

/// The volume claim of the broker with ordinal `ordinal` (the StatefulSet's naming,
/// `<template>-<pod>`): `data-weir-broker-2`.
pub fn data_claim(ordinal: i32) -> String {
    format!("{DATA_CLAIM}-{}", broker_name(ordinal))
}

/// The ordinal of broker Pod `name`, if it is one.
pub fn broker_ordinal(name: &str) -> Option<i32> {
    name.strip_prefix(BROKERS)?.strip_prefix('-')?.parse().ok()
}

/// Brokers wanted for Topics with these `partitions`: as many as the widest Topic has
/// partitions, between `min` and `max` (at least 1); 0 without Topics.
pub fn broker_count(partitions: &[u32], min: i32, max: i32) -> i32 {
    let Some(widest) = partitions.iter().copied().max() else {
        return 0;
    };
    i32::try_from(widest)
        .unwrap_or(i32::MAX)
        .clamp(min.max(1), max.max(min).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_count_follows_the_widest_topic_within_bounds() {
        assert_eq!(broker_count(&[], 1, 3), 0, "no topic, no broker");
        assert_eq!(broker_count(&[4], 1, 3), 3);
        assert_eq!(broker_count(&[1, 2], 1, 3), 2);
        assert_eq!(broker_count(&[1], 2, 3), 2, "the minimum holds");
        assert_eq!(broker_ordinal("weir-broker-12"), Some(12));
        assert_eq!(broker_ordinal("weir-brokers-1"), None);
    }

    #[test]
    fn statefulset_runs_brokers_on_their_own_volumes_with_grpc_probes() {
        let s = statefulset(
            "shop",
            &BrokerSettings {
                image: "ghcr.io/weir-dev/weir:0.1.0".into(),
                replicas: 3,
                storage_size: "10Gi".into(),
                storage_class: Some("fast".into()),
                ..BrokerSettings::default()
            },
        );
        let spec = s.spec;
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some(BROKERS));
        let c = &spec.template.spec.clone().expect("pod spec").containers[0];
        let args = c.args.clone().unwrap_or_default();
        assert!(args.windows(2).any(|w| w == ["--data-dir", DATA_DIR]));
        assert!(args.windows(2).any(|w| w == ["--listen", "0.0.0.0:7070"]));
        assert!(args.windows(2).any(|w| w
            == [
                "--advertise",
                "$(POD_NAME).weir-broker.$(POD_NAMESPACE).svc:7070"
            ]));
        assert!(args.windows(2).any(|w| w
            == [
                "--peers",
                "0=weir-broker-0.weir-broker.$(POD_NAMESPACE).svc:7070"
            ]));
        let env: Vec<String> = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone())
            .collect();
        assert!(env.contains(&"metadata.labels['apps.kubernetes.io/pod-index']".to_owned()));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .and_then(|p| p.grpc.as_ref())
                .map(|g| g.port),
            Some(GRPC_PORT)
        );
        let sc = c.security_context.clone().expect("container security");
        assert_eq!(
            (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
            (Some(true), Some(false)),
            "secure by default"
        );
        let pod = spec.template.spec.clone().expect("pod spec");
        let psc = pod.security_context.expect("pod security");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.map(|p| p.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let claim = &spec.volume_claim_templates.expect("claims")[0];
        let claim_spec = claim.spec.as_ref().expect("claim spec");
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim_spec
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage")),
            Some(&Quantity("10Gi".into()))
        );
        assert_eq!(spec.selector.match_labels, Some(selector()));
        assert!(labels().iter().all(|(k, v)| {
            spec.template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.as_ref())
                .and_then(|l| l.get(k))
                == Some(v)
        }));
    }

    #[test]
    fn the_broker_config_file_overrides_the_flags() {
        let file: BrokerConfigFile = serde_yaml::from_str(
            "image: weir:2\nminBrokers: 2\nstorage: {size: 50Gi, className: ''}\n\
             resources: {requests: {memory: 1Gi}}\ntolerations: [{key: dedicated, operator: Exists}]\n\
             env: [{name: WEIR_REPLICA_LAG_MAX, value: 30s}]\n",
        )
        .expect("parses");
        let mut s = BrokerSettings {
            image: "weir:1".into(),
            storage_size: "10Gi".into(),
            storage_class: Some("fast".into()),
            ..BrokerSettings::default()
        };
        let (mut min, mut max) = (1, 3);
        file.apply(&mut s, &mut min, &mut max);
        assert_eq!((s.image.as_str(), min, max), ("weir:2", 2, 3));
        assert_eq!(
            (s.storage_size.as_str(), s.storage_class.as_deref()),
            ("50Gi", None)
        );
        assert!(s.resources.is_some() && s.tolerations.is_some());
        // Extra environment follows the operator's own variables in the container.
        let sts = statefulset("ns", &s);
        let env: Vec<(String, Option<String>)> = sts
            .spec
            .template
            .spec
            .map(|p| p.containers[0].env.clone().unwrap_or_default())
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value))
            .collect();
        assert_eq!(
            env.last(),
            Some(&("WEIR_REPLICA_LAG_MAX".to_owned(), Some("30s".to_owned())))
        );
        assert!(env.iter().any(|(n, _)| n == "WEIR_NODE_ID"));
        let typo = serde_yaml::from_str::<BrokerConfigFile>("minBroker: 2\n");
        assert!(
            typo.expect_err("unknown field")
                .to_string()
                .contains("minBroker"),
            "a typo is refused"
        );
    }

    #[test]
    fn services_and_budget_select_the_brokers() {
        let headless = headless_service("shop").spec.expect("spec");
        assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
        assert_eq!(headless.selector, Some(selector()));
        let client = client_service("shop").spec.expect("spec");
        assert_eq!(client.cluster_ip, None);
        assert_eq!(client.ports.expect("ports")[0].port, GRPC_PORT);
        let pdb = pod_disruption_budget("shop").spec.expect("spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    }
}
