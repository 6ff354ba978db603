//! Watch through the real wire: raw event lines as the real API server sends them, and
//! `kube::runtime::watcher` / `reflector` on an ordinary `kube::Client` pointed at the fake.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use axum::body::BodyDataStream;
use flyball_apiserver::{ApiServer, Verb};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, WatchParams};
use kube::discovery;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";

async fn server() -> ApiServer {
    ApiServer::start().await.expect("fake API server starts")
}

fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .expect("a resourceVersion")
        .parse()
        .expect("a numeric resourceVersion")
}

fn labelled_deployment(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "pause"}]}
            }
        }
    })
}

/// A watch response read line by line, as kube's `LinesCodec` reads it.
struct RawWatch {
    status: u16,
    headers: axum::http::HeaderMap,
    body: BodyDataStream,
    buffer: Vec<u8>,
}

impl RawWatch {
    async fn open(s: &ApiServer, path_and_query: &str) -> Self {
        let req = axum::http::Request::get(path_and_query)
            .body(Vec::new())
            .unwrap();
        let resp = tokio::time::timeout(WAIT, s.client().send(req.map(kube::client::Body::from)))
            .await
            .expect("the watch answers its headers at once")
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        Self {
            status,
            headers,
            body: axum::body::Body::new(resp.into_body()).into_data_stream(),
            buffer: Vec::new(),
        }
    }

    /// The next line, newline included; `None` once the server has ended the stream.
    async fn next_line(&mut self) -> Option<String> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buffer.drain(..=end).collect();
                    return Some(String::from_utf8(line).unwrap());
                }
                match self.body.next().await {
                    Some(chunk) => self.buffer.extend_from_slice(&chunk.unwrap()),
                    None => {
                        assert!(
                            self.buffer.is_empty(),
                            "a partial last line: {:?}",
                            self.buffer
                        );
                        return None;
                    }
                }
            }
        })
        .await
        .expect("the next watch line or the end of the stream")
    }

    /// The next event as `(type, object)`, checking the line's exact framing.
    async fn next_event(&mut self) -> (String, Value) {
        let line = self.next_line().await.expect("another event");
        assert!(line.starts_with("{\"type\":\""), "{line}");
        assert!(
            line.ends_with("}\n") && !line[..line.len() - 1].contains('\n'),
            "{line}"
        );
        let event: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event.as_object().unwrap().len(), 2, "{line}");
        (
            event["type"].as_str().unwrap().to_string(),
            event["object"].clone(),
        )
    }

    async fn assert_ended(&mut self) {
        if let Some(line) = self.next_line().await {
            panic!("expected the stream to end, got {line}");
        }
    }
}

fn get(s: &ApiServer, name: &str) -> Value {
    s.object("apps/v1", "Deployment", "default", name).unwrap()
}

#[tokio::test]
async fn watch_from_zero_sends_current_objects_then_every_change_as_it_happens() {
    let s = server().await;
    s.seed_deployment("default", "vllm", 2, 1).unwrap();
    s.seed_deployment("other", "elsewhere", 1, 1).unwrap();
    let mut w = RawWatch::open(&s, &format!("{DEPLOYMENTS}?watch=true&resourceVersion=0")).await;
    assert_eq!(w.status, 200);
    assert_eq!(w.headers["content-type"], "application/json");
    assert_eq!(w.headers["transfer-encoding"], "chunked");

    // The current state, exactly as a GET returns it; the other namespace is not in this watch.
    let (t, added) = w.next_event().await;
    assert_eq!(t, "ADDED");
    assert_eq!(added, get(&s, "vllm"));

    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let pp = PatchParams::default();
    api.patch(
        "vllm",
        &pp,
        &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
    )
    .await
    .unwrap();
    let (t, spec_change) = w.next_event().await;
    assert_eq!(t, "MODIFIED");
    assert_eq!(spec_change, get(&s, "vllm"));
    assert!(rv(&spec_change) > rv(&added));

    api.patch_status(
        "vllm",
        &pp,
        &Patch::Merge(json!({"status": {"readyReplicas": 2}})),
    )
    .await
    .unwrap();
    let (t, status_change) = w.next_event().await;
    assert_eq!(t, "MODIFIED");
    assert_eq!(status_change["status"]["readyReplicas"], 2);
    assert!(rv(&status_change) > rv(&spec_change));

    api.patch_scale("vllm", &pp, &Patch::Merge(json!({"spec": {"replicas": 4}})))
        .await
        .unwrap();
    let (t, scale_change) = w.next_event().await;
    assert_eq!(t, "MODIFIED");
    assert_eq!(scale_change["spec"]["replicas"], 4);
    assert_eq!(scale_change, get(&s, "vllm"));
    assert!(rv(&scale_change) > rv(&status_change));

    // Neither a no-op write nor a change in another namespace is an event: the next one is the
    // deletion.
    api.patch_scale("vllm", &pp, &Patch::Merge(json!({"spec": {"replicas": 4}})))
        .await
        .unwrap();
    s.seed_deployment("other", "later", 1, 1).unwrap();
    let last_stored = get(&s, "vllm");
    api.delete("vllm", &DeleteParams::default()).await.unwrap();
    let (t, deleted) = w.next_event().await;
    assert_eq!(t, "DELETED");
    assert!(rv(&deleted) > rv(&s.object("apps/v1", "Deployment", "other", "later").unwrap()));
    let mut expected = last_stored;
    expected["metadata"]["resourceVersion"] = deleted["metadata"]["resourceVersion"].clone();
    assert_eq!(deleted, expected);

    // Recorded like any other request.
    let log = s.requests();
    let watch = log.iter().find(|r| r.verb == Verb::Watch).unwrap();
    assert!(watch.is("GET", DEPLOYMENTS));
    assert_eq!(watch.query_param("resourceVersion").as_deref(), Some("0"));
    assert_eq!(watch.status, Some(200));
}

