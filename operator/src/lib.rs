//! The Weir operator: `Topic` and `ConsumerGroup` resources (group `weir.dev`, version
//! `v1alpha1`) for the brokers of a namespace.
//!
//! # Layout
//!
//! - [`builders`]: pure builders of the broker StatefulSet, Services and PodDisruptionBudget,
//!   and partition placement.
//! - [`convert`]: resource specs → the broker admin API's settings (units parsed once).
//! - [`crd`]: the resource types; their schemas (bounds, enums, patterns, CEL rules) are what
//!   the API server validates. `weir-operator crds` prints them; `crds/` holds the output and
//!   a test fails when they differ.
//! - [`topic`], [`group`]: the reconcilers; [`context`]: what they share (broker Pods and
//!   connections, status and Events); [`run`]: controllers and leader election;
//!   [`metrics`]: Prometheus metrics and health endpoints.

pub mod builders;
pub mod context;
pub mod convert;
pub mod crd;
pub mod group;
pub mod metrics;
pub mod run;
pub mod topic;

use kube::CustomResourceExt;

/// Every CRD of the operator as one YAML stream (documents separated by `---`).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in [crd::Topic::crd(), crd::ConsumerGroup::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// `crds/weir.dev.yaml` is generated: it must be what `weir-operator crds` prints
    /// (regenerate with `cargo run -p weir-operator -- crds > crds/weir.dev.yaml`).
    #[test]
    fn checked_in_crds_match_the_types() {
        let generated = super::crds_yaml().expect("serializes");
        let checked_in = include_str!("../../crds/weir.dev.yaml");
        assert!(
            generated == checked_in,
            "crds/weir.dev.yaml is stale; run: cargo run -p weir-operator -- crds > crds/weir.dev.yaml"
        );
    }
}
