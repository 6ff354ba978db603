//! The fake through its real wire: an ordinary `kube::Client` over loopback HTTP, asserting
//! what a real API server would answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use flyball_apiserver::{ApiServer, RbacRule, ResourceType, Verb};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::{self, Discovery, Scope};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

async fn server() -> ApiServer {
    ApiServer::start().await.expect("fake API server starts")
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn pinned_kind_finds_deployments_and_their_scale_subresource() {
    let s = server().await;
    let gvk = GroupVersionKind::gvk("apps", "v1", "Deployment");
    let (ar, caps) = discovery::pinned_kind(&s.client(), &gvk).await.unwrap();
    assert_eq!(ar.plural, "deployments");
    assert!(matches!(caps.scope, Scope::Namespaced));
    let subs: Vec<&str> = caps
        .subresources
        .iter()
        .map(|(ar, _)| ar.plural.as_str())
        .collect();
    assert!(subs.contains(&"scale"), "{subs:?}");
    assert!(subs.contains(&"status"), "{subs:?}");
}

#[tokio::test]
async fn full_and_aggregated_discovery_both_list_every_group() {
    let s = server().await;
    let classic = Discovery::new(s.client()).run().await.unwrap();
    let aggregated = Discovery::new(s.client()).run_aggregated().await.unwrap();
    for d in [&classic, &aggregated] {
        for group in [
            "",
            "apps",
            "autoscaling",
            "coordination.k8s.io",
            "events.k8s.io",
        ] {
            assert!(d.has_group(group), "missing group {group:?}");
        }
        let lease = GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease");
        assert!(d.resolve_gvk(&lease).is_some());
    }
}

#[tokio::test]
async fn scale_patch_changes_replicas_generation_and_resource_version() {
    let s = server().await;
    let before = s.seed_deployment("default", "vllm", 2, 1).unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");

    let scale = api.get_scale("vllm").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    let status = scale.status.unwrap();
    assert_eq!(status.replicas, 2);
    assert_eq!(status.selector.as_deref(), Some("app=vllm"));

    let patched = api
        .patch_scale(
            "vllm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().replicas, Some(5));

    let after = s
        .object("apps/v1", "Deployment", "default", "vllm")
        .unwrap();
    assert_eq!(after["spec"]["replicas"], 5);
    assert_eq!(after["metadata"]["generation"], 2);
    let rv = |v: &Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(rv(&after) > rv(&before));
    // The seeded status is untouched by a spec change.
    assert_eq!(after["status"]["readyReplicas"], 1);
}

#[tokio::test]
async fn patching_the_same_replicas_again_is_a_no_op_that_keeps_the_resource_version() {
    let s = server().await;
    s.seed_deployment("default", "same", 3, 3).unwrap();
    let before = s
        .object("apps/v1", "Deployment", "default", "same")
        .unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    api.patch_scale(
        "same",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .unwrap();
    let after = s
        .object("apps/v1", "Deployment", "default", "same")
        .unwrap();
    assert_eq!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
}

#[tokio::test]
async fn scale_to_zero_omits_spec_replicas_like_autoscaling_v1() {
    let s = server().await;
    s.seed_deployment("default", "idle", 1, 1).unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    api.patch_scale(
        "idle",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 0}})),
    )
    .await
    .unwrap();
    let raw = s
        .client()
        .request_text(http_get(
            "/apis/apps/v1/namespaces/default/deployments/idle/scale",
        ))
        .await
        .unwrap();
    let body: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(body["spec"], json!({}));
    assert_eq!(body["kind"], "Scale");
    assert_eq!(body["apiVersion"], "autoscaling/v1");
}

fn http_get(path: &str) -> axum::http::Request<Vec<u8>> {
    axum::http::Request::get(path).body(Vec::new()).unwrap()
}