#[tokio::test]
async fn watch_from_a_resource_version_replays_only_later_changes_across_all_namespaces() {
    let s = server().await;
    s.seed_deployment("default", "before", 1, 1).unwrap();
    let from = rv(&get(&s, "before"));
    s.seed_deployment("team-a", "after", 1, 0).unwrap();
    let mut w = RawWatch::open(
        &s,
        &format!("/apis/apps/v1/deployments?watch=1&resourceVersion={from}"),
    )
    .await;
    let (t, obj) = w.next_event().await;
    assert_eq!(t, "ADDED");
    assert_eq!(obj["metadata"]["namespace"], "team-a");
    assert_eq!(obj["metadata"]["name"], "after");
    // Seeding writes the status as the workload's controller would: a second change.
    let (t, obj) = w.next_event().await;
    assert_eq!(t, "MODIFIED");
    assert_eq!(obj["metadata"]["name"], "after");
    assert_eq!(obj["status"]["observedGeneration"], 1);
    s.set_ready_replicas("apps/v1", "Deployment", "default", "before", 0)
        .unwrap();
    let (t, obj) = w.next_event().await;
    assert_eq!(t, "MODIFIED");
    assert_eq!(obj["metadata"]["name"], "before");
    assert_eq!(obj["status"].get("readyReplicas"), None);
}

#[tokio::test]
async fn bookmarks_carry_the_resource_version_the_watch_has_reached() {
    let s = server().await;
    s.set_watch_bookmark_interval(Duration::from_millis(50));
    s.seed_deployment("default", "d", 1, 1).unwrap();
    let now = rv(&get(&s, "d"));
    let mut w = RawWatch::open(
        &s,
        &format!("{DEPLOYMENTS}?watch=true&resourceVersion={now}&allowWatchBookmarks=true"),
    )
    .await;
    let (t, bookmark) = w.next_event().await;
    assert_eq!(t, "BOOKMARK");
    assert_eq!(
        bookmark,
        json!({"kind": "Deployment", "apiVersion": "apps/v1",
               "metadata": {"resourceVersion": now.to_string()}})
    );

    // A change to another kind moves the watch's resourceVersion without an event for it.
    let leases: Api<Lease> = Api::namespaced(s.client(), "default");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "l"}})).unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let lease_rv: u64 = created.metadata.resource_version.unwrap().parse().unwrap();
    loop {
        let (t, bookmark) = w.next_event().await;
        assert_eq!(t, "BOOKMARK");
        if rv(&bookmark) == lease_rv {
            break;
        }
        assert_eq!(rv(&bookmark), now);
    }
}

