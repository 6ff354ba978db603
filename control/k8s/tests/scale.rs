//! `/scale` reads and writes through the real wire: against the in-process API server, or the
//! cluster from `KUBECONFIG` (request-level assertions and fault injection need the fake).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use flyball_apiserver::{ResourceType, TestCluster, Verb};
use flyball_k8s::{Error, ScaleClient, ScaleTargetRef, TransientCause};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use serde_json::json;
use support::{RecordedSleeps, call, calls, policy};

async fn cluster() -> TestCluster {
    TestCluster::start().await.expect("test cluster")
}

fn deployment(cluster: &TestCluster, name: &str) -> ScaleTargetRef {
    ScaleTargetRef::new("apps/v1", "Deployment", cluster.namespace(), name)
}

fn scale_path(group_version: &str, plural: &str, ns: &str, name: &str) -> String {
    let prefix = if group_version == "v1" {
        "/api/v1".to_string()
    } else {
        format!("/apis/{group_version}")
    };
    format!("{prefix}/namespaces/{ns}/{plural}/{name}/scale")
}

#[tokio::test]
async fn deployment_is_read_and_patched_through_its_scale_subresource() {
    let cluster = cluster().await;
    let name = cluster.unique_name("vllm");
    cluster.create_deployment(&name, 2).await.unwrap();
    let ns = cluster.namespace().to_string();
    if let Some(fake) = cluster.fake() {
        fake.set_ready_replicas("apps/v1", "Deployment", &ns, &name, 1)
            .unwrap();
        fake.clear_requests();
    }
    let scales = ScaleClient::new(cluster.client());
    let target = deployment(&cluster, &name);

    let seen = scales.get_scale(&target).await.unwrap();
    assert_eq!(seen.spec_replicas, 2);
    assert_eq!(
        seen.selector.as_deref(),
        Some(format!("app={name}").as_str())
    );
    let written = scales.set_replicas(&target, 3).await.unwrap();
    assert_eq!(written.spec_replicas, 3);
    assert_eq!(written.attempts, 1);
    assert_eq!(scales.get_scale(&target).await.unwrap().spec_replicas, 3);

    if let Some(fake) = cluster.fake() {
        assert_eq!(seen.ready_replicas, Some(1));
        assert_eq!(seen.status_replicas, 0);
        let reqs = fake.requests();
        let object = format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}");
        let scale = format!("{object}/scale");
        assert_eq!(
            calls(&reqs),
            [
                call("GET", "/apis/apps/v1"),
                call("GET", &scale),
                call("GET", &object),
                call("PATCH", &scale),
                // The kind is resolved once: no second discovery request.
                call("GET", &scale),
                call("GET", &object),
            ]
        );
        let patch = &reqs[3];
        assert_eq!(
            patch.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(patch.body, Some(json!({"spec": {"replicas": 3}})));
        assert_eq!(
            patch.query_param("fieldManager").as_deref(),
            Some("flyball")
        );
        let stored = fake.object("apps/v1", "Deployment", &ns, &name).unwrap();
        assert_eq!(stored["spec"]["replicas"], 3);
    }
    cluster.cleanup().await.unwrap();
}

