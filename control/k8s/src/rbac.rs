//! The permissions this crate's calls need: the source of the Helm chart's Role.
//!
//! Discovery (`/api`, `/apis`) needs none: every authenticated user may read it
//! (`system:discovery`).

use k8s_openapi::api::rbac::v1::PolicyRule;

/// One rule of the Role, with the call that needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// Only for the leader Lease (`resourceNames: [<--lease-name>]`), not every Lease in the
    /// namespace, which other controllers' leader elections may share.
    pub only_the_lease: bool,
    /// Which call needs it, for the chart's comments.
    pub why: &'static str,
}

/// Everything flyball's control service does to the API, namespace-scoped.
pub const RULES: &[Rule] = &[
    Rule {
        api_group: "apps",
        resources: &["deployments/scale", "statefulsets/scale"],
        verbs: &["get", "patch"],
        only_the_lease: false,
        why: "ScaleClient::get_scale and set_replicas",
    },
    Rule {
        api_group: "apps",
        resources: &["deployments", "statefulsets"],
        verbs: &["get"],
        only_the_lease: false,
        why: "ScaleClient::get_scale reads status.readyReplicas from the workload",
    },
    Rule {
        api_group: "leaderworkerset.x-k8s.io",
        resources: &["leaderworkersets/scale"],
        verbs: &["get", "patch"],
        only_the_lease: false,
        why: "ScaleClient on LeaderWorkerSet pools",
    },
    Rule {
        api_group: "leaderworkerset.x-k8s.io",
        resources: &["leaderworkersets"],
        verbs: &["get"],
        only_the_lease: false,
        why: "ScaleClient::get_scale reads status.readyReplicas from the LeaderWorkerSet",
    },
    Rule {
        api_group: "autoscaling",
        resources: &["horizontalpodautoscalers"],
        verbs: &["list"],
        only_the_lease: false,
        why: "ScaleClient::conflicting_hpas",
    },
    Rule {
        api_group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["create"],
        only_the_lease: false,
        why: "LeaderElection creates the Lease when it is missing (a create names no object, so it cannot be limited to the one)",
    },
    Rule {
        api_group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["get", "patch"],
        only_the_lease: true,
        why: "LeaderElection (kube-lease-manager: get, apply and strategic patches), on its own Lease only",
    },
    Rule {
        api_group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
        only_the_lease: false,
        why: "ScaleEvents (patch when a repeat becomes a series)",
    },
    Rule {
        api_group: "flyball.dev",
        resources: &["flyballautoscalers"],
        verbs: &["get", "list", "watch"],
        only_the_lease: false,
        why: "reading the autoscalers",
    },
    Rule {
        api_group: "flyball.dev",
        resources: &["flyballautoscalers/status"],
        verbs: &["patch"],
        only_the_lease: false,
        why: "status::patch_status",
    },
];

/// [`RULES`] as RBAC `PolicyRule`s, ready to render into a Role, for the leader Lease named
/// `lease_name`.
pub fn policy_rules(lease_name: &str) -> Vec<PolicyRule> {
    RULES
        .iter()
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.api_group.to_string()]),
            resources: Some(r.resources.iter().map(|s| s.to_string()).collect()),
            verbs: r.verbs.iter().map(|s| s.to_string()).collect(),
            resource_names: r.only_the_lease.then(|| vec![lease_name.to_string()]),
            ..PolicyRule::default()
        })
        .collect()
}