#[tokio::test]
async fn a_resource_version_older_than_the_history_gets_one_410_event_and_the_stream_ends() {
    let s = server().await;
    s.seed_deployment("default", "d", 1, 1).unwrap();
    let before = rv(&get(&s, "d"));
    s.set_watch_history(2);
    let mut changes = Vec::new();
    for ready in [0, 1, 0] {
        changes.push(rv(&s
            .set_ready_replicas("apps/v1", "Deployment", "default", "d", ready)
            .unwrap()));
    }
    let oldest_gone = changes[0];

    let mut w = RawWatch::open(
        &s,
        &format!("{DEPLOYMENTS}?watch=true&resourceVersion={before}"),
    )
    .await;
    assert_eq!(w.status, 200);
    let line = w.next_line().await.unwrap();
    assert!(
        line.starts_with("{\"type\":\"ERROR\",\"object\":{"),
        "{line}"
    );
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        event["object"],
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {before} ({oldest_gone})"),
            "reason": "Expired", "code": 410
        })
    );
    w.assert_ended().await;

    // From where the history starts, every kept change arrives.
    let mut w = RawWatch::open(
        &s,
        &format!("{DEPLOYMENTS}?watch=true&resourceVersion={oldest_gone}"),
    )
    .await;
    for expected in &changes[1..] {
        let (t, obj) = w.next_event().await;
        assert_eq!(t, "MODIFIED");
        assert_eq!(rv(&obj), *expected);
    }
}

#[tokio::test]
async fn label_selectors_filter_and_objects_leaving_the_selection_arrive_as_deleted() {
    let s = server().await;
    s.seed(labelled_deployment("a", json!({"tier": "decode"})))
        .unwrap();
    s.seed(labelled_deployment("b", json!({"tier": "prefill"})))
        .unwrap();
    let mut w = RawWatch::open(
        &s,
        &format!("{DEPLOYMENTS}?watch=true&resourceVersion=&labelSelector=tier%3Ddecode"),
    )
    .await;
    let (t, obj) = w.next_event().await;
    assert_eq!(
        (t.as_str(), &obj["metadata"]["name"]),
        ("ADDED", &json!("a"))
    );

    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let pp = PatchParams::default();
    let relabel = |tier: &str| Patch::Merge(json!({"metadata": {"labels": {"tier": tier}}}));
    api.patch("b", &pp, &relabel("decode")).await.unwrap();
    let (t, obj) = w.next_event().await;
    assert_eq!(
        (t.as_str(), &obj["metadata"]["name"]),
        ("ADDED", &json!("b"))
    );

    let before = get(&s, "a");
    let moved = api.patch("a", &pp, &relabel("prefill")).await.unwrap();
    let (t, obj) = w.next_event().await;
    assert_eq!(t, "DELETED");
    // The object as the watcher last saw it, at the change's resourceVersion.
    let mut expected = before;
    expected["metadata"]["resourceVersion"] = json!(moved.metadata.resource_version.unwrap());
    assert_eq!(obj, expected);

    // Changes outside the selection are not events.
    api.patch(
        "a",
        &pp,
        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    api.delete("b", &DeleteParams::default()).await.unwrap();
    let (t, obj) = w.next_event().await;
    assert_eq!(
        (t.as_str(), &obj["metadata"]["name"]),
        ("DELETED", &json!("b"))
    );

    // A selector that does not parse is refused before the stream starts, as for list.
    let w = RawWatch::open(
        &s,
        &format!("{DEPLOYMENTS}?watch=true&labelSelector=tier%20in%20(a"),
    )
    .await;
    assert_eq!(w.status, 400);
}

#[tokio::test]
async fn timeout_seconds_ends_the_stream_cleanly() {
    let s = server().await;
    s.seed_deployment("default", "d", 1, 1).unwrap();
    let mut w = RawWatch::open(&s, &format!("{DEPLOYMENTS}?watch=true&timeoutSeconds=1")).await;
    assert_eq!(w.next_event().await.0, "ADDED");
    w.assert_ended().await;
}

#[tokio::test]
async fn dropping_the_server_ends_open_watches() {
    let s = server().await;
    let mut w = RawWatch::open(&s, &format!("{DEPLOYMENTS}?watch=true")).await;
    drop(s);
    w.assert_ended().await;
}

#[tokio::test]
async fn a_denied_watch_is_a_403_in_the_authorizers_words() {
    let s = server().await;
    s.set_user("system:serviceaccount:flyball:flyball");
    s.deny(Verb::Watch, "apps", "deployments", None);
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let err = match api.watch(&WatchParams::default(), "0").await {
        Err(kube::Error::Api(status)) => status,
        Err(other) => panic!("expected an API error, got {other:?}"),
        Ok(_) => panic!("expected the watch to be denied"),
    };
    assert_eq!(err.code, 403);
    assert_eq!(err.reason, "Forbidden");
    assert_eq!(
        err.message,
        "deployments.apps is forbidden: User \"system:serviceaccount:flyball:flyball\" \
         cannot watch resource \"deployments\" in API group \"apps\" in the namespace \"default\""
    );
    let log = s.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].verb, Verb::Watch);
    assert_eq!(log[0].status, Some(403));
    // Listing is a different verb and still allowed.
    api.list(&Default::default()).await.unwrap();
}