#[tokio::test]
async fn replace_scale_with_a_stale_resource_version_is_a_409_conflict() {
    let s = server().await;
    s.seed_statefulset("default", "db", 1, 1).unwrap();
    let api: Api<k8s_openapi::api::apps::v1::StatefulSet> = Api::namespaced(s.client(), "default");
    let mut scale: Scale = api.get_scale("db").await.unwrap();
    // Someone else scales in between.
    api.patch_scale(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    scale.spec.as_mut().unwrap().replicas = Some(4);
    let err = api_error(
        api.replace_scale("db", &PostParams::default(), &scale)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);
    assert_eq!(err.reason, "Conflict");
    assert_eq!(
        err.message,
        "Operation cannot be fulfilled on statefulsets.apps \"db\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
}

#[tokio::test]
async fn negative_replicas_are_invalid() {
    let s = server().await;
    s.seed_deployment("default", "neg", 1, 1).unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let err = api_error(
        api.patch_scale(
            "neg",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": -1}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    assert_eq!(err.reason, "Invalid");
    assert_eq!(
        err.message,
        "Scale.autoscaling \"neg\" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0"
    );
}

#[tokio::test]
async fn missing_objects_answer_404_with_a_status_body() {
    let s = server().await;
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let err = api_error(api.get_scale("ghost").await.unwrap_err());
    assert_eq!(err.code, 404);
    assert_eq!(err.reason, "NotFound");
    assert_eq!(err.message, "deployments.apps \"ghost\" not found");
    let details = err.details.unwrap();
    assert_eq!(details.name, "ghost");
    assert_eq!(details.group, "apps");
    assert_eq!(details.kind, "deployments");
}

#[tokio::test]
async fn denied_verbs_answer_403_in_the_authorizers_words() {
    let s = server().await;
    s.set_user("system:serviceaccount:flyball:flyball");
    s.seed_deployment("default", "x", 1, 1).unwrap();
    s.deny(Verb::Patch, "apps", "deployments", Some("scale"));
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    // Reading the scale is still allowed.
    api.get_scale("x").await.unwrap();
    let err = api_error(
        api.patch_scale(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 403);
    assert_eq!(err.reason, "Forbidden");
    assert_eq!(
        err.message,
        "deployments.apps \"x\" is forbidden: User \"system:serviceaccount:flyball:flyball\" \
         cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"default\""
    );
}

#[tokio::test]
async fn allow_only_refuses_what_the_rules_do_not_grant() {
    let s = server().await;
    s.allow_only([RbacRule::new(
        "autoscaling",
        &["horizontalpodautoscalers"],
        &["list"],
    )]);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(s.client(), "default");
    hpas.list(&ListParams::default()).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(s.client(), "default");
    let err = api_error(leases.get("l").await.unwrap_err());
    assert_eq!(err.code, 403);
}

#[tokio::test]
async fn injected_500s_answer_the_next_requests_then_stop() {
    let s = server().await;
    s.seed_deployment("default", "flaky", 1, 1).unwrap();
    s.fail_next(
        Some(Verb::Get),
        "/apis/apps/v1/namespaces/default/deployments/flaky",
        1,
        500,
    );
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let err = api_error(api.get("flaky").await.unwrap_err());
    assert_eq!(err.code, 500);
    assert_eq!(err.reason, "InternalError");
    api.get("flaky").await.unwrap();
    let statuses: Vec<Option<u16>> = s.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![Some(500), Some(200)]);
}

#[tokio::test]
async fn injected_conflict_names_the_object() {
    let s = server().await;
    s.seed_deployment("default", "c", 1, 1).unwrap();
    s.conflict_next(Some(Verb::Patch), "/apis/apps/v1", 1);
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let err = api_error(
        api.patch_scale(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 409);
    assert!(
        err.message.contains("deployments.apps \"c\""),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn lease_create_twice_is_already_exists_and_stale_update_is_conflict() {
    let s = server().await;
    let api: Api<Lease> = Api::namespaced(s.client(), "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &lease).await.unwrap();
    let err = api_error(
        api.create(&PostParams::default(), &lease)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);
    assert_eq!(err.reason, "AlreadyExists");
    assert_eq!(
        err.message,
        "leases.coordination.k8s.io \"leader\" already exists"
    );

    let mut fresh = created.clone();
    fresh.spec.as_mut().unwrap().holder_identity = Some("b".into());
    api.replace("leader", &PostParams::default(), &fresh)
        .await
        .unwrap();
    // `created` still carries the old resourceVersion.
    let err = api_error(
        api.replace("leader", &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);
    assert_eq!(err.reason, "Conflict");
}

#[tokio::test]
async fn server_side_apply_by_a_second_manager_conflicts_unless_forced() {
    let s = server().await;
    let api: Api<Lease> = Api::namespaced(s.client(), "default");
    let config = |holder: &str| {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "spec": {"holderIdentity": holder}
        })
    };
    let created = api
        .patch("l", &PatchParams::apply("a"), &Patch::Apply(config("a")))
        .await
        .unwrap();
    assert_eq!(
        created.metadata.managed_fields.unwrap()[0]
            .operation
            .as_deref(),
        Some("Apply")
    );
    let err = api_error(
        api.patch("l", &PatchParams::apply("b"), &Patch::Apply(config("b")))
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);
    assert_eq!(
        err.message,
        "Apply failed with 1 conflict: conflict with \"a\": .spec.holderIdentity"
    );
    let forced = api
        .patch(
            "l",
            &PatchParams::apply("b").force(),
            &Patch::Apply(config("b")),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.unwrap().holder_identity.as_deref(), Some("b"));
}

#[tokio::test]
async fn main_resource_writes_keep_status_and_status_writes_keep_spec() {
    let s = server().await;
    s.seed_deployment("default", "st", 2, 2).unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    api.patch(
        "st",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}, "status": {"readyReplicas": 9}})),
    )
    .await
    .unwrap();
    let obj = s.object("apps/v1", "Deployment", "default", "st").unwrap();
    assert_eq!(obj["spec"]["replicas"], 3);
    assert_eq!(obj["status"]["readyReplicas"], 2);

    api.patch_status(
        "st",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 7}, "status": {"readyReplicas": 3}})),
    )
    .await
    .unwrap();
    let obj = s.object("apps/v1", "Deployment", "default", "st").unwrap();
    assert_eq!(obj["spec"]["replicas"], 3);
    assert_eq!(obj["status"]["readyReplicas"], 3);
}

