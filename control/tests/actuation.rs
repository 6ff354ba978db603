//! `flyball control` acting on Kubernetes: reports over real gRPC, decisions through the real
//! loop, and `/scale`, Events, statuses and the leader Lease through an ordinary `kube::Client`,
//! against the in-process API server or, with `KUBECONFIG` set, that cluster. Exact request
//! assertions and injected faults need the in-process server; those parts say so and are skipped
//! on a real cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flyball_apiserver::{RecordedRequest, TestCluster, Verb};
use flyball_control::Control;
use flyball_control::actuator::{KubeActuator, KubeActuatorConfig};
use flyball_control::controller::Actuator;
use flyball_control::leader::Leadership;
use flyball_k8s::crd::{CONDITION_READY, CONDITION_VALID};
use flyball_k8s::events::{
    REASON_HPA_CONFLICT, REASON_SCALE_REFUSED, REASON_SCALED_DOWN, REASON_SCALED_UP,
    REASON_TARGET_UNREADABLE,
};
use flyball_k8s::{FlyballAutoscaler, FlyballAutoscalerSpec};
use flyball_proto::grpc::telemetry_service_client::TelemetryServiceClient;
use flyball_proto::v1;
use flyball_sketch::Sketch;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::CustomResourceExt;
use kube::api::{Api, ListParams};
use kube::core::ApiResource;
use serde_json::{Value, json};
use support::Running;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;

/// Generous: the slowest step is a follower taking over a released 2 s Lease.
const WAIT: Duration = Duration::from_secs(20);

/// The label TestCluster puts on everything a test creates.
const RUN_LABEL: &str = "flyball.dev/test-run";

// === the world around the control service ===

/// A Deployment with `replicas` wanted and `ready` ready (on a real cluster, its pods decide).
async fn deployment(cluster: &TestCluster, prefix: &str, replicas: i32, ready: i32) -> String {
    let name = cluster.unique_name(prefix);
    cluster.create_deployment(&name, replicas).await.unwrap();
    if let Some(fake) = cluster.fake() {
        fake.set_ready_replicas("apps/v1", "Deployment", cluster.namespace(), &name, ready)
            .unwrap();
    }
    name
}

fn scale_path(ns: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale")
}

/// `(status, body)` of every PATCH of the Deployment's `/scale`, in order.
fn scale_patches(requests: &[RecordedRequest], ns: &str, name: &str) -> Vec<(Option<u16>, Value)> {
    let path = scale_path(ns, name);
    requests
        .iter()
        .filter(|r| r.is("PATCH", &path))
        .map(|r| (r.status, r.body.clone().unwrap_or(Value::Null)))
        .collect()
}

async fn spec_replicas(cluster: &TestCluster, name: &str) -> i32 {
    Api::<Deployment>::namespaced(cluster.client(), cluster.namespace())
        .get(name)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.replicas)
        .unwrap_or(0)
}

