//! Events for scale changes and refusals, and the FlyballAutoscaler status, written through the
//! real wire.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use flyball_apiserver::TestCluster;
use flyball_k8s::crd::{CONDITION_READY, CONDITION_VALID, ConditionUpdate, set_condition};
use flyball_k8s::events::{REASON_SCALE_REFUSED, REASON_SCALED_UP, REPORTING_CONTROLLER};
use flyball_k8s::{
    FlyballAutoscaler, FlyballAutoscalerSpec, FlyballAutoscalerStatus, LastDecisionStatus,
    PoolStatus, ScaleEvents, ScaleTargetRef, patch_status,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::CustomResourceExt;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::Resource;
use serde_json::json;

/// The Events in `ns` about the object named `name`.
async fn events_regarding(cluster: &TestCluster, ns: &str, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(cluster.client(), ns);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

fn spec() -> FlyballAutoscalerSpec {
    serde_json::from_value(json!({
        "selector": {"backend": "vllm", "model": "llama-3-8b"},
        "pools": {"unified": {"scaleTargetRef": {"name": "vllm"}, "maxReplicas": 8}},
        "slo": {"ttft": "500ms", "tpot": "50ms"}
    }))
    .unwrap()
}

/// A cluster with the CRD installed and one FlyballAutoscaler of [`spec`] in its namespace.
async fn cluster_with_an_autoscaler() -> (TestCluster, FlyballAutoscaler) {
    let cluster = TestCluster::start().await.unwrap();
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let name = cluster.unique_name("llama");
    let created = cluster
        .create(&FlyballAutoscaler::new(&name, spec()))
        .await
        .unwrap();
    (cluster, created)
}

#[tokio::test]
async fn scale_changes_and_refusals_become_events_on_the_autoscaler() {
    let (cluster, fba) = cluster_with_an_autoscaler().await;
    let name = fba.name_any();
    let ns = cluster.namespace().to_string();
    if let Some(fake) = cluster.fake() {
        fake.clear_requests();
    }
    let target = ScaleTargetRef::new("apps/v1", "Deployment", &ns, "vllm");
    let events = ScaleEvents::new(cluster.client(), "flyball-control-0");
    let regarding = fba.object_ref(&());

    events
        .scaled(
            &regarding,
            &target,
            2,
            4,
            "FeedForward: 1800 tok/s over 450 tok/s per replica",
        )
        .await
        .unwrap();
    events
        .refused(
            &regarding,
            &target,
            5,
            "forbidden: cannot patch deployments/scale",
        )
        .await
        .unwrap();

    let ours = events_regarding(&cluster, &ns, &name).await;
    assert_eq!(ours.len(), 2, "{ours:?}");
    let scaled = ours
        .iter()
        .find(|e| e.reason.as_deref() == Some(REASON_SCALED_UP))
        .unwrap();
    assert_eq!(scaled.type_.as_deref(), Some("Normal"));
    assert_eq!(scaled.action.as_deref(), Some("Scale"));
    assert_eq!(
        scaled.note.as_deref(),
        Some(format!("scaled Deployment {ns}/vllm from 2 to 4: FeedForward: 1800 tok/s over 450 tok/s per replica").as_str())
    );
    assert_eq!(
        scaled.reporting_controller.as_deref(),
        Some(REPORTING_CONTROLLER)
    );
    assert_eq!(
        scaled.reporting_instance.as_deref(),
        Some("flyball-control-0")
    );
    let related = scaled.related.as_ref().unwrap();
    assert_eq!(related.kind.as_deref(), Some("Deployment"));
    assert_eq!(related.name.as_deref(), Some("vllm"));
    let regarding_kind = scaled.regarding.as_ref().and_then(|r| r.kind.as_deref());
    assert_eq!(regarding_kind, Some("FlyballAutoscaler"));
    let refused = ours
        .iter()
        .find(|e| e.reason.as_deref() == Some(REASON_SCALE_REFUSED))
        .unwrap();
    assert_eq!(refused.type_.as_deref(), Some("Warning"));

    if let Some(fake) = cluster.fake() {
        let create = format!("/apis/events.k8s.io/v1/namespaces/{ns}/events");
        let posts = fake
            .requests()
            .iter()
            .filter(|r| r.is("POST", &create))
            .count();
        assert_eq!(posts, 2);
    }
    cluster.cleanup().await.unwrap();
}

#[tokio::test]
async fn status_is_written_through_the_status_subresource_and_leaves_the_spec_alone() {
    let (cluster, created) = cluster_with_an_autoscaler().await;
    let name = created.name_any();
    let ns = cluster.namespace().to_string();
    if let Some(fake) = cluster.fake() {
        fake.clear_requests();
    }
    let now = Time(Timestamp::from_second(1_750_000_000).unwrap());
    let generation = created.metadata.generation;
    let mut status = FlyballAutoscalerStatus {
        observed_generation: generation,
        ..FlyballAutoscalerStatus::default()
    };
    for (type_, reason) in [(CONDITION_VALID, "SpecValid"), (CONDITION_READY, "Sizing")] {
        let update = ConditionUpdate {
            type_,
            status: true,
            reason,
            message: "ok",
        };
        set_condition(&mut status.conditions, &update, generation, now.clone());
    }
    status.pools.push(PoolStatus {
        role: "unified".into(),
        target: format!("Deployment {ns}/vllm"),
        current_replicas: 2,
        desired_replicas: 4,
        ready_replicas: 2,
        last_decision: Some(LastDecisionStatus {
            at: now.clone(),
            from: 2,
            to: 4,
            reason: "FeedForward".into(),
        }),
    });

    let written = patch_status(&cluster.client(), &ns, &name, &status)
        .await
        .unwrap();
    assert_eq!(written.status.as_ref(), Some(&status));
    assert_eq!(written.spec, created.spec);
    assert_eq!(written.metadata.generation, generation);
    let read = Api::<FlyballAutoscaler>::namespaced(cluster.client(), &ns)
        .get(&name)
        .await
        .unwrap();
    assert_eq!(read.status, Some(status.clone()));

    if let Some(fake) = cluster.fake() {
        let reqs = fake.requests();
        let path =
            format!("/apis/flyball.dev/v1alpha1/namespaces/{ns}/flyballautoscalers/{name}/status");
        let patch = reqs.iter().find(|r| r.is("PATCH", &path)).unwrap();
        assert_eq!(
            patch.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(
            patch.body,
            Some(json!({"status": serde_json::to_value(&status).unwrap()}))
        );
        assert_eq!(
            patch.query_param("fieldManager").as_deref(),
            Some("flyball")
        );
    }
    cluster.cleanup().await.unwrap();
}

/// kube's recorder keys a series on everything but the note: without care a second change
/// would show as another count of the first one's text.
#[tokio::test]
async fn a_different_note_is_a_new_event_and_an_exact_repeat_a_series() {
    let (cluster, fba) = cluster_with_an_autoscaler().await;
    let name = fba.name_any();
    let ns = cluster.namespace().to_string();
    let target = ScaleTargetRef::new("apps/v1", "Deployment", &ns, "vllm");
    let events = ScaleEvents::new(cluster.client(), "flyball-control-0");
    let regarding = fba.object_ref(&());

    events
        .scaled(&regarding, &target, 2, 4, "FeedForward")
        .await
        .unwrap();
    events
        .scaled(&regarding, &target, 4, 6, "FeedForward")
        .await
        .unwrap();
    let forbidden = "forbidden: cannot patch deployments/scale";
    events
        .refused(&regarding, &target, 5, forbidden)
        .await
        .unwrap();
    events
        .refused(&regarding, &target, 5, forbidden)
        .await
        .unwrap();

    let ours = events_regarding(&cluster, &ns, &name).await;
    let mut scaled_notes: Vec<&str> = ours
        .iter()
        .filter(|e| e.reason.as_deref() == Some(REASON_SCALED_UP))
        .filter_map(|e| e.note.as_deref())
        .collect();
    scaled_notes.sort_unstable();
    assert_eq!(
        scaled_notes,
        [
            format!("scaled Deployment {ns}/vllm from 2 to 4: FeedForward"),
            format!("scaled Deployment {ns}/vllm from 4 to 6: FeedForward"),
        ],
        "{ours:?}"
    );
    let refusals: Vec<&Event> = ours
        .iter()
        .filter(|e| e.reason.as_deref() == Some(REASON_SCALE_REFUSED))
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(
        refusals[0].note.as_deref(),
        Some(format!("did not scale Deployment {ns}/vllm to 5: {forbidden}").as_str())
    );
    assert_eq!(
        refusals[0].series.as_ref().map(|s| s.count),
        Some(2),
        "an exact repeat is counted on the first Event"
    );
    cluster.cleanup().await.unwrap();
}

/// The replica's Lease identity is `$POD_NAME@<advertise address>`; with a DNS advertise
/// address it passes the 128 bytes the API takes as `reportingInstance`, and every Event would
/// be refused (422) and only logged.
#[tokio::test]
async fn a_long_replica_identity_still_gets_its_events_written() {
    let (cluster, fba) = cluster_with_an_autoscaler().await;
    let name = fba.name_any();
    let ns = cluster.namespace().to_string();
    let identity = "llm-gateway-flyball-control-0@llm-gateway-flyball-control-0.\
                    llm-gateway-flyball-control-headless.inference-production.svc.cluster.local:9090";
    assert!(identity.len() > 128);
    let events = ScaleEvents::new(cluster.client(), identity);
    let target = ScaleTargetRef::new("apps/v1", "Deployment", &ns, "vllm");

    events
        .scaled(&fba.object_ref(&()), &target, 1, 2, "FeedForward")
        .await
        .unwrap();

    let ours = events_regarding(&cluster, &ns, &name).await;
    assert_eq!(ours.len(), 1, "{ours:?}");
    let instance = ours[0].reporting_instance.as_deref().unwrap_or_default();
    assert_eq!(instance, &identity[..128]);
    cluster.cleanup().await.unwrap();
}