#[tokio::test]
async fn custom_resources_registered_with_scale_serve_scale_from_their_paths() {
    let s = server().await;
    s.register(ResourceType::leader_worker_set());
    s.seed(json!({
        "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
        "metadata": {"name": "decode", "namespace": "default"},
        "spec": {"replicas": 2, "leaderWorkerTemplate": {"size": 4}},
        "status": {"replicas": 2, "readyReplicas": 1, "hpaPodSelector": "leaderworkerset.sigs.k8s.io/name=decode"}
    }))
    .unwrap();
    let gvk = GroupVersionKind::gvk("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet");
    let (ar, _) = discovery::pinned_kind(&s.client(), &gvk).await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(s.client(), "default", &ar);
    let scale = api.get_scale("decode").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(
        scale.status.unwrap().selector.as_deref(),
        Some("leaderworkerset.sigs.k8s.io/name=decode")
    );
    api.patch_scale(
        "decode",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .unwrap();
    let obj = s
        .object(
            "leaderworkerset.x-k8s.io/v1",
            "LeaderWorkerSet",
            "default",
            "decode",
        )
        .unwrap();
    assert_eq!(obj["spec"]["replicas"], 3);
    assert_eq!(obj["spec"]["leaderWorkerTemplate"]["size"], 4);
}

#[tokio::test]
async fn strategic_merge_on_a_custom_resource_is_415() {
    let s = server().await;
    s.register(ResourceType::leader_worker_set());
    s.seed(json!({
        "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
        "metadata": {"name": "x", "namespace": "default"}, "spec": {"replicas": 1}
    }))
    .unwrap();
    let gvk = GroupVersionKind::gvk("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet");
    let (ar, _) = discovery::pinned_kind(&s.client(), &gvk).await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(s.client(), "default", &ar);
    let err = api_error(
        api.patch(
            "x",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 415);
}

#[tokio::test]
async fn creating_a_crd_serves_its_kind() {
    let s = server().await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(s.client());
    let crd = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.dev"},
        "spec": {
            "group": "example.dev", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}}}]
        }
    }))
    .unwrap();
    let created = crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = created
        .status
        .unwrap()
        .conditions
        .unwrap()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established);
    let gvk = GroupVersionKind::gvk("example.dev", "v1", "Widget");
    let (ar, caps) = discovery::pinned_kind(&s.client(), &gvk).await.unwrap();
    assert_eq!(caps.subresources.len(), 1);
    let api: Api<DynamicObject> = Api::namespaced_with(s.client(), "default", &ar);
    let mut w = DynamicObject::new("w1", &ar);
    w.data = json!({"spec": {"size": 1}});
    api.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn creating_in_a_missing_namespace_is_404_for_the_namespace() {
    let s = server().await;
    let api: Api<Lease> = Api::namespaced(s.client(), "nowhere");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "l"}})).unwrap();
    let err = api_error(
        api.create(&PostParams::default(), &lease)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 404);
    assert_eq!(err.message, "namespaces \"nowhere\" not found");
}