/// Events with `reason` about `name` (as the regarded object).
async fn events(cluster: &TestCluster, reason: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(cluster.client(), cluster.namespace())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Polls `check` until it yields a value, or fails naming `what`.
async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting {WAIT:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === the control service ===

/// An autoscaler for Deployment `target`: hints far below the load step below, at most two
/// replicas added a minute (so each leader's first scale-up is exactly +2), scale-down as soon
/// as the policy allows.
fn spec(target: &str) -> Value {
    json!({
        "selector": {"backend": "vllm", "model": "llama"},
        "pools": {"unified": {
            "scaleTargetRef": {"name": target},
            "maxReplicas": 10,
            "capacity": {
                "prefillTokensPerSecond": 2000.0,
                "decodeTokensPerSecond": 400.0,
                "concurrentSequences": 8
            }
        }},
        "slo": {"ttft": "500ms", "tpot": "50ms"},
        "behavior": {
            "cooldown": "0s",
            "scaleUp": {"maxStep": 2, "period": "60s"},
            "scaleDown": {"stabilizationWindow": "0s", "maxStep": 4, "period": "1s"}
        }
    })
}

/// A `--config` file, removed when dropped (a failed test included).
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn to_str(&self) -> Option<&str> {
        self.0.to_str()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The `--config` file for one autoscaler named `name` in `ns`.
fn config_file(name: &str, ns: &str, target: &str) -> ConfigFile {
    let file = json!({"autoscalers": [{"name": name, "namespace": ns, "spec": spec(target)}]});
    let path = std::env::temp_dir().join(format!("flyball-actuation-{name}.yaml"));
    std::fs::write(&path, serde_yaml_ng::to_string(&file).unwrap()).unwrap();
    ConfigFile(path)
}

/// Flags with windows short enough for a test: 2 s stable window, evaluations at least every
/// 200 ms, reporters stale after 500 ms of silence, a 2 s Lease (the shortest allowed).
fn flags(cluster: &TestCluster, lease: &str, identity: &str, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--lease-name",
        lease,
        "--lease-namespace",
        cluster.namespace(),
        "--identity",
        identity,
        "--lease-duration",
        "2s",
        "--bucket",
        "100ms",
        "--short-window",
        "1s",
        "--stable-window",
        "2s",
        "--max-evaluation-interval",
        "200ms",
        "--stale-after",
        "500ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// Creates a FlyballAutoscaler named after `llama` with `spec`; returns its name and run label.
async fn create_autoscaler(cluster: &TestCluster, spec: Value) -> (String, String) {
    let spec: FlyballAutoscalerSpec = serde_json::from_value(spec).unwrap();
    let created = cluster
        .create(&FlyballAutoscaler::new(&cluster.unique_name("llama"), spec))
        .await
        .unwrap();
    let name = created.metadata.name.clone().unwrap();
    let run = created.metadata.labels.as_ref().unwrap()[RUN_LABEL].clone();
    (name, run)
}

/// The run label of this test's objects, read back from its Deployment `name`.
async fn run_label(cluster: &TestCluster, name: &str) -> String {
    Api::<Deployment>::namespaced(cluster.client(), cluster.namespace())
        .get(name)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap()[RUN_LABEL]
        .clone()
}

fn lease(cluster: &TestCluster) -> String {
    let name = cluster.unique_name("flyball-leader");
    cluster.track(
        ApiResource::erase::<Lease>(&()),
        Some(cluster.namespace().to_string()),
        name.clone(),
    );
    name
}

/// `flyball control` as `run` starts it on Kubernetes, with `flags`, leading once it says so.
/// A leading control service whose autoscalers are the FlyballAutoscalers labelled with this
/// test's `run` label (others may share the namespace on a real cluster).
async fn control_of_resources(cluster: &TestCluster, run: &str) -> Running {
    control(cluster, &resource_flags(cluster, run)).await
}

/// The flags of [`control_of_resources`].
fn resource_flags(cluster: &TestCluster, run: &str) -> Vec<String> {
    let selector = format!("{RUN_LABEL}={run}");
    let lease = lease(cluster);
    let source = [
        "--source",
        "kubernetes",
        "--namespace",
        cluster.namespace(),
        "--label-selector",
        &selector,
    ];
    flags(cluster, &lease, "a", &source)
}

async fn control(cluster: &TestCluster, flags: &[String]) -> Running {
    serve_once_leading(bind(cluster, flags).await).await
}

/// Serves `control` once it leads.
async fn serve_once_leading<A: Actuator>(control: Control<A>) -> Running {
    let mut leading = control.leading().clone();
    tokio::time::timeout(WAIT, leading.wait_for(|l| *l))
        .await
        .expect("the first replica leads")
        .unwrap();
    support::spawn(control).unwrap()
}

async fn bind(
    cluster: &TestCluster,
    flags: &[String],
) -> Control<flyball_control::actuator::KubeActuator> {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Control::bind_kubernetes(&support::args(&flags), cluster.client())
        .await
        .unwrap()
}

// === gateways ===

/// A load step, per 100 ms report: 200k input and 40k output tokens a second and 40 sequences
/// decoding, against hints of 2k, 400 and 8 per replica; latencies within the objectives.
fn step(sequence: u64) -> v1::ReportRequest {
    let mut ttft = Sketch::new();
    let mut tpot = Sketch::new();
    for i in 0..50 {
        ttft.record(250_000.0 + f64::from(i) * 1_000.0);
        tpot.record(20_000.0 + f64::from(i) * 100.0);
    }
    report(sequence, 50, 20_000, 4_000, (10, 40), &ttft, &tpot)
}

/// A trickle: one short request per report, nothing in flight.
fn idle(sequence: u64) -> v1::ReportRequest {
    let mut ttft = Sketch::new();
    ttft.record(80_000.0);
    report(sequence, 1, 10, 5, (0, 0), &ttft, &Sketch::new())
}

/// [`idle`], from a second gateway.
fn idle_from_another_gateway(sequence: u64) -> v1::ReportRequest {
    let mut report = idle(sequence);
    if let Some(reporter) = report.reporter.as_mut() {
        reporter.gateway = "envoy-1".into();
    }
    report
}

fn report(
    sequence: u64,
    ok: u64,
    input: u64,
    output: u64,
    (waiting, decoding): (u64, u64),
    ttft: &Sketch,
    tpot: &Sketch,
) -> v1::ReportRequest {
    v1::ReportRequest {
        reporter: Some(v1::Reporter {
            gateway: "envoy-0".into(),
            process_start_unix_ms: 1_700_000_000_000,
            filter_version: "test".into(),
        }),
        sequence,
        sent_at_unix_ms: 0,
        keys: vec![v1::KeyTelemetry {
            backend: "vllm".into(),
            model: "llama".into(),
            requests: Some(v1::RequestOutcomes {
                ok,
                ..Default::default()
            }),
            tokens: Some(v1::TokenUsage {
                input,
                output,
                ..Default::default()
            }),
            ttft_us: Some(v1::Sketch::from(ttft)),
            tpot_us: Some(v1::Sketch::from(tpot)),
            in_flight: Some(v1::InFlight {
                waiting_first_token: waiting,
                decoding,
            }),
            ..Default::default()
        }],
        dropped: None,
        held_ms: 0,
        connections_closed: false,
    }
}

/// One gateway reporting every 100 ms over gRPC until stopped.
struct Gateway {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<(u64, TelemetryServiceClient<Channel>)>,
}

impl Gateway {
    /// Starts reporting `make(sequence)` to `uri`, from sequence `first`.
    fn start(uri: String, first: u64, make: fn(u64) -> v1::ReportRequest) -> Gateway {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let channel = Channel::from_shared(uri).unwrap().connect().await.unwrap();
            let mut client = TelemetryServiceClient::new(channel);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut sequence = first;
            loop {
                tokio::select! {
                    _ = &mut stopped => return (sequence, client),
                    _ = tick.tick() => {}
                }
                // A replica going away mid-test refuses; the next tick goes on.
                let _ = client.report(make(sequence)).await;
                sequence += 1;
            }
        });
        Gateway {
            stop: Some(stop),
            task,
        }
    }

    /// Stops and returns the next sequence number. Its connection closes, as when Envoy exits.
    async fn stop(self) -> u64 {
        self.go_quiet().await.0
    }

    /// Stops reporting but keeps its connection open, as a gateway cut off by a partition
    /// does; returns the next sequence number and the connection.
    async fn go_quiet(mut self) -> (u64, TelemetryServiceClient<Channel>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap()
    }
}

/// `/v1/decisions` of the only pool.
async fn decisions(control: &Running) -> Vec<Value> {
    let (status, body) = control.get("/v1/decisions").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["pools"][0]["decisions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Evaluations behind `entries` (each entry folds `repeats` more).
fn evaluations<'a>(entries: impl IntoIterator<Item = &'a Value>) -> u64 {
    entries
        .into_iter()
        .map(|d| d["repeats"].as_u64().unwrap() + 1)
        .sum()
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_step_scales_the_deployment_through_its_scale_subresource() {
    let cluster = TestCluster::start().await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let config = config_file(&target, &ns, &target);
    let lease = lease(&cluster);
    let args = flags(
        &cluster,
        &lease,
        "a",
        &["--config", config.to_str().unwrap()],
    );
    let control = control(&cluster, &args).await;

    let gateway = Gateway::start(control.grpc_uri(), 1, step);
    wait_until("the Deployment at 3 replicas", || async {
        (spec_replicas(&cluster, &target).await == 3).then_some(())
    })
    .await;
    let scaled = wait_until("a ScaledUp Event", || async {
        events(&cluster, REASON_SCALED_UP, &target).await.pop()
    })
    .await;
    gateway.stop().await;

    let note = scaled.note.unwrap_or_default();
    assert!(
        note.starts_with(&format!(
            "scaled Deployment {ns}/{target} from 1 to 3: unified: 1 -> 3 (scale_up, step_limited)"
        )),
        "{note}"
    );
    assert_eq!(
        scaled.reporting_instance.as_deref(),
        Some(format!("a@{}", control.grpc).as_str())
    );
    let log = decisions(&control).await;
    let applied: Vec<_> = log.iter().filter(|d| d["applied"] == true).collect();
    assert_eq!(applied.len(), 1, "{log:?}");
    assert_eq!(
        (&applied[0]["from"], &applied[0]["to"]),
        (&json!(1), &json!(3))
    );

    if let Some(fake) = cluster.fake() {
        let requests = fake.requests();
        assert_eq!(
            scale_patches(&requests, &ns, &target),
            vec![(Some(200), json!({"spec": {"replicas": 3}}))]
        );
        let patch = requests
            .iter()
            .find(|r| r.is("PATCH", &scale_path(&ns, &target)))
            .unwrap();
        assert_eq!(
            patch.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        let events_path = format!("/apis/events.k8s.io/v1/namespaces/{ns}/events");
        let posted: Vec<_> = requests
            .iter()
            .filter(|r| r.is("POST", &events_path))
            .collect();
        assert_eq!(posted.len(), 1, "one change, one Event");
    }
    control.stop().await.unwrap();
    drop(config);
    cluster.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flyball_autoscalers_are_sized_and_told_how_it_went_and_bad_ones_why_not() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let good_spec: FlyballAutoscalerSpec = serde_json::from_value(spec(&target)).unwrap();
    let good = cluster
        .create(&FlyballAutoscaler::new(
            &cluster.unique_name("llama"),
            good_spec,
        ))
        .await
        .unwrap();
    let good_name = good.metadata.name.clone().unwrap();
    let mut bad_spec = spec(&cluster.unique_name("other"));
    bad_spec["pools"]["unified"]["minReplicas"] = json!(3);
    bad_spec["pools"]["unified"]["maxReplicas"] = json!(2);
    let bad_spec: FlyballAutoscalerSpec = serde_json::from_value(bad_spec).unwrap();
    let bad = cluster
        .create(&FlyballAutoscaler::new(
            &cluster.unique_name("bad"),
            bad_spec,
        ))
        .await
        .unwrap();
    let bad_name = bad.metadata.name.clone().unwrap();
    let run = good.metadata.labels.as_ref().unwrap()[RUN_LABEL].clone();
    let control = control_of_resources(&cluster, &run).await;
    let pools = control.pools().await.unwrap();
    assert_eq!(pools["pools"].as_array().unwrap().len(), 1, "{pools}");
    assert_eq!(pools["pools"][0]["autoscaler"], good_name.as_str());

    let gateway = Gateway::start(control.grpc_uri(), 1, step);
    let api = Api::<FlyballAutoscaler>::namespaced(cluster.client(), &ns);
    let status = wait_until("the FlyballAutoscaler's status after scaling", || async {
        let status = api.get(&good_name).await.unwrap().status?;
        let pool = status.pools.first()?;
        (pool.last_decision.as_ref()?.to == 3).then_some(status)
    })
    .await;
    gateway.stop().await;
    assert_eq!(spec_replicas(&cluster, &target).await, 3);
    assert_eq!(status.observed_generation, good.metadata.generation);
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    assert_eq!(
        condition(CONDITION_VALID),
        Some(("True".into(), "SpecValid".into()))
    );
    assert_eq!(
        condition(CONDITION_READY),
        Some(("True".into(), "Sizing".into()))
    );
    let pool = &status.pools[0];
    assert_eq!(pool.role, "unified");
    assert_eq!(pool.target, format!("Deployment {ns}/{target}"));
    assert_eq!((pool.current_replicas, pool.desired_replicas), (3, 3));
    let last = pool.last_decision.as_ref().unwrap();
    assert_eq!(
        (last.from, last.to, last.reason.as_str()),
        (1, 3, "StepLimited")
    );
    // The Event regards the autoscaler; the workload is the related object.
    let scaled = wait_until("a ScaledUp Event on the autoscaler", || async {
        events(&cluster, REASON_SCALED_UP, &good_name).await.pop()
    })
    .await;
    let related = scaled.related.unwrap();
    assert_eq!(related.name.as_deref(), Some(target.as_str()));
    assert_eq!(
        scaled.regarding.unwrap().uid,
        good.metadata.uid,
        "the Event names the autoscaler by uid"
    );

    let refused = wait_until("the invalid autoscaler's status", || async {
        api.get(&bad_name).await.unwrap().status
    })
    .await;
    let valid = refused
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_VALID)
        .unwrap();
    assert_eq!(
        (valid.status.as_str(), valid.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert_eq!(
        valid.message,
        "spec.pools.unified.maxReplicas = 2: must be >= minReplicas (3)"
    );
    assert_eq!(refused.observed_generation, bad.metadata.generation);

    if let Some(fake) = cluster.fake() {
        let status_path = format!(
            "/apis/flyball.dev/v1alpha1/namespaces/{ns}/flyballautoscalers/{good_name}/status"
        );
        let requests = fake.requests();
        let patch = requests
            .iter()
            .find(|r| r.is("PATCH", &status_path))
            .expect("a status PATCH");
        assert_eq!(
            patch.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(
            scale_patches(&requests, &ns, &target),
            vec![(Some(200), json!({"spec": {"replicas": 3}}))]
        );
    }
    control.stop().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// A FlyballAutoscaler whose target cannot be read says so on itself (not only in the service's
/// log and metrics): Ready=False and one Warning Event, not one per evaluation, until the
/// target can be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flyball_autoscaler_whose_target_is_missing_is_not_ready_until_it_appears() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = cluster.unique_name("vllm");
    let (name, run) = create_autoscaler(&cluster, spec(&target)).await;
    let control = control_of_resources(&cluster, &run).await;
    let api = Api::<FlyballAutoscaler>::namespaced(cluster.client(), &ns);
    let ready = || async {
        let status = api.get(&name).await.unwrap().status?;
        let ready = status
            .conditions
            .into_iter()
            .find(|c| c.type_ == CONDITION_READY)?;
        Some((ready.status, ready.reason, ready.message))
    };

    let failed_reads = format!(
        "flyball_actuator_errors_total{{namespace=\"{ns}\",pool=\"{target}\",kind=\"not_found\"}}"
    );
    wait_until("5 evaluations that could not read the target", || async {
        (control.metric(&failed_reads).await.unwrap() >= Some(5.0)).then_some(())
    })
    .await;
    let (status, reason, message) = ready().await.expect("a Ready condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "TargetUnreadable")
    );
    assert!(
        message.starts_with(&format!(
            "cannot read the replicas of Deployment {ns}/{target}: not found"
        )),
        "{message}"
    );
    let unreadable = events(&cluster, REASON_TARGET_UNREADABLE, &name).await;
    assert_eq!(unreadable.len(), 1, "{unreadable:?}");
    assert_eq!(unreadable[0].type_.as_deref(), Some("Warning"));
    assert_eq!(
        unreadable[0].note.as_deref(),
        Some(
            format!(
                "cannot read the replicas of Deployment {ns}/{target}, so it is not sized: \
                 not found"
            )
            .as_str()
        )
    );

    // Once it exists it is read when the hold on reads ends, and sized as usual.
    cluster.create_deployment(&target, 1).await.unwrap();
    if let Some(fake) = cluster.fake() {
        fake.set_ready_replicas("apps/v1", "Deployment", &ns, &target, 1)
            .unwrap();
    }
    wait_until("Ready=True once the target exists", || async {
        let (status, reason, _) = ready().await?;
        (status == "True").then_some(reason)
    })
    .await;
    assert_eq!(
        events(&cluster, REASON_TARGET_UNREADABLE, &name)
            .await
            .len(),
        1
    );
    control.stop().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// A replica that takes over builds on the status the last leader left: a condition that did
/// not change keeps its transition time (alerts and `kubectl wait` read it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_the_conditions_it_finds() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let spec: FlyballAutoscalerSpec = serde_json::from_value(spec(&target)).unwrap();
    let created = cluster
        .create(&FlyballAutoscaler::new(&cluster.unique_name("llama"), spec))
        .await
        .unwrap();
    let name = created.metadata.name.clone().unwrap();
    // As the previous leader left it.
    let since: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time =
        serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap();
    let left = flyball_k8s::FlyballAutoscalerStatus {
        observed_generation: created.metadata.generation,
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: CONDITION_VALID.into(),
            status: "True".into(),
            reason: "SpecValid".into(),
            message: "the spec passed validation".into(),
            observed_generation: created.metadata.generation,
            last_transition_time: since.clone(),
        }],
        pools: Vec::new(),
    };
    flyball_k8s::patch_status(&cluster.client(), &ns, &name, &left)
        .await
        .unwrap();
    let run = created.metadata.labels.as_ref().unwrap()[RUN_LABEL].clone();
    let control = control_of_resources(&cluster, &run).await;
    let api = Api::<FlyballAutoscaler>::namespaced(cluster.client(), &ns);
    let status = wait_until("the new leader's status", || async {
        let status = api.get(&name).await.unwrap().status?;
        (!status.pools.is_empty()).then_some(status)
    })
    .await;
    let valid = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_VALID)
        .unwrap();
    assert_eq!(valid.last_transition_time, since);
    control.stop().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// A dry run whose recommendation stays the same (KEDA's HPA may never follow it, inside its
/// tolerance) writes the autoscaler's status once, not at every evaluation: each write is a
/// watch event for every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_dry_run_recommendation_writes_the_status_once() {
    let cluster = TestCluster::start().await.unwrap();
    let test = "a_steady_dry_run_recommendation_writes_the_status_once";
    let Some(fake) = cluster.fake_or_skip(test, "its request log") else {
        return;
    };
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let mut dry = spec(&target);
    dry["dryRun"] = json!(true);
    let (name, run) = create_autoscaler(&cluster, dry).await;
    let control = control_of_resources(&cluster, &run).await;
    let gateway = Gateway::start(control.grpc_uri(), 1, step);
    let api = Api::<FlyballAutoscaler>::namespaced(cluster.client(), &ns);
    wait_until("the recommendation in the status", || async {
        let status = api.get(&name).await.unwrap().status?;
        let last = status.pools.first()?.last_decision.clone()?;
        ((last.from, last.to) == (1, 3)).then_some(())
    })
    .await;
    let status_path =
        format!("/apis/flyball.dev/v1alpha1/namespaces/{ns}/flyballautoscalers/{name}/status");
    let writes = || {
        fake.requests()
            .iter()
            .filter(|r| r.is("PATCH", &status_path))
            .count()
    };
    let log = decisions(&control).await;
    let before = (writes(), evaluations(&log), log.len());
    // Reports keep the pool dirty, so it is evaluated every 100 ms.
    let log = wait_until("20 more evaluations", || async {
        let log = decisions(&control).await;
        (evaluations(&log) >= before.1 + 20).then_some(log)
    })
    .await;
    gateway.stop().await;
    // The log folds repeated decisions, so its new entries are the changes of recommendation.
    let changes = log.len() - before.2;
    let written = writes() - before.0;
    assert!(
        written <= changes && changes < 10,
        "{written} status writes for {changes} changes in 20 evaluations"
    );
    assert_eq!(scale_patches(&fake.requests(), &ns, &target), vec![]);
    control.stop().await.unwrap();
    cluster.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_write_is_retried_and_lands_once() {
    let cluster = TestCluster::start().await.unwrap();
    let test = "a_conflicting_write_is_retried_and_lands_once";
    let Some(fake) = cluster.fake_or_skip(test, "an injected 409") else {
        return;
    };
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let config = config_file(&target, &ns, &target);
    let lease = lease(&cluster);
    let args = flags(
        &cluster,
        &lease,
        "a",
        &["--config", config.to_str().unwrap()],
    );
    let control = control(&cluster, &args).await;
    fake.conflict_next(Some(Verb::Patch), &scale_path(&ns, &target), 1);
    fake.clear_requests();

    let gateway = Gateway::start(control.grpc_uri(), 1, step);
    let requests = fake
        .wait_for(
            |r| {
                scale_patches(r, &ns, &target)
                    .iter()
                    .any(|(s, _)| *s == Some(200))
            },
            WAIT,
        )
        .await
        .unwrap();
    wait_until("a ScaledUp Event", || async {
        events(&cluster, REASON_SCALED_UP, &target).await.pop()
    })
    .await;
    gateway.stop().await;
    let body = json!({"spec": {"replicas": 3}});
    assert_eq!(
        scale_patches(&requests, &ns, &target),
        vec![(Some(409), body.clone()), (Some(200), body)]
    );
    assert_eq!(spec_replicas(&cluster, &target).await, 3);
    assert_eq!(events(&cluster, REASON_SCALED_UP, &target).await.len(), 1);
    control.stop().await.unwrap();
    drop(config);
    cluster.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_write_becomes_one_refusal_event_and_no_retry_storm() {
    let cluster = TestCluster::start().await.unwrap();
    let test = "a_forbidden_write_becomes_one_refusal_event_and_no_retry_storm";
    let Some(fake) = cluster.fake_or_skip(test, "an RBAC table that refuses /scale") else {
        return;
    };
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let config = config_file(&target, &ns, &target);
    let lease = lease(&cluster);
    let args = flags(
        &cluster,
        &lease,
        "a",
        &["--config", config.to_str().unwrap()],
    );
    let control = control(&cluster, &args).await;
    fake.deny(Verb::Patch, "apps", "deployments", Some("scale"));
    fake.clear_requests();

    let gateway = Gateway::start(control.grpc_uri(), 1, step);
    let refusal = wait_until("a ScaleRefused Event", || async {
        events(&cluster, REASON_SCALE_REFUSED, &target).await.pop()
    })
    .await;
    // Keep deciding: at least 20 more evaluations want 3 replicas and cannot have them.
    wait_until("20 evaluations after the refusal", || async {
        let log = decisions(&control).await;
        let failed = log.iter().filter(|d| !d["error"].is_null());
        (evaluations(failed) >= 20).then_some(())
    })
    .await;
    gateway.stop().await;

    let note = refusal.note.unwrap_or_default();
    assert!(
        note.starts_with(&format!("did not scale Deployment {ns}/{target} to 3: ")),
        "{note}"
    );
    assert!(note.contains("forbidden"), "{note}");
    assert_eq!(note.matches(&format!("{ns}/{target}")).count(), 1, "{note}");
    assert_eq!(refusal.type_.as_deref(), Some("Warning"));
    let requests = fake.requests();
    assert_eq!(
        scale_patches(&requests, &ns, &target),
        vec![(Some(403), json!({"spec": {"replicas": 3}}))],
        "one write, then a hold instead of a write per evaluation"
    );
    assert_eq!(
        events(&cluster, REASON_SCALE_REFUSED, &target).await.len(),
        1
    );
    assert_eq!(
        control
            .metric(&format!(
                "flyball_actuator_errors_total{{namespace=\"{ns}\",pool=\"{target}\",\
                 kind=\"forbidden\"}}"
            ))
            .await
            .unwrap()
            .map(|n| n >= 20.0),
        Some(true),
        "every evaluation that could not act is counted"
    );
    assert_eq!(spec_replicas(&cluster, &target).await, 1);
    control.stop().await.unwrap();
    drop(config);
    cluster.cleanup().await.unwrap();
}

/// A write refused for good sets Ready=False (ScaleFailed) on the autoscaler once, and the
/// condition stays as written hold after hold: the calls held back in between say so in their
/// text (with the backoff), and a status built on that text flapped between it and the API's
/// answer, a write per flap, each a watch event for every replica and a new message for whoever
/// watches the condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_good_sets_scale_failed_once_not_twice_a_hold() {
    let cluster = TestCluster::start().await.unwrap();
    let test = "a_write_refused_for_good_sets_scale_failed_once_not_twice_a_hold";
    let Some(fake) = cluster.fake_or_skip(test, "an RBAC table that refuses /scale") else {
        return;
    };
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let (name, run) = create_autoscaler(&cluster, spec(&target)).await;
    fake.deny(Verb::Patch, "apps", "deployments", Some("scale"));
    // Holds of 300 ms rather than 10 s and more, so that several pass within the test.
    let hold = Duration::from_millis(300);
    let actuator = KubeActuator::with_config(
        cluster.client(),
        "a",
        KubeActuatorConfig {
            hold_first: hold,
            hold_max: hold,
            ..KubeActuatorConfig::default()
        },
    );
    let control = bind(&cluster, &resource_flags(&cluster, &run))
        .await
        .with_actuator(Arc::new(actuator), false);
    let control = serve_once_leading(control).await;

    let gateway = Gateway::start(control.grpc_uri(), 1, step);
    // The first write and one after each of three holds, every evaluation between them (one
    // per 100 ms report) held back: all want 3 replicas and cannot have them.
    let refused = |r: &[RecordedRequest]| {
        scale_patches(r, &ns, &target)
            .iter()
            .filter(|(status, _)| *status == Some(403))
            .count()
    };
    let requests = fake.wait_for(|r| refused(r) >= 4, WAIT).await.unwrap();
    gateway.stop().await;
    let patches = scale_patches(&requests, &ns, &target);
    assert!(
        patches.iter().all(|(status, _)| *status != Some(200)),
        "{patches:?}"
    );

    let status_path =
        format!("/apis/flyball.dev/v1alpha1/namespaces/{ns}/flyballautoscalers/{name}/status");
    let ready_written: Vec<(String, String)> = requests
        .iter()
        .filter(|r| r.is("PATCH", &status_path))
        .filter_map(|r| {
            let conditions = r.body.as_ref()?["status"]["conditions"].as_array()?.clone();
            let ready = conditions.iter().find(|c| c["type"] == CONDITION_READY)?;
            Some((
                ready["reason"].as_str()?.to_owned(),
                ready["message"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let failed = ready_written
        .iter()
        .position(|(reason, _)| reason == "ScaleFailed")
        .expect("a ScaleFailed status");
    assert_eq!(
        ready_written.len() - failed,
        1,
        "status writes from the first ScaleFailed on, over 3 holds: {:#?}",
        &ready_written[failed..]
    );
    let (_, message) = &ready_written[failed];
    assert!(
        message.starts_with(&format!(
            "cannot set the replicas of Deployment {ns}/{target}: "
        )),
        "{message}"
    );
    assert!(message.contains("forbidden"), "{message}");
    assert!(!message.contains("held"), "{message}");
    assert_eq!(
        message.matches(&format!("{ns}/{target}")).count(),
        1,
        "the target named once: {message}"
    );
    // The decision log folds the whole refusal, first answer and holds alike, into one entry:
    // it alternated between the API's answer and the held text, two entries per hold.
    let log = decisions(&control).await;
    let refused: Vec<&Value> = log.iter().filter(|d| !d["error"].is_null()).collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert!(evaluations(refused.iter().copied()) >= 4, "{refused:#?}");
    let error = refused[0]["error"].as_str().unwrap();
    assert_eq!(
        error.matches(&format!("{ns}/{target}")).count(),
        1,
        "the target named once: {error}"
    );
    control.stop().await.unwrap();
    cluster.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_scales_and_the_follower_takes_over_when_it_steps_down() {
    let cluster = TestCluster::start().await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let config = config_file(&target, &ns, &target);
    let lease = lease(&cluster);
    let config_flag = ["--config", config.to_str().unwrap()];
    let a = control(&cluster, &flags(&cluster, &lease, "a", &config_flag)).await;
    let b =
        support::spawn(bind(&cluster, &flags(&cluster, &lease, "b", &config_flag)).await).unwrap();
    assert_eq!(a.pools().await.unwrap()["leading"], true);
    assert_eq!(b.pools().await.unwrap()["leading"], false);

    // The gateway reaches b only; b forwards to a, which leads.
    let gateway = Gateway::start(b.grpc_uri(), 1, step);
    wait_until("the leader's scale-up to 3", || async {
        (spec_replicas(&cluster, &target).await == 3).then_some(())
    })
    .await;
    // b decides as well, on the same reports, and sets nothing.
    wait_until("10 decisions of the follower after the change", || async {
        let log = decisions(&b).await;
        let at_3 = log.iter().filter(|d| d["from"] == 3);
        (evaluations(at_3) >= 10).then_some(())
    })
    .await;
    assert!(
        decisions(&b).await.iter().all(|d| d["applied"] == false),
        "a follower never applies"
    );
    let scaled = events(&cluster, REASON_SCALED_UP, &target).await;
    assert_eq!(scaled.len(), 1, "{scaled:?}");
    assert_eq!(
        scaled[0].reporting_instance.as_deref(),
        Some(format!("a@{}", a.grpc).as_str())
    );
    if let Some(fake) = cluster.fake() {
        assert_eq!(
            scale_patches(&fake.requests(), &ns, &target),
            vec![(Some(200), json!({"spec": {"replicas": 3}}))]
        );
    }

    // a goes away and gives up the Lease: b leads, and scales on.
    a.stop().await.unwrap();
    wait_until("the new leader's scale-up to 5", || async {
        (spec_replicas(&cluster, &target).await == 5).then_some(())
    })
    .await;
    gateway.stop().await;
    assert_eq!(b.pools().await.unwrap()["leading"], true);
    let by_b = wait_until("b's ScaledUp Event", || async {
        events(&cluster, REASON_SCALED_UP, &target)
            .await
            .into_iter()
            .find(|e| e.reporting_instance.as_deref() == Some(&format!("b@{}", b.grpc)))
    })
    .await;
    assert!(
        by_b.note
            .unwrap_or_default()
            .starts_with(&format!("scaled Deployment {ns}/{target} from 3 to 5")),
    );
    if let Some(fake) = cluster.fake() {
        assert_eq!(
            scale_patches(&fake.requests(), &ns, &target),
            vec![
                (Some(200), json!({"spec": {"replicas": 3}})),
                (Some(200), json!({"spec": {"replicas": 5}})),
            ]
        );
    }
    b.stop().await.unwrap();
    drop(config);
    cluster.cleanup().await.unwrap();
}

/// A follower that stops reading its follow stream (an overloaded node) fills its HTTP/2
/// window, and graceful shutdown waits for that stream until the drain gives up on it. The
/// leader must give the Lease up as soon as it stops acting, not after that drain: every rollout
/// of the leader would otherwise leave the pools without one for seconds. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_gives_the_lease_up_before_its_servers_have_drained() {
    use flyball_proto::grpc::replication_service_client::ReplicationServiceClient;

    let cluster = TestCluster::start().await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let config = config_file(&target, &ns, &target);
    let lease = lease(&cluster);
    let config_flag = ["--config", config.to_str().unwrap()];
    let a = control(&cluster, &flags(&cluster, &lease, "a", &config_flag)).await;
    let b =
        support::spawn(bind(&cluster, &flags(&cluster, &lease, "b", &config_flag)).await).unwrap();
    // A follower with a small window that opens its stream and then reads nothing.
    let channel = tonic::transport::Endpoint::from_shared(a.grpc_uri())
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let _stalled = ReplicationServiceClient::new(channel)
        .follow(v1::FollowRequest {
            follower: "stalled".into(),
        })
        .await
        .unwrap();
    a.wait_metric("flyball_replication_followers", 2.0, WAIT)
        .await
        .unwrap();
    // Reports enough to fill the stalled follower's window many times over.
    let mut gateway = TelemetryServiceClient::connect(a.grpc_uri()).await.unwrap();
    for sequence in 1..=200 {
        gateway.report(step(sequence)).await.unwrap();
    }
    drop(gateway);

    let a_holds = format!("a@{}", a.grpc);
    let stopping = tokio::spawn(a.stop());
    let leases = Api::<Lease>::namespaced(cluster.client(), &ns);
    wait_until("a to give the Lease up", || async {
        let holder = leases.get(&lease).await.ok()?.spec?.holder_identity;
        (holder.as_deref() != Some(a_holds.as_str())).then_some(())
    })
    .await;
    assert!(
        !stopping.is_finished(),
        "the Lease was given up only once a had stopped serving"
    );
    stopping.await.unwrap().unwrap();
    wait_until("b to lead", || async {
        (b.pools().await.ok()?["leading"] == true).then_some(())
    })
    .await;
    b.stop().await.unwrap();
    drop(config);
    cluster.cleanup().await.unwrap();
}

/// A write still being retried when leadership goes is dropped, not sent again: a retry landing
/// after the hand-over could undo what the new leader set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_when_leadership_goes_is_abandoned() {
    let cluster = TestCluster::start().await.unwrap();
    let test = "a_write_in_flight_when_leadership_goes_is_abandoned";
    let Some(fake) = cluster.fake_or_skip(test, "a stalled /scale write") else {
        return;
    };
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let config = config_file(&target, &ns, &target);
    // Leadership as the test says, not from a Lease, so it can go at a chosen moment.
    let (leading_tx, leading) = watch::channel(true);
    let (_leader_tx, leader) = watch::channel(None);
    let args = flags(
        &cluster,
        "unused",
        "a",
        &["--config", config.to_str().unwrap()],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let control = Control::bind(&support::args(&args))
        .await
        .unwrap()
        .with_actuator(Arc::new(KubeActuator::new(cluster.client(), "a")), false)
        .with_leadership(Leadership::from_channels("a", leading, leader));
    let control = support::spawn(control).unwrap();
    // Each attempt is held 2 s then answered 504: the retry after the first would land.
    let path = scale_path(&ns, &target);
    let stall = Duration::from_secs(2);
    fake.stall_next(Some(Verb::Patch), &path, 1, stall);

    let gateway = Gateway::start(control.grpc_uri(), 1, step);
    fake.wait_for(|r| !scale_patches(r, &ns, &target).is_empty(), WAIT)
        .await
        .unwrap();
    leading_tx.send_replace(false);
    let sent = scale_patches(&fake.requests(), &ns, &target).len();
    // Past the stalled attempt's answer and the retry that would follow it.
    tokio::time::sleep(stall * 2).await;
    gateway.stop().await;

    let patches = scale_patches(&fake.requests(), &ns, &target);
    assert_eq!(
        (sent, patches.len()),
        (1, 1),
        "no attempt after leadership went: {patches:?}"
    );
    assert_eq!(spec_replicas(&cluster, &target).await, 1);
    let log = decisions(&control).await;
    assert!(log.iter().all(|d| d["applied"] == false), "{log:?}");
    assert!(
        log.iter()
            .any(|d| d["error"].as_str().is_some_and(|e| e.contains("abandoned"))),
        "{log:?}"
    );
    let abandoned = format!(
        "flyball_actuator_errors_total{{namespace=\"{ns}\",pool=\"{target}\",kind=\"abandoned\"}}"
    );
    assert_eq!(control.metric(&abandoned).await.unwrap(), Some(1.0));
    control.stop().await.unwrap();
    drop(config);
    cluster.cleanup().await.unwrap();
}

/// A Deployment (or a name with nothing behind it), one autoscaler for it in a `--config` file,
/// and `flyball control` leading on it with `extra` flags, the request log cleared after start.
struct Scene {
    cluster: TestCluster,
    ns: String,
    target: String,
    config: ConfigFile,
    control: Running,
}

impl Scene {
    /// With a Deployment of `replicas`, all ready.
    async fn with_deployment(replicas: i32, extra: &[&str]) -> Scene {
        let cluster = TestCluster::start().await.unwrap();
        let target = deployment(&cluster, "vllm", replicas, replicas).await;
        Scene::start(cluster, target, extra).await
    }

    async fn start(cluster: TestCluster, target: String, extra: &[&str]) -> Scene {
        let ns = cluster.namespace().to_string();
        let config = config_file(&target, &ns, &target);
        let lease = lease(&cluster);
        let mut rest = vec!["--config", config.to_str().unwrap()];
        rest.extend_from_slice(extra);
        let args = flags(&cluster, &lease, "a", &rest);
        // The request log is kept from the start: the first read of `/scale` can come before
        // `control` returns, and a write at start-up must count against `assert_untouched`.
        let control = control(&cluster, &args).await;
        Scene {
            cluster,
            ns,
            target,
            config,
            control,
        }
    }

    /// Waits for `n` evaluations that hold by `rule`; asserts they all stayed at `replicas`
    /// and that nothing was written to the target.
    async fn assert_holds(&self, rule: &str, n: u64, replicas: u32) {
        let log = wait_until(&format!("{n} evaluations holding by {rule}"), || async {
            let log = decisions(&self.control).await;
            let held = log.iter().filter(|d| d["rule"] == rule);
            (evaluations(held) >= n).then_some(log)
        })
        .await;
        assert!(log.iter().all(|d| d["to"] == replicas), "{log:?}");
        self.assert_untouched(replicas).await;
    }

    /// The target still has `replicas`, with no scale-down Event and no write to `/scale`.
    async fn assert_untouched(&self, replicas: u32) {
        let want = i32::try_from(replicas).unwrap();
        assert_eq!(spec_replicas(&self.cluster, &self.target).await, want);
        assert!(
            events(&self.cluster, REASON_SCALED_DOWN, &self.target)
                .await
                .is_empty()
        );
        if let Some(fake) = self.cluster.fake() {
            assert_eq!(
                scale_patches(&fake.requests(), &self.ns, &self.target),
                vec![]
            );
        }
    }

    /// Waits until ingest has merged `n` reports.
    async fn reports_merged(&self, n: f64) {
        wait_until(&format!("{n} reports merged"), || async {
            let merged = self
                .control
                .metric("flyball_ingest_reports_total")
                .await
                .unwrap();
            (merged >= Some(n)).then_some(())
        })
        .await;
    }

    async fn finish(self) {
        self.control.stop().await.unwrap();
        drop(self.config);
        self.cluster.cleanup().await.unwrap();
    }
}

/// An API server failing with 500s is retried within each call, then left alone for a backoff,
/// not asked again at every evaluation (ten a second under load, per pool, per replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_back_off_between_evaluations() {
    let scene = Scene::with_deployment(1, &[]).await;
    let test = "transient_failures_back_off_between_evaluations";
    let Some(fake) = scene.cluster.fake_or_skip(test, "injected 500s") else {
        return scene.finish().await;
    };
    let path = scale_path(&scene.ns, &scene.target);
    fake.fail_next(Some(Verb::Get), &path, 10_000, 500);
    let gateway = Gateway::start(scene.control.grpc_uri(), 1, step);
    let errors = format!(
        "flyball_actuator_errors_total{{namespace=\"{}\",pool=\"{}\",kind=\"transient\"}}",
        scene.ns, scene.target
    );
    let failed_reads = || {
        fake.requests()
            .iter()
            .filter(|r| r.is("GET", &path) && r.status == Some(500))
            .count()
    };
    let counted = |n: f64| {
        let (control, errors) = (&scene.control, &errors);
        async move { (control.metric(errors).await.unwrap() >= Some(n)).then_some(()) }
    };
    wait_until("the first failed read", || counted(1.0)).await;
    let first = failed_reads();
    wait_until("3 more evaluations that could not read", || counted(4.0)).await;
    let more = failed_reads() - first;
    gateway.stop().await;
    // One call tries 4 times; without a backoff each of the 3 evaluations makes a call (12).
    assert!(
        more <= 4,
        "{more} more failed reads over 3 evaluations after {first}"
    );
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_telemetry_never_scales_down() {
    let scene = Scene::with_deployment(4, &[]).await;
    // A few light reports, inside the restart hold, then silence.
    let gateway = Gateway::start(scene.control.grpc_uri(), 1, idle);
    scene.reports_merged(3.0).await;
    gateway.stop().await;
    // Silent for well past the stable window (2 s) and the restart hold: 30 evaluations 200 ms
    // apart see stale telemetry and hold.
    scene.assert_holds("staleTelemetryHold", 30, 4).await;
    scene.finish().await;
}

/// `--dry-run` on a cluster: decisions start from the replicas that really run (read through
/// `/scale`), are recorded, and are never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_decides_on_the_real_replicas_and_writes_none() {
    let scene = Scene::with_deployment(3, &["--dry-run"]).await;
    let gateway = Gateway::start(scene.control.grpc_uri(), 1, step);
    let recommended = wait_until("a scale-up recommendation", || async {
        decisions(&scene.control)
            .await
            .into_iter()
            .find(|d| d["to"].as_u64() > d["from"].as_u64())
    })
    .await;
    gateway.stop().await;
    // From the 3 that run, not from a made-up count; within the step limit of 2.
    assert_eq!(
        (
            &recommended["from"],
            &recommended["to"],
            &recommended["applied"]
        ),
        (&json!(3), &json!(5), &json!(false)),
        "{recommended}"
    );
    scene.assert_untouched(3).await;
    if let Some(fake) = scene.cluster.fake() {
        assert!(
            fake.requests()
                .iter()
                .any(|r| r.is("GET", &scale_path(&scene.ns, &scene.target))),
            "replicas were read through /scale"
        );
    }
    scene.finish().await;
}

/// A target that does not exist is that pool's problem: the replica stays ready, so gateways
/// keep reporting to it for every other pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_target_fails_its_pool_not_readiness() {
    let cluster = TestCluster::start().await.unwrap();
    let target = cluster.unique_name("no-such-deployment");
    let scene = Scene::start(cluster, target, &[]).await;
    wait_until("the failed read of the missing target counted", || async {
        let (_, metrics) = scene.control.get("/metrics").await.unwrap();
        metrics
            .lines()
            .any(|l| l.starts_with("flyball_actuator_errors_total{") && l.contains(&scene.target))
            .then_some(())
    })
    .await;
    assert_eq!(
        scene.control.get("/readyz").await.unwrap(),
        (200, "ok\n".into())
    );
    scene.finish().await;
}

/// Two gateways feed an idle pool and one goes quiet while the other keeps reporting: the
/// telemetry is current but may be short of the quiet gateway's load, so the pool holds where
/// one gateway's fresh idle telemetry scales it down (the test below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_gone_quiet_holds_scale_down_while_the_others_report() {
    let scene = Scene::with_deployment(4, &[]).await;
    let quiet = Gateway::start(scene.control.grpc_uri(), 1, idle_from_another_gateway);
    let live = Gateway::start(scene.control.grpc_uri(), 1, idle);
    scene.reports_merged(6.0).await;
    let (_, connection) = quiet.go_quiet().await;
    // Past the stable window (2 s) and the restart hold, 30 evaluations see the quiet gateway.
    scene.assert_holds("silentReporterHold", 30, 4).await;
    live.stop().await;
    drop(connection);
    scene.finish().await;
}

/// A gateway that exits (its connection closes, as Envoy's do) is gone, not missing: the pool
/// scales down on the others' fresh idle telemetry, as it would without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_exits_does_not_hold_scale_down_while_the_others_report() {
    let scene = Scene::with_deployment(4, &[]).await;
    let exits = Gateway::start(scene.control.grpc_uri(), 1, idle_from_another_gateway);
    let live = Gateway::start(scene.control.grpc_uri(), 1, idle);
    scene.reports_merged(6.0).await;
    exits.stop().await;
    wait_until("the Deployment at 1 replica", || async {
        (spec_replicas(&scene.cluster, &scene.target).await == 1).then_some(())
    })
    .await;
    live.stop().await;
    scene.finish().await;
}

/// The same pool as above with fresh idle telemetry does scale down: the stale test holds
/// because the telemetry is stale, not because this configuration never scales down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_idle_telemetry_scales_down_after_the_stable_window() {
    let scene = Scene::with_deployment(4, &[]).await;
    let gateway = Gateway::start(scene.control.grpc_uri(), 1, idle);
    wait_until("the Deployment at 1 replica", || async {
        (spec_replicas(&scene.cluster, &scene.target).await == 1).then_some(())
    })
    .await;
    gateway.stop().await;
    if let Some(fake) = scene.cluster.fake() {
        assert_eq!(
            scale_patches(&fake.requests(), &scene.ns, &scene.target),
            vec![(Some(200), json!({"spec": {"replicas": 1}}))]
        );
    }
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpa_on_the_same_target_is_reported_once() {
    let cluster = TestCluster::start().await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": cluster.unique_name("hpa")},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": 1,
            "maxReplicas": 1
        }
    }))
    .unwrap();
    let hpa = cluster.create(&hpa).await.unwrap();
    let hpa_name = hpa.metadata.name.unwrap();
    let config = config_file(&target, &ns, &target);
    let lease = lease(&cluster);
    let args = flags(
        &cluster,
        &lease,
        "a",
        &["--config", config.to_str().unwrap()],
    );
    let control = control(&cluster, &args).await;

    let warnings = wait_until("the warning in /v1/pools", || async {
        let pools = control.pools().await.unwrap();
        pools["pools"][0]["warnings"].as_array().cloned()
    })
    .await;
    assert_eq!(
        warnings,
        vec![json!(format!(
            "HorizontalPodAutoscaler {ns}/{hpa_name} also scales this target; it and flyball \
             will undo each other's changes unless flyball only recommends (dry run, as with \
             KEDA)"
        ))]
    );
    let event = wait_until("an HPAConflict Event", || async {
        events(&cluster, REASON_HPA_CONFLICT, &target).await.pop()
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    // More evaluations, no more Events about it.
    wait_until("10 more evaluations", || async {
        (evaluations(&decisions(&control).await) >= 10).then_some(())
    })
    .await;
    assert_eq!(
        events(&cluster, REASON_HPA_CONFLICT, &target).await.len(),
        1
    );
    control.stop().await.unwrap();
    drop(config);
    cluster.cleanup().await.unwrap();
}

#[tokio::test]
async fn kubernetes_flags_that_cannot_work_are_refused_before_anything_starts() {
    for (flags, message) in [
        (
            &["--source", "kubernetes", "--config", "/etc/flyball.yaml"][..],
            "--config = /etc/flyball.yaml: not with --source kubernetes (autoscalers come from \
             FlyballAutoscalers)",
        ),
        (
            &[
                "--config",
                "/etc/flyball.yaml",
                "--lease-duration",
                "1500ms",
            ][..],
            "--lease-duration = 1.5s: must be whole seconds, at least 2s",
        ),
    ] {
        let error = flyball_control::run(support::args(flags), std::future::pending())
            .await
            .unwrap_err();
        assert!(error.is_usage(), "{error}");
        assert_eq!(error.to_string(), message);
    }
}

#[tokio::test]
async fn a_label_selector_the_api_server_cannot_parse_is_refused_naming_the_flag() {
    // The API server answers 400 to every list and watch with this selector, for as long as the
    // service runs: retried "while serving", /readyz never turns ready and the only word is the
    // API server's parse error, which names no flag.
    let cluster = TestCluster::start().await.unwrap();
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let lease = lease(&cluster);
    let source = [
        "--source",
        "kubernetes",
        "--namespace",
        cluster.namespace(),
        "--label-selector",
        "team in (a",
    ];
    let flags = flags(&cluster, &lease, "a", &source);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let error = match Control::bind_kubernetes(&support::args(&flags), cluster.client()).await {
        Ok(_) => String::new(),
        Err(error) => error.to_string(),
    };
    cluster.cleanup().await.unwrap();
    assert!(
        error.starts_with("--label-selector = "),
        "refused as {error:?} (\"\": accepted)"
    );
}

#[tokio::test]
async fn kubernetes_only_flags_are_refused_with_a_file_source_rather_than_ignored() {
    // `--config` is refused with `--source kubernetes`; the reverse, a namespace or label
    // selector given while autoscalers come from a file (`--source kubernetes` forgotten), is
    // dropped without a word and the service runs the file's autoscalers, or none.
    let config = config_file(
        &format!("ignored-{}", std::process::id()),
        "default",
        "llama",
    );
    let path = config.0.to_str().unwrap().to_owned();
    for (flag, value) in [("--namespace", "serving"), ("--label-selector", "team=a")] {
        let args = support::args(&["--config", &path, "--dry-run", flag, value]);
        let outcome = tokio::time::timeout(
            Duration::from_secs(2),
            flyball_control::run(args, std::future::pending()),
        )
        .await;
        let error = match outcome {
            Err(_) => String::new(),
            Ok(Ok(())) => String::new(),
            Ok(Err(error)) => error.to_string(),
        };
        assert!(
            error.starts_with(&format!("{flag} = {value}: ")),
            "{flag} with --source file: refused as {error:?} (\"\": ignored, serving)"
        );
    }
}

#[tokio::test]
async fn an_advertise_address_followers_cannot_use_is_refused_naming_the_flag() {
    // Published in the Lease as `identity@addr`; followers take `host:port` and nothing else
    // (`forward::leader_uri`). Without a port, or with a scheme, they find no leader address
    // while this replica leads and drop what they would forward (`no_leader`), and the only
    // word is a debug line on each follower: the start-up warning about a missing address is
    // given only when no `@` is published at all.
    let cluster = TestCluster::start().await.unwrap();
    for addr in ["10.0.0.7", "http://10.0.0.7:9090"] {
        let lease = lease(&cluster);
        let flags = flags(&cluster, &lease, "a", &["--advertise-addr", addr]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let error = match Control::bind_kubernetes(&support::args(&flags), cluster.client()).await {
            Ok(_) => String::new(),
            Err(error) => error.to_string(),
        };
        assert!(
            error.starts_with(&format!("--advertise-addr = {addr}: ")),
            "--advertise-addr {addr}: refused as {error:?} (\"\": accepted)"
        );
    }
    cluster.cleanup().await.unwrap();
}

#[tokio::test]
async fn tls_without_a_ca_is_refused_where_replicas_forward_to_a_leader() {
    let cluster = TestCluster::start().await.unwrap();
    let tls = |name: &str| format!("{}/tests/tls/{name}", env!("CARGO_MANIFEST_DIR"));
    let (cert, key) = (tls("replica.crt"), tls("replica.key"));
    let args = [
        "--grpc-tls-cert",
        cert.as_str(),
        "--grpc-tls-key",
        key.as_str(),
    ];
    let error = Control::bind_kubernetes(&support::args(&args), cluster.client())
        .await
        .unwrap_err();
    assert!(error.is_usage(), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("--grpc-tls-ca = (none): required with --grpc-tls-cert on Kubernetes"),
        "{error}"
    );
    cluster.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscalers_follow_flyball_autoscalers_as_they_come_and_change() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let ns = cluster.namespace().to_string();
    let target = deployment(&cluster, "vllm", 1, 1).await;
    let run = run_label(&cluster, &target).await;
    let control = control_of_resources(&cluster, &run).await;
    assert_eq!(control.pools().await.unwrap()["pools"], json!([]));

    // Created while serving: seen through the watch, and sized.
    let spec: FlyballAutoscalerSpec = serde_json::from_value(spec(&target)).unwrap();
    let name = cluster.unique_name("llama");
    cluster
        .create(&FlyballAutoscaler::new(&name, spec))
        .await
        .unwrap();
    wait_until("the new autoscaler's pool", || async {
        let pools = control.pools().await.unwrap();
        (pools["pools"][0]["autoscaler"] == name.as_str()).then_some(())
    })
    .await;
    let gateway = Gateway::start(control.grpc_uri(), 1, step);
    wait_until("the Deployment at 3 replicas", || async {
        (spec_replicas(&cluster, &target).await == 3).then_some(())
    })
    .await;

    // Broken by an edit: its pool goes, and its status says why.
    let api = Api::<FlyballAutoscaler>::namespaced(cluster.client(), &ns);
    let edit = json!({"spec": {"pools": {"unified": {"maxReplicas": 0}}}});
    api.patch(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&edit),
    )
    .await
    .unwrap();
    wait_until("the pool to go", || async {
        let pools = control.pools().await.unwrap();
        (pools["pools"] == json!([])).then_some(())
    })
    .await;
    let status = wait_until("Valid=False on the edited autoscaler", || async {
        let status = api.get(&name).await.unwrap().status?;
        let valid = status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_VALID)?;
        (valid.status == "False").then_some(status)
    })
    .await;
    gateway.stop().await;
    let valid = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_VALID)
        .unwrap();
    assert_eq!(valid.reason, "InvalidSpec");
    assert_eq!(
        valid.message,
        "spec.pools.unified.maxReplicas = 0: must be >= minReplicas (1)"
    );
    assert_eq!(status.pools, vec![]);
    assert_eq!(spec_replicas(&cluster, &target).await, 3, "left as it was");
    if let Some(fake) = cluster.fake() {
        // Changes came through one watch, not by listing again and again.
        let reads: Vec<Verb> = fake
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/flyballautoscalers"))
            .map(|r| r.verb)
            .collect();
        assert_eq!(
            reads,
            [Verb::List, Verb::List, Verb::List, Verb::Watch],
            "the label selector's check, the start's list, the watcher's list, its watch"
        );
    }
    control.stop().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// A Lease read that fails (a 429, an API server restarting) says nothing about who leads: a
/// follower keeps forwarding to the leader it read last, rather than holding every report back
/// until the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_read_that_fails_keeps_the_leader_read_last() {
    let cluster = TestCluster::start().await.unwrap();
    let test = "a_lease_read_that_fails_keeps_the_leader_read_last";
    let Some(fake) = cluster.fake_or_skip(test, "failed Lease reads") else {
        return;
    };
    let ns = cluster.namespace().to_string();
    let name = lease(&cluster);
    let poll = Duration::from_millis(100);
    let elect = async |who: &str| {
        let identity =
            flyball_control::forward::identity(who, Some(&format!("{who}.flyball:9090")));
        let config = flyball_k8s::LeaseConfig::new(&ns, &name, &identity);
        Leadership::elect(cluster.client(), &config, poll)
            .await
            .unwrap()
    };
    let a = elect("a").await;
    wait_until("a to lead", || async {
        (*a.leading.borrow()).then_some(())
    })
    .await;
    let b = elect("b").await;
    let mut leader = b.leader.clone();
    wait_until("b to read a as the leader", || {
        let read = leader.borrow().clone();
        async move { read }
    })
    .await;
    assert_eq!(
        *leader.borrow_and_update(),
        Some("http://a.flyball:9090".to_string())
    );

    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}");
    fake.clear_requests();
    fake.fail_next(Some(Verb::Get), &path, 10, 500);
    wait_until("ten failed Lease reads", || async {
        let failed = fake
            .requests()
            .iter()
            .filter(|r| r.is("GET", &path) && r.status == Some(500))
            .count();
        (failed >= 10).then_some(())
    })
    .await;
    assert!(
        !leader.has_changed().unwrap(),
        "b forgot the leader on a failed read: {:?}",
        *leader.borrow()
    );
    b.step_down().await;
    a.step_down().await;
    cluster.cleanup().await.unwrap();
}

/// A FlyballAutoscaler stored with a value flyball cannot read (an integer over u32, which the
/// API server took before the CRD bounded it, as it took any `format: uint32`) is refused on its
/// own, `Valid=False` naming the field, and leaves the others alone: a typed list failed whole,
/// and no autoscaler ran. A real API server with the current CRD refuses the object instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_resource_is_refused_alone_naming_the_field() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.ensure_crd(&FlyballAutoscaler::crd()).await.unwrap();
    let ns = cluster.namespace().to_string();
    let good_target = deployment(&cluster, "vllm", 1, 1).await;
    let bad_target = deployment(&cluster, "other", 1, 1).await;
    let run = run_label(&cluster, &good_target).await;
    let good_spec: FlyballAutoscalerSpec = serde_json::from_value(spec(&good_target)).unwrap();
    let good = cluster.unique_name("good");
    cluster
        .create(&FlyballAutoscaler::new(&good, good_spec))
        .await
        .unwrap();
    let mut bad_spec = spec(&bad_target);
    bad_spec["selector"]["backend"] = json!("other");
    bad_spec["pools"]["unified"]["maxReplicas"] = json!(4_294_967_296_u64);
    let bad = cluster.unique_name("bad");
    let resource = ApiResource::erase::<FlyballAutoscaler>(&());
    let untyped =
        Api::<kube::api::DynamicObject>::namespaced_with(cluster.client(), &ns, &resource);
    let object: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "flyball.dev/v1alpha1",
        "kind": "FlyballAutoscaler",
        "metadata": {"name": bad, "labels": {RUN_LABEL: run}},
        "spec": bad_spec,
    }))
    .unwrap();
    match untyped.create(&Default::default(), &object).await {
        Ok(_) => cluster.track(resource, Some(ns.clone()), bad.clone()),
        Err(kube::Error::Api(status)) if status.code == 422 => {
            // The schema's bound at work: nothing unreadable can be stored.
            assert!(status.message.contains("maxReplicas"), "{status:?}");
            cluster.cleanup().await.unwrap();
            return;
        }
        Err(error) => panic!("{error}"),
    }

    let control = control_of_resources(&cluster, &run).await;
    wait_until(
        "the good autoscaler's pool beside the unreadable one",
        || async {
            let pools = control.pools().await.unwrap();
            (pools["pools"][0]["autoscaler"] == good.as_str()).then_some(())
        },
    )
    .await;
    let message = wait_until("Valid=False on the unreadable resource", || async {
        let object = untyped.get(&bad).await.unwrap();
        let conditions = object
            .data
            .pointer("/status/conditions")?
            .as_array()?
            .clone();
        conditions
            .iter()
            .find(|c| c["type"] == CONDITION_VALID && c["status"] == "False")
            .map(|c| c["message"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    assert!(
        message.starts_with("spec.pools.unified.maxReplicas = 4294967296: "),
        "{message}"
    );
    control.stop().await.unwrap();
    cluster.cleanup().await.unwrap();
}