#[tokio::test]
async fn statefulset_is_read_and_patched_through_its_scale_subresource() {
    let cluster = cluster().await;
    let name = cluster.unique_name("prefill");
    cluster.create_statefulset(&name, 1).await.unwrap();
    let ns = cluster.namespace().to_string();
    if let Some(fake) = cluster.fake() {
        fake.clear_requests();
    }
    let scales = ScaleClient::new(cluster.client());
    let target = ScaleTargetRef::new("apps/v1", "StatefulSet", &ns, &name);

    let seen = scales.get_scale(&target).await.unwrap();
    assert_eq!(seen.spec_replicas, 1);
    scales.set_replicas(&target, 0).await.unwrap();
    // Scale-to-zero: autoscaling/v1 omits spec.replicas, which reads back as 0.
    assert_eq!(scales.get_scale(&target).await.unwrap().spec_replicas, 0);

    if let Some(fake) = cluster.fake() {
        let reqs = fake.requests();
        let scale = scale_path("apps/v1", "statefulsets", &ns, &name);
        let patch = reqs.iter().find(|r| r.method == "PATCH").unwrap();
        assert_eq!(patch.path, scale);
        assert_eq!(
            patch.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(patch.body, Some(json!({"spec": {"replicas": 0}})));
    }
    cluster.cleanup().await.unwrap();
}

#[tokio::test]
async fn leader_worker_set_is_scaled_through_the_scale_subresource_its_crd_declares() {
    let cluster = cluster().await;
    let Some(fake) = cluster.fake_or_skip(
        "leader_worker_set_is_scaled_through_the_scale_subresource_its_crd_declares",
        "the LeaderWorkerSet kind registered",
    ) else {
        return;
    };
    fake.register(ResourceType::leader_worker_set());
    fake.seed(json!({
        "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
        "metadata": {"name": "decode", "namespace": "default"},
        "spec": {"replicas": 2, "leaderWorkerTemplate": {"size": 4}},
        "status": {"replicas": 2, "readyReplicas": 2,
                   "hpaPodSelector": "leaderworkerset.sigs.k8s.io/name=decode"}
    }))
    .unwrap();
    let scales = ScaleClient::new(cluster.client());
    let target = ScaleTargetRef::new(
        "leaderworkerset.x-k8s.io/v1",
        "LeaderWorkerSet",
        "default",
        "decode",
    );

    let seen = scales.get_scale(&target).await.unwrap();
    assert_eq!(seen.spec_replicas, 2);
    assert_eq!(seen.status_replicas, 2);
    assert_eq!(seen.ready_replicas, Some(2));
    assert_eq!(
        seen.selector.as_deref(),
        Some("leaderworkerset.sigs.k8s.io/name=decode")
    );
    scales.set_replicas(&target, 5).await.unwrap();

    let object = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/default/leaderworkersets/decode";
    let scale = format!("{object}/scale");
    let reqs = fake.requests();
    assert_eq!(
        calls(&reqs),
        [
            call("GET", "/apis/leaderworkerset.x-k8s.io/v1"),
            call("GET", &scale),
            call("GET", object),
            call("PATCH", &scale),
        ]
    );
    assert_eq!(
        reqs[3].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(reqs[3].body, Some(json!({"spec": {"replicas": 5}})));
    let stored = fake
        .object(
            "leaderworkerset.x-k8s.io/v1",
            "LeaderWorkerSet",
            "default",
            "decode",
        )
        .unwrap();
    assert_eq!(stored["spec"]["replicas"], 5);
    // Only spec.replicas moved.
    assert_eq!(stored["spec"]["leaderWorkerTemplate"]["size"], 4);
}

#[tokio::test]
async fn conflicts_are_retried_until_the_write_lands() {
    let cluster = cluster().await;
    let Some(fake) = cluster.fake_or_skip(
        "conflicts_are_retried_until_the_write_lands",
        "fault injection",
    ) else {
        return;
    };
    fake.seed_deployment("default", "c", 1, 1).unwrap();
    let scale = scale_path("apps/v1", "deployments", "default", "c");
    fake.conflict_next(Some(Verb::Patch), &scale, 2);
    let sleeps = RecordedSleeps::default();
    let scales = ScaleClient::new(cluster.client()).with_sleep(sleeps.sleep_fn());

    let written = scales
        .set_replicas(&deployment(&cluster, "c"), 4)
        .await
        .unwrap();
    assert_eq!(written.attempts, 3);
    assert_eq!(written.spec_replicas, 4);
    let patches: Vec<Option<u16>> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.status)
        .collect();
    assert_eq!(patches, [Some(409), Some(409), Some(200)]);
    assert_eq!(sleeps.taken().len(), 2);
}

#[tokio::test]
async fn a_conflict_that_never_clears_gives_up_after_the_bounded_attempts() {
    let cluster = cluster().await;
    let Some(fake) = cluster.fake_or_skip(
        "a_conflict_that_never_clears_gives_up_after_the_bounded_attempts",
        "fault injection",
    ) else {
        return;
    };
    fake.seed_deployment("default", "c", 1, 1).unwrap();
    fake.conflict_next(Some(Verb::Patch), "/apis/apps/v1", 100);
    let sleeps = RecordedSleeps::default();
    let scales = ScaleClient::new(cluster.client()).with_sleep(sleeps.sleep_fn());

    let err = scales
        .set_replicas(&deployment(&cluster, "c"), 4)
        .await
        .unwrap_err();
    let attempts = scales.retry_policy().conflict_attempts;
    assert!(
        matches!(err, Error::Conflict { attempts: a, .. } if a == attempts),
        "{err:?}"
    );
    assert_eq!(err.metric_label(), "conflict");
    let patches = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, attempts as usize);
}

