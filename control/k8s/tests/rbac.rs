//! `rbac::RULES` is what the code needs: every call this crate makes succeeds under exactly
//! those rules, and removing a rule breaks a call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use flyball_apiserver::{ApiServer, RbacRule, ResourceType, TestCluster};
use flyball_k8s::rbac::{RULES, Rule};
use flyball_k8s::{
    Error, FlyballAutoscaler, FlyballAutoscalerStatus, LeaderElection, LeaseConfig, ScaleClient,
    ScaleEvents, ScaleTargetRef, patch_status,
};
use kube::CustomResourceExt;
use kube::core::Resource;
use serde_json::json;
use support::WAIT;

/// The Lease every call below elects on.
const LEASE: &str = "flyball";

/// `rules` as the fake's RBAC, for the leader Lease `lease`.
fn as_fake_rules(rules: &[Rule], lease: &str) -> Vec<RbacRule> {
    rules
        .iter()
        .map(|r| {
            let rule = RbacRule::new(r.api_group, r.resources, r.verbs);
            if r.only_the_lease {
                rule.named(&[lease])
            } else {
                rule
            }
        })
        .collect()
}

/// The calls the fake answered 403, as `METHOD path`.
fn refused_calls(fake: &ApiServer) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| r.status == Some(403))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// Seed what the calls touch, bypassing RBAC as an installer with more rights would.
fn seed(fake: &ApiServer) {
    fake.register(ResourceType::leader_worker_set());
    fake.seed(serde_json::to_value(FlyballAutoscaler::crd()).unwrap())
        .unwrap();
    fake.seed_deployment("default", "unified", 1, 1).unwrap();
    fake.seed_statefulset("default", "prefill", 1, 1).unwrap();
    fake.seed(json!({
        "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
        "metadata": {"name": "decode", "namespace": "default"},
        "spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 1}
    }))
    .unwrap();
    fake.seed(json!({
        "apiVersion": "flyball.dev/v1alpha1", "kind": "FlyballAutoscaler",
        "metadata": {"name": "llama", "namespace": "default"},
        "spec": {
            "selector": {"model": "llama"},
            "pools": {"unified": {"scaleTargetRef": {"name": "unified"}, "maxReplicas": 4}},
            "slo": {"ttft": "500ms"}
        }
    }))
    .unwrap();
}

/// Every call of this crate, once.
async fn every_call(client: kube::Client) -> Result<(), Error> {
    let scales = ScaleClient::new(client.clone());
    for (api_version, kind, name) in [
        ("apps/v1", "Deployment", "unified"),
        ("apps/v1", "StatefulSet", "prefill"),
        ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "decode"),
    ] {
        let target = ScaleTargetRef::new(api_version, kind, "default", name);
        scales.get_scale(&target).await?;
        scales.set_replicas(&target, 2).await?;
        scales.conflicting_hpas(&target).await?;
    }

    let election =
        LeaderElection::start(client.clone(), &LeaseConfig::new("default", LEASE, "pod-0")).await?;
    let mut leading = election.is_leader();
    tokio::time::timeout(WAIT, leading.wait_for(|l| *l))
        .await
        .expect("leads on a fresh lease")
        .expect("election alive");
    election.step_down().await?;

    let fba = kube::Api::<FlyballAutoscaler>::namespaced(client.clone(), "default");
    let fba = fba.get("llama").await.map_err(|e| Error::Api {
        target: "FlyballAutoscaler default/llama".into(),
        source: e,
    })?;
    let events = ScaleEvents::new(client.clone(), "pod-0");
    let target = ScaleTargetRef::new("apps/v1", "Deployment", "default", "unified");
    // The same event twice: the second becomes a series, written with a patch.
    for _ in 0..2 {
        events
            .scaled(&fba.object_ref(&()), &target, 1, 2, "test")
            .await?;
    }
    patch_status(
        &client,
        "default",
        "llama",
        &FlyballAutoscalerStatus::default(),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn every_call_succeeds_under_exactly_the_listed_rules() {
    let cluster = TestCluster::start().await.unwrap();
    let Some(fake) = cluster.fake_or_skip(
        "every_call_succeeds_under_exactly_the_listed_rules",
        "the RBAC table",
    ) else {
        return;
    };
    seed(fake);
    fake.allow_only(as_fake_rules(RULES, LEASE));
    every_call(cluster.client()).await.unwrap();
    let refused = refused_calls(fake);
    assert!(refused.is_empty(), "{refused:?}");
}

#[tokio::test]
async fn each_rule_used_by_this_crate_is_needed_by_some_call() {
    for (i, removed) in RULES.iter().enumerate() {
        // Reading autoscalers is the control service's (its informer lists and watches them);
        // the calls above only borrow the rule to get an object to attach events to.
        if removed.resources == ["flyballautoscalers"] {
            continue;
        }
        let fake = ApiServer::start().await.unwrap();
        seed(&fake);
        let mut rules = RULES.to_vec();
        rules.remove(i);
        fake.allow_only(as_fake_rules(&rules, LEASE));
        let result = every_call(fake.client()).await;
        let forbidden = fake.requests().iter().any(|r| r.status == Some(403));
        assert!(
            result.is_err() && forbidden,
            "removing {removed:?} broke nothing: {result:?}"
        );
    }
}

/// The Lease rules reach the Lease they name and no other: a replica granted another Lease
/// cannot elect on this one.
#[tokio::test]
async fn the_lease_rules_reach_only_the_lease_they_name() {
    let fake = ApiServer::start().await.unwrap();
    seed(&fake);
    fake.allow_only(as_fake_rules(RULES, "someone-elses"));
    let result = every_call(fake.client()).await;
    let refused = refused_calls(&fake);
    assert!(result.is_err(), "elected on a Lease it was not granted");
    assert!(
        refused.iter().all(|r| r.contains("/leases/")),
        "{refused:?}"
    );
    assert!(!refused.is_empty());
}