#[tokio::test]
async fn hpa_list_is_per_namespace_and_typed() {
    let s = server().await;
    for (ns, name) in [("default", "a"), ("other", "b")] {
        s.seed(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vllm"},
                     "maxReplicas": 4}
        }))
        .unwrap();
    }
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(s.client(), "default");
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].spec.as_ref().unwrap().min_replicas, Some(1));
    let all: Api<HorizontalPodAutoscaler> = Api::all(s.client());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
}

#[tokio::test]
async fn requests_record_method_path_content_type_and_body() {
    let s = server().await;
    s.seed_deployment("default", "rec", 1, 1).unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let client_side = async {
        api.patch_scale(
            "rec",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    };
    let (_, seen) = tokio::join!(
        client_side,
        s.wait_for(|reqs| reqs.iter().any(|r| r.status == Some(200)), WAIT)
    );
    let seen = seen.unwrap();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert!(r.is(
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/rec/scale"
    ));
    assert_eq!(
        r.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(r.body, Some(json!({"spec": {"replicas": 2}})));
    assert_eq!(r.verb, Verb::Patch);
}

#[tokio::test]
async fn wait_for_reports_the_log_when_the_predicate_never_holds() {
    let s = server().await;
    let err = s
        .wait_for(|reqs| !reqs.is_empty(), Duration::from_millis(20))
        .await
        .unwrap_err();
    assert_eq!(err.seen, 0);
}

#[tokio::test]
async fn scale_accepts_json_patch_and_strategic_merge_patch() {
    let s = server().await;
    s.seed_deployment("default", "p", 1, 1).unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    // kube is built without its `jsonpatch` feature, so send the JSON patch by hand.
    let req = axum::http::Request::patch("/apis/apps/v1/namespaces/default/deployments/p/scale")
        .header("content-type", "application/json-patch+json")
        .body(
            serde_json::to_vec(&json!([
                {"op": "test", "path": "/spec/replicas", "value": 1},
                {"op": "replace", "path": "/spec/replicas", "value": 6}
            ]))
            .unwrap(),
        )
        .unwrap();
    let scale: Scale = s.client().request(req).await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(6));
    let scale = api
        .patch_scale(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    let types: Vec<Option<String>> = s
        .requests()
        .iter()
        .map(|r| r.content_type.clone())
        .collect();
    assert_eq!(
        types,
        [
            Some("application/json-patch+json".to_string()),
            Some("application/strategic-merge-patch+json".to_string())
        ]
    );
}

#[tokio::test]
async fn failures_are_json_status_bodies_with_a_json_content_type() {
    let s = server().await;
    let req = axum::http::Request::get("/apis/apps/v1/namespaces/default/deployments/none")
        .body(Vec::new())
        .unwrap();
    let resp = s
        .client()
        .send(req.map(kube::client::Body::from))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let bytes = resp.into_body().collect_bytes().await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        body,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "deployments.apps \"none\" not found", "reason": "NotFound",
            "details": {"name": "none", "group": "apps", "kind": "deployments"}, "code": 404
        })
    );
}

#[tokio::test]
async fn dry_run_is_refused_rather_than_persisted() {
    let s = server().await;
    let api: Api<Lease> = Api::namespaced(s.client(), "default");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "dry"}})).unwrap();
    let err = api_error(
        api.create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &lease,
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 500);
    assert!(
        s.object("coordination.k8s.io/v1", "Lease", "default", "dry")
            .is_none()
    );
}