#[tokio::test]
async fn forbidden_surfaces_at_once_without_a_retry_storm() {
    let cluster = cluster().await;
    let Some(fake) = cluster.fake_or_skip(
        "forbidden_surfaces_at_once_without_a_retry_storm",
        "the RBAC table",
    ) else {
        return;
    };
    fake.set_user("system:serviceaccount:flyball-system:flyball");
    fake.seed_deployment("default", "f", 1, 1).unwrap();
    fake.deny(Verb::Patch, "apps", "deployments", Some("scale"));
    let sleeps = RecordedSleeps::default();
    let scales = ScaleClient::new(cluster.client()).with_sleep(sleeps.sleep_fn());

    let err = scales
        .set_replicas(&deployment(&cluster, "f"), 2)
        .await
        .unwrap_err();
    let Error::Forbidden { message, .. } = &err else {
        panic!("expected Forbidden, got {err:?}");
    };
    assert_eq!(
        message,
        "deployments.apps \"f\" is forbidden: User \"system:serviceaccount:flyball-system:flyball\" \
         cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"default\""
    );
    assert_eq!(err.metric_label(), "forbidden");
    let patches = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, 1);
    assert!(sleeps.taken().is_empty());
}

#[tokio::test]
async fn missing_target_is_not_found_without_retries() {
    let cluster = cluster().await;
    let sleeps = RecordedSleeps::default();
    let scales = ScaleClient::new(cluster.client()).with_sleep(sleeps.sleep_fn());
    let name = cluster.unique_name("ghost");

    let err = scales
        .get_scale(&deployment(&cluster, &name))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let err = scales
        .set_replicas(&deployment(&cluster, &name), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(err.metric_label(), "not_found");
    assert!(sleeps.taken().is_empty());
    if let Some(fake) = cluster.fake() {
        let statuses: Vec<(String, Option<u16>)> = fake
            .requests()
            .iter()
            .map(|r| (r.method.clone(), r.status))
            .collect();
        assert_eq!(
            statuses,
            [
                ("GET".to_string(), Some(200)),
                ("GET".to_string(), Some(404)),
                ("PATCH".to_string(), Some(404)),
            ]
        );
    }
}

#[tokio::test]
async fn server_errors_are_retried_with_growing_jittered_backoff_then_recover() {
    let cluster = cluster().await;
    let Some(fake) = cluster.fake_or_skip(
        "server_errors_are_retried_with_growing_jittered_backoff_then_recover",
        "fault injection",
    ) else {
        return;
    };
    fake.seed_deployment("default", "s", 1, 1).unwrap();
    let scale = scale_path("apps/v1", "deployments", "default", "s");
    fake.fail_next(Some(Verb::Patch), &scale, 3, 500);
    let sleeps = RecordedSleeps::default();
    let scales = ScaleClient::new(cluster.client()).with_sleep(sleeps.sleep_fn());

    let written = scales
        .set_replicas(&deployment(&cluster, "s"), 2)
        .await
        .unwrap();
    assert_eq!(written.attempts, 4);
    let base = scales.retry_policy().base_backoff;
    let taken = sleeps.taken();
    assert_eq!(taken.len(), 3);
    for (i, d) in taken.iter().enumerate() {
        // Retry n waits within [base * 2^(n-1) / 2, base * 2^(n-1)).
        let full = base * 2u32.pow(i as u32);
        assert!(
            *d >= full / 2 && *d < full,
            "retry {}: {d:?} not in [{:?}, {full:?})",
            i + 1,
            full / 2
        );
    }
    let statuses: Vec<Option<u16>> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [Some(500), Some(500), Some(500), Some(200)]);
}

#[tokio::test]
async fn server_errors_that_persist_give_up_as_transient() {
    let cluster = cluster().await;
    let Some(fake) = cluster.fake_or_skip(
        "server_errors_that_persist_give_up_as_transient",
        "fault injection",
    ) else {
        return;
    };
    fake.seed_deployment("default", "s", 1, 1).unwrap();
    fake.fail_next(Some(Verb::Patch), "/apis/apps/v1/", 100, 500);
    let sleeps = RecordedSleeps::default();
    let scales = ScaleClient::new(cluster.client()).with_sleep(sleeps.sleep_fn());

    let err = scales
        .set_replicas(&deployment(&cluster, "s"), 2)
        .await
        .unwrap_err();
    let tries = scales.retry_policy().transient_attempts;
    assert!(
        matches!(&err, Error::Transient { attempts, source: TransientCause::Kube(_), .. } if *attempts == tries),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(sleeps.taken().len(), tries as usize - 1);
}

#[tokio::test]
async fn service_unavailable_is_retried_inside_the_kube_client_first() {
    let cluster = cluster().await;
    let Some(fake) = cluster.fake_or_skip(
        "service_unavailable_is_retried_inside_the_kube_client_first",
        "fault injection",
    ) else {
        return;
    };
    fake.seed_deployment("default", "u", 1, 1).unwrap();
    fake.fail_next(Some(Verb::Patch), "/apis/apps/v1/", 2, 503);
    let sleeps = RecordedSleeps::default();
    let scales = ScaleClient::new(cluster.client()).with_sleep(sleeps.sleep_fn());

    let written = scales
        .set_replicas(&deployment(&cluster, "u"), 2)
        .await
        .unwrap();
    // kube's own retry layer absorbed both 503s: one call for us, three requests on the wire.
    assert_eq!(written.attempts, 1);
    assert!(sleeps.taken().is_empty());
    let patches = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, 3);
}