#[tokio::test]
async fn injected_faults_answer_watches_too() {
    let s = server().await;
    // 500: kube's client retries 503s by itself.
    s.fail_next(Some(Verb::Watch), "/apis/apps/v1/", 1, 500);
    let w = RawWatch::open(&s, &format!("{DEPLOYMENTS}?watch=true")).await;
    assert_eq!(w.status, 500);
    let mut w = RawWatch::open(&s, &format!("{DEPLOYMENTS}?watch=true&timeoutSeconds=1")).await;
    assert_eq!(w.status, 200);
    w.assert_ended().await;
}

#[tokio::test]
async fn streaming_lists_are_refused_and_send_initial_events_false_starts_from_now() {
    let s = server().await;
    s.seed_deployment("default", "d", 1, 1).unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let err = match api.watch(&WatchParams::streaming_lists(), "0").await {
        Err(kube::Error::Api(status)) => status,
        Err(other) => panic!("expected an API error, got {other:?}"),
        Ok(_) => panic!("expected streaming lists to be refused"),
    };
    assert_eq!(err.code, 500);
    assert!(
        err.message
            .contains("does not implement sendInitialEvents=true"),
        "{}",
        err.message
    );

    let w = RawWatch::open(
        &s,
        &format!("{DEPLOYMENTS}?watch=true&sendInitialEvents=false"),
    )
    .await;
    assert_eq!(
        w.status, 422,
        "sendInitialEvents requires resourceVersionMatch=NotOlderThan"
    );

    let mut w = RawWatch::open(
        &s,
        &format!(
            "{DEPLOYMENTS}?watch=true&resourceVersion=0&sendInitialEvents=false\
             &resourceVersionMatch=NotOlderThan"
        ),
    )
    .await;
    assert_eq!(w.status, 200);
    s.set_ready_replicas("apps/v1", "Deployment", "default", "d", 0)
        .unwrap();
    let (t, obj) = w.next_event().await;
    assert_eq!(t, "MODIFIED", "no synthetic ADDED before it");
    assert_eq!(obj["metadata"]["name"], "d");
}

#[tokio::test]
async fn deleting_a_crd_deletes_its_objects_for_watchers_then_ends_their_watch() {
    let s = server().await;
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.dev"},
        "spec": {
            "group": "example.dev", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}}}]
        }
    });
    s.seed(crd).unwrap();
    s.seed(json!({
        "apiVersion": "example.dev/v1", "kind": "Widget",
        "metadata": {"name": "w", "namespace": "default"}, "spec": {"size": 1}
    }))
    .unwrap();
    let mut w = RawWatch::open(
        &s,
        "/apis/example.dev/v1/namespaces/default/widgets?watch=true",
    )
    .await;
    let (t, obj) = w.next_event().await;
    assert_eq!(t, "ADDED");
    assert_eq!(obj["apiVersion"], "example.dev/v1");
    assert_eq!(obj["kind"], "Widget");

    let crds: Api<CustomResourceDefinition> = Api::all(s.client());
    crds.delete("widgets.example.dev", &DeleteParams::default())
        .await
        .unwrap();
    let (t, obj) = w.next_event().await;
    assert_eq!(
        (t.as_str(), &obj["metadata"]["name"]),
        ("DELETED", &json!("w"))
    );
    w.assert_ended().await;
}

// --- kube::runtime ---

async fn next<K, S>(events: &mut S) -> watcher::Result<watcher::Event<K>>
where
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Unpin,
{
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("the watcher's next event")
        .expect("the watcher never ends")
}

fn name_of(d: &Deployment) -> &str {
    d.metadata.name.as_deref().unwrap_or_default()
}