/// A failure whose `Status` names `details.retryAfterSeconds` carries the same delay in a
/// `Retry-After` header: the real server's `responsewriters.ErrorNegotiated`
/// (k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/writers.go) sets the header from the
/// details on every error it writes, and APF / max-in-flight 429s always carry it. kube's retry
/// layer (`RetryPolicy::server_retry`, on by default) waits by that header, not by the body; a
/// 429 without it is retried after 5 ms instead of 1 s, so flyball's tests of a throttled
/// `/scale` write run faster than it ever would against a cluster.
#[tokio::test]
async fn too_many_requests_carries_the_retry_after_header_its_status_names() {
    let s = server().await;
    s.seed_deployment("default", "vllm", 2, 1).unwrap();
    let scale = "/apis/apps/v1/namespaces/default/deployments/vllm/scale";
    s.fail_next(Some(Verb::Get), scale, 1, 429);
    // Without kube's retry layer, so the 429 itself comes back.
    let mut config = s.config().unwrap();
    config.default_retry = false;
    let client = kube::Client::try_from(config).unwrap();
    let resp = client
        .send(http_get(scale).map(kube::client::Body::from))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = resp.into_body().collect_bytes().await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    let named = body["details"]["retryAfterSeconds"].as_i64();
    assert_eq!(named, Some(1), "{body}");
    assert_eq!(
        retry_after.as_deref(),
        Some("1"),
        "the Status names retryAfterSeconds 1, so the header must say the same: {body}"
    );
}

/// An `events.k8s.io/v1` Event is validated on create as the real registry validates it
/// (k8s.io/kubernetes pkg/apis/core/validation/events.go, `ValidateEventCreate` ->
/// `legacyValidateEvent`): `reportingInstance` of at most 128 characters
/// (`ReportingInstanceLengthLimit`) and a note of at most 1024 (`NoteLengthLimit`), else 422
/// Invalid naming the field. flyball's `ScaleEvents` cuts its notes to 1 KiB for this reason, but
/// passes its Lease identity (`$POD_NAME@<advertise address>`, unbounded) as
/// `reportingInstance`; the fake takes any length, so a replica whose every Event the real
/// server refuses passes here.
#[tokio::test]
async fn events_v1_over_the_field_limits_are_invalid() {
    let s = server().await;
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(s.client(), "default");
    let event = |name: &str, instance: String, note: String| {
        serde_json::from_value::<k8s_openapi::api::events::v1::Event>(json!({
            "metadata": {"name": name, "namespace": "default"},
            "eventTime": "2025-06-15T12:00:00.000000Z",
            "reportingController": "flyball.dev/control",
            "reportingInstance": instance,
            "action": "Scale",
            "reason": "ScaledUp",
            "type": "Normal",
            "note": note,
            "regarding": {"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "default",
                          "name": "vllm"},
        }))
        .unwrap()
    };
    // At the limits: accepted.
    api.create(
        &PostParams::default(),
        &event("vllm.a", "i".repeat(128), "n".repeat(1024)),
    )
    .await
    .unwrap();

    let long_instance = format!(
        "llm-gateway-flyball-control-0@llm-gateway-flyball-control-0.\
         llm-gateway-flyball-control-headless.{}.svc.cluster.local:9090",
        "inference-production"
    );
    assert!(long_instance.len() > 128, "{}", long_instance.len());
    let err = api
        .create(
            &PostParams::default(),
            &event("vllm.b", long_instance, "scaled".into()),
        )
        .await
        .map(|_| ())
        .map_err(api_error);
    let err = err.expect_err("a reportingInstance over 128 characters is refused");
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"), "{err:?}");
    assert!(err.message.contains("reportingInstance"), "{}", err.message);

    let err = api
        .create(
            &PostParams::default(),
            &event("vllm.c", "flyball-control-0".into(), "n".repeat(1025)),
        )
        .await
        .map(|_| ())
        .map_err(api_error);
    let err = err.expect_err("a note over 1024 characters is refused");
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"), "{err:?}");
}