#[tokio::test]
async fn a_request_that_gets_no_answer_in_time_is_retried() {
    let cluster = cluster().await;
    let Some(fake) = cluster.fake_or_skip(
        "a_request_that_gets_no_answer_in_time_is_retried",
        "fault injection",
    ) else {
        return;
    };
    fake.seed_deployment("default", "t", 1, 1).unwrap();
    fake.stall_next(
        Some(Verb::Patch),
        "/apis/apps/v1/",
        1,
        Duration::from_secs(30),
    );
    let sleeps = RecordedSleeps::default();
    let scales = ScaleClient::new(cluster.client())
        .with_retry_policy(policy())
        .with_sleep(sleeps.sleep_fn());

    let written = scales
        .set_replicas(&deployment(&cluster, "t"), 3)
        .await
        .unwrap();
    assert_eq!(written.attempts, 2);
    assert_eq!(sleeps.taken().len(), 1);
    // The stalled request is still held by the server; the retry answered.
    let patches: Vec<Option<u16>> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.status)
        .collect();
    assert_eq!(patches, [None, Some(200)]);
}

#[tokio::test]
async fn a_kind_the_server_does_not_serve_is_reported_as_such() {
    let cluster = cluster().await;
    let scales = ScaleClient::new(cluster.client());
    // A group/version nobody serves, and a served group/version without that kind.
    for (api_version, kind) in [("example.dev/v9", "Widget"), ("apps/v1", "Widget")] {
        let target = ScaleTargetRef::new(api_version, kind, cluster.namespace(), "w");
        let err = scales.get_scale(&target).await.unwrap_err();
        assert!(matches!(err, Error::KindNotServed { .. }), "{err:?}");
        assert_eq!(err.metric_label(), "kind_not_served");
    }
}

#[tokio::test]
async fn a_kind_without_scale_subresource_is_refused_before_any_write() {
    let cluster = cluster().await;
    let scales = ScaleClient::new(cluster.client());
    let target = ScaleTargetRef::new("coordination.k8s.io/v1", "Lease", cluster.namespace(), "l");
    let err = scales.set_replicas(&target, 1).await.unwrap_err();
    assert!(matches!(err, Error::NoScaleSubresource { .. }), "{err:?}");
    if let Some(fake) = cluster.fake() {
        assert!(fake.requests().iter().all(|r| r.method == "GET"));
    }
}

#[tokio::test]
async fn an_hpa_on_the_same_target_is_detected_and_others_are_not() {
    let cluster = cluster().await;
    let name = cluster.unique_name("vllm");
    let hpa = |hpa_name: &str, target: &str| -> HorizontalPodAutoscaler {
        serde_json::from_value(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": hpa_name},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                "minReplicas": 1, "maxReplicas": 8,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 80}}}]
            }
        }))
        .unwrap()
    };
    let same = cluster.unique_name("hpa");
    cluster.create(&hpa(&same, &name)).await.unwrap();
    let other = cluster.unique_name("hpa");
    cluster.create(&hpa(&other, "someone-else")).await.unwrap();

    let scales = ScaleClient::new(cluster.client());
    let found = scales
        .conflicting_hpas(&deployment(&cluster, &name))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, same);
    assert_eq!(found[0].max_replicas, 8);
    assert_eq!(found[0].min_replicas, Some(1));
    if let Some(fake) = cluster.fake() {
        let list = format!(
            "/apis/autoscaling/v2/namespaces/{}/horizontalpodautoscalers",
            cluster.namespace()
        );
        let lists = fake
            .requests()
            .iter()
            .filter(|r| r.is("GET", &list))
            .count();
        assert_eq!(lists, 1);
    }
    cluster.cleanup().await.unwrap();
}