#[tokio::test]
async fn watcher_sees_create_patch_status_patch_and_delete_of_a_deployment() {
    let s = server().await;
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));

    let d: Deployment =
        serde_json::from_value(labelled_deployment("vllm", json!({"app": "vllm"}))).unwrap();
    api.create(&PostParams::default(), &d).await.unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Apply(d) => assert_eq!(name_of(&d), "vllm"),
        other => panic!("expected the creation, got {other:?}"),
    }

    let pp = PatchParams::default();
    api.patch("vllm", &pp, &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Apply(d) => assert_eq!(d.spec.unwrap().replicas, Some(3)),
        other => panic!("expected the spec patch, got {other:?}"),
    }

    api.patch_status(
        "vllm",
        &pp,
        &Patch::Merge(json!({"status": {"readyReplicas": 3}})),
    )
    .await
    .unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Apply(d) => assert_eq!(d.status.unwrap().ready_replicas, Some(3)),
        other => panic!("expected the status patch, got {other:?}"),
    }

    api.delete("vllm", &DeleteParams::default()).await.unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Delete(d) => assert_eq!(name_of(&d), "vllm"),
        other => panic!("expected the deletion, got {other:?}"),
    }
}

fn assert_expired(result: watcher::Result<watcher::Event<Deployment>>) {
    match result {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected 410 Expired, got {other:?}"),
    }
}

/// Drain one relist: Init, InitApply..., InitDone.
async fn relist<S>(events: &mut S) -> Vec<Deployment>
where
    S: Stream<Item = watcher::Result<watcher::Event<Deployment>>> + Unpin,
{
    assert!(matches!(next(events).await.unwrap(), watcher::Event::Init));
    let mut listed = Vec::new();
    loop {
        match next(events).await.unwrap() {
            watcher::Event::InitApply(d) => listed.push(d),
            watcher::Event::InitDone => return listed,
            other => panic!("expected the relist, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn reflector_recovers_from_410_by_relisting() {
    let s = server().await;
    s.seed_deployment("default", "vllm", 1, 1).unwrap();
    let api: Api<Deployment> = Api::namespaced(s.client(), "default");
    let (reader, writer) = reflector::store();
    let mut events = reflector(writer, watcher(api.clone(), watcher::Config::default())).boxed();
    assert_eq!(relist(&mut events).await.len(), 1);
    let scale_to = |n: i32| Patch::Merge(json!({"spec": {"replicas": n}}));
    let pp = PatchParams::default();

    // The history is gone before the watch starts: its first answer is 410, then a relist.
    s.set_watch_history(0);
    api.patch_scale("vllm", &pp, &scale_to(2)).await.unwrap();
    assert_expired(next(&mut events).await);
    s.set_watch_history(1000);
    let listed = relist(&mut events).await;
    assert_eq!(listed[0].spec.as_ref().unwrap().replicas, Some(2));

    // Now watching; a change arrives live.
    api.patch_scale("vllm", &pp, &scale_to(3)).await.unwrap();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Apply(_)
    ));

    // The history is trimmed under an open watch: the server ends it, the watcher re-watches
    // from where it was, gets 410 and relists.
    s.set_watch_history(0);
    api.patch_scale("vllm", &pp, &scale_to(4)).await.unwrap();
    assert_expired(next(&mut events).await);
    s.set_watch_history(1000);
    relist(&mut events).await;
    let cached = reader
        .get(&reflector::ObjectRef::new("vllm").within("default"))
        .unwrap();
    assert_eq!(cached.spec.as_ref().unwrap().replicas, Some(4));
}

#[tokio::test]
async fn watcher_on_a_custom_resource_follows_it() {
    let s = server().await;
    s.register(flyball_apiserver::ResourceType::leader_worker_set());
    let gvk = kube::api::GroupVersionKind::gvk("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet");
    let (ar, _) = discovery::pinned_kind(&s.client(), &gvk).await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(s.client(), "default", &ar);
    let mut events = watcher(api.clone(), watcher::Config::default().labels("app=lws")).boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));

    let mut lws = DynamicObject::new("decode", &ar);
    lws.metadata.labels = Some([("app".to_string(), "lws".to_string())].into());
    lws.data = json!({"spec": {"replicas": 1}});
    api.create(&PostParams::default(), &lws).await.unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Apply(o) => assert_eq!(o.data["spec"]["replicas"], 1),
        other => panic!("expected the creation, got {other:?}"),
    }
    api.patch_scale(
        "decode",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    match next(&mut events).await.unwrap() {
        watcher::Event::Apply(o) => assert_eq!(o.data["spec"]["replicas"], 2),
        other => panic!("expected the scale, got {other:?}"),
    }
    api.delete("decode", &DeleteParams::default())
        .await
        .unwrap();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Delete(_)
    ));
}
