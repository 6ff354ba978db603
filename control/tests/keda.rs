//! KEDA's external scaler through its real wire: a client generated from the same
//! `externalscaler.proto` against the real gRPC server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flyball_control::config::ScaleTarget;
use flyball_control::controller::{Actuator, ActuatorError, PoolReplicas};
use flyball_control::keda::externalscaler::external_scaler_client::ExternalScalerClient;
use flyball_control::keda::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use flyball_proto::grpc::telemetry_service_client::TelemetryServiceClient;
use flyball_proto::v1;
use support::Error;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const CONFIG: &str = r#"
autoscalers:
  - name: llama
    namespace: serving
    spec:
      selector: { backend: vllm }
      scaleToZero: true
      pools:
        unified:
          scaleTargetRef: { name: llama }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
  - name: qwen
    namespace: serving
    spec:
      selector: { model: qwen }
      pools:
        prefill: { scaleTargetRef: { name: qwen-prefill }, maxReplicas: 4 }
        decode: { scaleTargetRef: { name: qwen-decode }, maxReplicas: 4 }
      slo: { ttft: 500ms, tpot: 50ms }
"#;

/// A workload scaled to zero (as KEDA leaves it), whose replicas are ready as soon as asked for.
#[derive(Default)]
struct ScaledToZero {
    replicas: Mutex<HashMap<String, u32>>,
}

impl Actuator for ScaledToZero {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        let n = self
            .replicas
            .lock()
            .map_or(0, |r| r.get(&target.name).copied().unwrap_or(0));
        Ok(PoolReplicas {
            desired: n,
            current: n,
            ready: n,
        })
    }

    async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        if let Ok(mut r) = self.replicas.lock() {
            r.insert(target.name.clone(), replicas);
        }
        Ok(())
    }
}

fn object(metadata: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "llama-scaler".into(),
        namespace: "serving".into(),
        scaler_metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

async fn client(control: &support::Running) -> Result<ExternalScalerClient<Channel>, Error> {
    let channel = Channel::from_shared(control.grpc_uri())?.connect().await?;
    Ok(ExternalScalerClient::new(channel))
}

#[tokio::test]
async fn the_metric_spec_makes_the_hpa_target_one_unit_per_replica() -> Result<(), Error> {
    let control = support::start(CONFIG, &[]).await?;
    let mut keda = client(&control).await?;
    let spec = keda
        .get_metric_spec(object(&[("autoscaler", "llama")]))
        .await?
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    let metric = &spec.metric_specs[0];
    assert_eq!(metric.metric_name, "flyball-llama");
    assert_eq!(metric.target_size, 1);
    assert_eq!(metric.target_size_float, 1.0);

    let by_pool = keda
        .get_metric_spec(object(&[("pool", "qwen-decode")]))
        .await?
        .into_inner();
    assert_eq!(by_pool.metric_specs[0].metric_name, "flyball-qwen-decode");
    control.stop().await
}

#[tokio::test]
async fn scaler_metadata_that_names_no_pool_is_refused_with_the_reason() -> Result<(), Error> {
    let control = support::start(CONFIG, &[]).await?;
    let mut keda = client(&control).await?;
    let none = keda.is_active(object(&[])).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::InvalidArgument);
    assert!(none.message().contains("give `pool`"), "{}", none.message());

    let unknown = keda
        .is_active(object(&[("pool", "nope")]))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(unknown.message().contains("llama"), "{}", unknown.message());

    let no_role = keda
        .is_active(object(&[("autoscaler", "qwen")]))
        .await
        .unwrap_err();
    assert_eq!(no_role.code(), tonic::Code::InvalidArgument);
    assert!(no_role.message().starts_with("scalerMetadata.role"));

    // The one `llama` is in serving: a ScaledObject in another namespace must not follow it.
    let mut in_team_b = object(&[("pool", "llama")]);
    in_team_b.namespace = "team-b".into();
    let elsewhere = keda.get_metric_spec(in_team_b).await.unwrap_err();
    assert_eq!(elsewhere.code(), tonic::Code::NotFound);
    assert!(
        elsewhere.message().contains("\"team-b\""),
        "{}",
        elsewhere.message()
    );

    // The HPA's tolerance, a fraction: "10%" is not one, and is refused when the HPA is made.
    let tolerance = keda
        .get_metric_spec(object(&[("pool", "llama"), ("tolerance", "10%")]))
        .await
        .unwrap_err();
    assert_eq!(tolerance.code(), tonic::Code::InvalidArgument);
    assert!(
        tolerance.message().starts_with("scalerMetadata.tolerance"),
        "{}",
        tolerance.message()
    );

    let decode = keda
        .get_metric_spec(object(&[("autoscaler", "qwen"), ("role", "decode")]))
        .await?;
    assert_eq!(
        decode.get_ref().metric_specs[0].metric_name,
        "flyball-qwen-decode"
    );
    control.stop().await
}

/// Fast behaviour and short windows, so an idle pool reaches zero within a second or two.
const FAST: &str = r#"
autoscalers:
  - name: llama
    namespace: serving
    spec:
      selector: { backend: vllm }
      scaleToZero: true
      pools:
        unified:
          scaleTargetRef: { name: llama }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
      behavior:
        scaleUp: { stabilizationWindow: 0s, maxStep: 10, period: 100ms }
        scaleDown: { stabilizationWindow: 0s, maxStep: 10, period: 100ms }
        cooldown: 0s
"#;

const FAST_WINDOWS: &[&str] = &[
    "--bucket",
    "100ms",
    "--short-window",
    "500ms",
    "--stable-window",
    "1s",
];

fn report(sequence: u64, keys: Vec<v1::KeyTelemetry>) -> v1::ReportRequest {
    v1::ReportRequest {
        reporter: Some(v1::Reporter {
            gateway: "gw".into(),
            process_start_unix_ms: 1,
            filter_version: "test".into(),
        }),
        sequence,
        keys,
        ..Default::default()
    }
}

#[tokio::test]
async fn load_on_a_pool_at_zero_is_pushed_as_activation_and_metrics_land_on_the_decision()
-> Result<(), Error> {
    let actuator = Arc::new(ScaledToZero::default());
    let control = support::start_with(FAST, FAST_WINDOWS, actuator.clone()).await?;
    let mut keda = client(&control).await?;
    let llama = object(&[("pool", "llama")]);

    // An idle gateway reports every 100 ms: fresh telemetry, no load.
    let mut gateway = TelemetryServiceClient::connect(control.grpc_uri()).await?;
    let sequence = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let idle = {
        let mut gateway = gateway.clone();
        let sequence = sequence.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                tick.tick().await;
                let n = sequence.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if gateway.report(report(n, Vec::new())).await.is_err() {
                    return;
                }
            }
        })
    };

    // Wait for the pool to be decided down to zero (scale-to-zero after a full stable window).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let pools = control.pools().await?;
        if pools["pools"][0]["replicas"]["desired"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached zero: {pools}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let mut activity = keda.stream_is_active(llama.clone()).await?.into_inner();
    let first = activity.next().await.ok_or("stream ended")??;
    assert!(!first.result, "the current value comes at once");
    assert!(!keda.is_active(llama.clone()).await?.into_inner().result);

    let n = sequence.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let load = v1::KeyTelemetry {
        backend: "vllm".into(),
        model: "llama".into(),
        tokens: Some(v1::TokenUsage {
            input: 3_000,
            ..Default::default()
        }),
        in_flight: Some(v1::InFlight {
            waiting_first_token: 4,
            decoding: 0,
        }),
        ..Default::default()
    };
    gateway.report(report(n, vec![load])).await?;

    let next = activity.next().await.ok_or("stream ended")??;
    assert!(next.result, "activation pushed when load appeared");
    assert!(keda.is_active(llama.clone()).await?.into_inner().result);
    idle.abort();

    // HPA: ceil(metricValue / targetSize) with targetSize 1 is flyball's count. The count moves
    // as the windows slide, so compare against a decision that held across the call.
    let desired = || {
        let control = &control;
        async move {
            let pools = control.pools().await?;
            pools["pools"][0]["replicas"]["desired"]
                .as_i64()
                .ok_or_else(|| Error::from(format!("no desired replicas: {pools}")))
        }
    };
    let mut compared = false;
    for _ in 0..50 {
        let before = desired().await?;
        let metrics = keda
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(llama.clone()),
                // KEDA strips its `s<index>-` prefix before asking (RemoveIndexFromMetricName).
                metric_name: "flyball-llama".into(),
            })
            .await?
            .into_inner();
        let after = desired().await?;
        if before != after {
            continue;
        }
        let value = &metrics.metric_values[0];
        assert_eq!(value.metric_name, "flyball-llama");
        assert!(before >= 1);
        assert_eq!(value.metric_value, before);
        assert_eq!(value.metric_value_float, before as f64);
        compared = true;
        break;
    }
    assert!(
        compared,
        "the decision never held across one GetMetrics call"
    );
    // KEDA matches the answer by its own name, so any name asked for is answered: the HPA's
    // indexed one (as the HPA knows the metric), or none.
    for asked in ["s0-flyball-llama", ""] {
        let metrics = keda
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(llama.clone()),
                metric_name: asked.into(),
            })
            .await?
            .into_inner();
        let expected = if asked.is_empty() {
            "flyball-llama"
        } else {
            asked
        };
        assert_eq!(metrics.metric_values[0].metric_name, expected);
    }
    control.stop().await
}

/// `yaml` on an actuator at zero, leading or following `leader` as told.
async fn replica(
    yaml: &str,
    leading: bool,
    leader: Option<String>,
) -> Result<support::Running, Error> {
    let identity = if leading { "a" } else { "b" };
    let (_keep_leading, leading) = tokio::sync::watch::channel(leading);
    let (_keep_leader, leader) = tokio::sync::watch::channel(leader);
    let control = support::bind(yaml, FAST_WINDOWS)
        .await?
        .with_actuator(Arc::new(ScaledToZero::default()), false)
        .with_leadership(flyball_control::leader::Leadership::from_channels(
            identity, leading, leader,
        ));
    support::spawn(control)
}

/// KEDA holds one connection to whichever replica its Service picked. A follower's count can
/// differ from the leader's: it has the same reports (it follows the leader's) but its own
/// policy memory (a restart hold, learned capacity, the history of its stabilization windows),
/// and it may have just started following. So it passes KEDA's calls to the leader, the one
/// whose count is applied. Here the follower's count differs by a capacity hint of its own.
#[tokio::test]
async fn a_follower_gives_keda_the_leaders_answer() -> Result<(), Error> {
    let leader = replica(FAST, true, None).await?;
    let a_tenth_of_the_capacity = FAST.replace(
        "prefillTokensPerSecond: 1000",
        "prefillTokensPerSecond: 100",
    );
    let follower = replica(&a_tenth_of_the_capacity, false, Some(leader.grpc_uri())).await?;
    let llama = object(&[("pool", "llama")]);

    // Load reaches the leader only.
    let mut gateway = TelemetryServiceClient::connect(leader.grpc_uri()).await?;
    let feeding = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        for sequence in 1.. {
            tick.tick().await;
            let load = v1::KeyTelemetry {
                backend: "vllm".into(),
                model: "llama".into(),
                tokens: Some(v1::TokenUsage {
                    input: 300,
                    ..Default::default()
                }),
                in_flight: Some(v1::InFlight {
                    waiting_first_token: 4,
                    decoding: 0,
                }),
                ..Default::default()
            };
            if gateway.report(report(sequence, vec![load])).await.is_err() {
                return;
            }
        }
    });
    let mut at_leader = client(&leader).await?;
    let mut at_follower = client(&follower).await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !at_leader
        .is_active(llama.clone())
        .await?
        .into_inner()
        .result
    {
        assert!(tokio::time::Instant::now() < deadline, "never active");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    assert!(
        at_follower
            .is_active(llama.clone())
            .await?
            .into_inner()
            .result
    );
    let mut activity = at_follower
        .stream_is_active(llama.clone())
        .await?
        .into_inner();
    assert!(activity.next().await.ok_or("stream ended")??.result);

    let metrics = |mut keda: ExternalScalerClient<Channel>, passed_on: bool| {
        let llama = llama.clone();
        async move {
            let mut request = tonic::Request::new(GetMetricsRequest {
                scaled_object_ref: Some(llama),
                metric_name: "flyball-llama".into(),
            });
            if passed_on {
                // As a call another replica passed on: answered from the replica's own view.
                request
                    .metadata_mut()
                    .insert("flyball-forwarded-by", "c".parse()?);
            }
            let answer = keda.get_metrics(request).await?.into_inner();
            Ok::<_, Error>(answer.metric_values[0].metric_value)
        }
    };
    // The counts move as the windows slide: compare answers that agree on both sides.
    let mut same = false;
    for _ in 0..50 {
        let before = metrics(at_leader.clone(), false).await?;
        let through_follower = metrics(at_follower.clone(), false).await?;
        let own = metrics(at_follower.clone(), true).await?;
        let after = metrics(at_leader.clone(), false).await?;
        if before == after && own > after {
            assert!(before >= 1, "{before}");
            assert_eq!(
                through_follower, before,
                "the follower's own count is {own}"
            );
            same = true;
            break;
        }
    }
    assert!(
        same,
        "the leader's count never held across four calls, under the follower's own"
    );

    // Without a leader to ask, the follower answers from what it sees, at once: the load it
    // followed.
    feeding.abort();
    leader.stop().await?;
    let alone = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        at_follower.is_active(llama.clone()),
    )
    .await??;
    assert!(alone.into_inner().result);
    follower.stop().await
}

/// `/scale` that cannot be read: flyball has no RBAC on it, as some KEDA setups choose.
struct Unreadable;

impl Actuator for Unreadable {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        Err(ActuatorError {
            target: target.name.clone(),
            kind: "forbidden",
            transient: false,
            source: "deployments.apps/scale is forbidden".into(),
        })
    }

    async fn set(&self, _: &ScaleTarget, _: u32) -> Result<(), ActuatorError> {
        unreachable!("nothing is set without a replica count")
    }
}

/// Activation comes from the load in telemetry: replicas that cannot be read must not leave a
/// loaded pool inactive, which KEDA would scale to zero.
#[tokio::test]
async fn load_activates_a_pool_whose_replicas_cannot_be_read() -> Result<(), Error> {
    let control = support::start_with(FAST, FAST_WINDOWS, Arc::new(Unreadable)).await?;
    let mut keda = client(&control).await?;
    let llama = object(&[("pool", "llama")]);
    // Nothing is known yet (no replicas, no telemetry): the stream pushes nothing until load
    // shows, rather than false.
    let mut activity = keda.stream_is_active(llama.clone()).await?.into_inner();

    let mut gateway = TelemetryServiceClient::connect(control.grpc_uri()).await?;
    let load = v1::KeyTelemetry {
        backend: "vllm".into(),
        model: "llama".into(),
        in_flight: Some(v1::InFlight {
            waiting_first_token: 2,
            decoding: 0,
        }),
        ..Default::default()
    };
    gateway.report(report(1, vec![load])).await?;
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), activity.next())
        .await?
        .ok_or("stream ended")??;
    assert!(
        next.result,
        "activation pushed although /scale is unreadable"
    );
    assert!(keda.is_active(llama).await?.into_inner().result);
    control.stop().await
}

/// The HPA's replica count for an External metric with an `AverageValue` target, as
/// kubernetes/kubernetes pkg/controller/podautoscaler/replica_calculator.go computes it
/// (`GetExternalPerPodMetricReplicas`, default tolerance 0.1 both ways):
///
/// ```go
/// replicaCount = statusReplicas
/// usageRatio := float64(usage) / (float64(targetUsagePerPod) * float64(replicaCount))
/// if !tolerances.isWithin(usageRatio) {
///     replicaCount = int32(math.Ceil(float64(usage) / float64(targetUsagePerPod)))
/// }
/// // isWithin: (1.0-t.scaleDown) <= usageRatio && usageRatio <= (1.0+t.scaleUp)
/// ```
///
/// KEDA hands the HPA `metricValue` in milli units (`GenerateMetricInMili`: older releases
/// truncate `value x 1000`, newer ones round to three decimals; a value must mean the same to
/// both) and the target `targetSizeFloat` (`GetMetricTargetMili`), so usage = value x 1000,
/// target = 1000.
fn hpa_external_average_value(status_replicas: u32, value: f64, target: f64) -> u32 {
    let usage = (value * 1000.0) as i64;
    assert_eq!(
        usage,
        (value * 1000.0).round() as i64,
        "{value}: KEDA releases would disagree on it"
    );
    let target = (target * 1000.0) as i64;
    let ratio = usage as f64 / (target as f64 * f64::from(status_replicas));
    let within = ((1.0 - 0.1)..=(1.0 + 0.1)).contains(&ratio);
    if within {
        status_replicas
    } else {
        (usage as f64 / target as f64).ceil() as u32
    }
}

/// A dry-run autoscaler (as deploy/keda/scaledobject.yaml asks for: KEDA's HPA is the only
/// writer) with flyball's default scale-down step (maxStep 1), short windows otherwise.
const KEDA_DRY_RUN: &str = r#"
autoscalers:
  - name: llama
    namespace: serving
    spec:
      selector: { backend: vllm }
      dryRun: true
      pools:
        unified:
          scaleTargetRef: { name: llama }
          maxReplicas: 20
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
      behavior:
        scaleUp: { stabilizationWindow: 0s, maxStep: 10, period: 100ms }
        scaleDown: { stabilizationWindow: 0s, period: 100ms }
        cooldown: 0s
"#;

/// The metric must make KEDA's HPA land on flyball's count. With flyball's default scale-down
/// step of one replica, an idle pool at 12 asks for 11: 11/12 is within the HPA's 10%
/// tolerance, so reporting 11 left the HPA at 12, and flyball, deciding from the 12 still
/// running, asked 11 again for ever. A value just below the band (10.799) lands on 11.
#[tokio::test]
async fn an_idle_pool_at_twelve_scales_down_through_the_hpa() -> Result<(), Error> {
    let actuator = Arc::new(ScaledToZero::default());
    let llama_target = ScaleTarget {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: "llama".into(),
        namespace: "serving".into(),
    };
    actuator.set(&llama_target, 12).await?;
    let control = support::start_with(KEDA_DRY_RUN, FAST_WINDOWS, actuator.clone()).await?;
    let mut keda = client(&control).await?;
    let llama = object(&[("pool", "llama")]);

    // An idle gateway: fresh telemetry, no load.
    let mut gateway = TelemetryServiceClient::connect(control.grpc_uri()).await?;
    let idle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        for sequence in 1.. {
            tick.tick().await;
            if gateway.report(report(sequence, Vec::new())).await.is_err() {
                return;
            }
        }
    });

    // The HPA's sync, sped up: read the metric, set what the replica calculator gives.
    let replicas = |actuator: &ScaledToZero| {
        actuator
            .replicas
            .lock()
            .map_or(0, |r| r.get("llama").copied().unwrap_or(0))
    };
    let mut asked_below = None;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(8);
    while tokio::time::Instant::now() < deadline && replicas(&actuator) >= 12 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let Ok(metrics) = keda
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(llama.clone()),
                // KEDA strips its `sN-` prefix before asking (RemoveIndexFromMetricName).
                metric_name: "flyball-llama".into(),
            })
            .await
        else {
            continue;
        };
        let value = metrics.into_inner().metric_values[0].metric_value_float;
        let current = replicas(&actuator);
        if (value as u32) < current {
            asked_below = Some(value);
        }
        let hpa = hpa_external_average_value(current, value, 1.0).clamp(1, 20);
        actuator.set(&llama_target, hpa).await?;
    }
    idle.abort();
    let asked = asked_below.ok_or("flyball never asked for fewer than 12 replicas")?;
    assert!(
        replicas(&actuator) < 12,
        "flyball asked for {asked} replicas, but the HPA kept all 12 for 8 s: {asked}/12 is \
         within its 10% tolerance, and flyball never asks more than one replica below what runs"
    );
    control.stop().await
}

/// Replicas that cannot be read (no RBAC on /scale, as the test above has it) and no telemetry
/// at all (the gateways down, or not reporting yet after a restart of the control service):
/// flyball knows neither the load nor what runs, and must hold. It answers `IsActive` false and
/// pushes false on the stream instead; KEDA's scale executor takes that as "no active trigger"
/// and, with minReplicaCount 0, scales the target to zero once `cooldownPeriod` has passed since
/// it was last active (kedacore/keda pkg/scaling/executor/scale_scaledobjects.go,
/// `currentReplicas > 0 && minReplicas == 0` -> `scaleToZeroOrIdle`). An answer that says
/// "unknown" (an error: KEDA then does nothing without a fallback) would hold. (The test above
/// asserts this same first `false` as its starting point; a fix changes that line too.)
#[tokio::test]
async fn missing_telemetry_and_unread_replicas_never_deactivate_a_pool() -> Result<(), Error> {
    let control = support::start_with(FAST, FAST_WINDOWS, Arc::new(Unreadable)).await?;
    let mut keda = client(&control).await?;
    let llama = object(&[("pool", "llama")]);
    // Several evaluations, none of which could read /scale or saw a report.
    let failed_reads =
        r#"flyball_actuator_errors_total{namespace="serving",pool="llama",kind="forbidden"}"#;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while control.metric(failed_reads).await?.unwrap_or(0.0) < 3.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than 3 failed reads of /scale after 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let answer = keda.is_active(llama.clone()).await;
    assert!(
        !matches!(&answer, Ok(r) if !r.get_ref().result),
        "IsActive answered false with no telemetry and no replica count: {answer:?}"
    );
    let mut activity = keda.stream_is_active(llama).await?.into_inner();
    let first = tokio::time::timeout(std::time::Duration::from_millis(500), activity.next()).await;
    assert!(
        !matches!(&first, Ok(Some(Ok(r))) if !r.result),
        "StreamIsActive pushed false with no telemetry and no replica count"
    );
    control.stop().await
}

/// Three replicas behind a /scale that answers slowly (a loaded API server).
struct SlowThree;

impl Actuator for SlowThree {
    async fn current(&self, _: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        Ok(PoolReplicas {
            desired: 3,
            current: 3,
            ready: 3,
        })
    }

    async fn set(&self, _: &ScaleTarget, _: u32) -> Result<(), ActuatorError> {
        Ok(())
    }
}

/// Before its first read of /scale (at start, after a restart, for an autoscaler just added)
/// the leader's status is the default one, and `answer` gives its `active: false` as the
/// leader's word: KEDA is told a pool with 3 replicas is inactive, and the stream pushes that
/// false at once. KEDA's executor scales to zero on it when the ScaledObject has no
/// `lastActiveTime` yet (a new ScaledObject: `scaleToZeroOrIdle` then waits only
/// `initialCooldownPeriod`, 0 by default) or its cooldown has passed. Nothing is known yet: flyball should hold (answer an error, push
/// nothing), as `answer` already does for the replica count (GetMetrics is Unavailable).
#[tokio::test]
async fn a_pool_not_yet_read_is_not_reported_inactive() -> Result<(), Error> {
    let control = support::start_with(FAST, FAST_WINDOWS, Arc::new(SlowThree)).await?;
    let mut keda = client(&control).await?;
    let llama = object(&[("pool", "llama")]);
    let unknown = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(llama.clone()),
            metric_name: "flyball-llama".into(),
        })
        .await;
    assert!(
        unknown.is_err(),
        "the count is rightly unknown: {unknown:?}"
    );
    let answer = keda.is_active(llama.clone()).await;
    assert!(
        !matches!(&answer, Ok(r) if !r.get_ref().result),
        "IsActive answered false before the replicas were read: {answer:?}"
    );
    let mut activity = keda.stream_is_active(llama).await?.into_inner();
    let first = tokio::time::timeout(std::time::Duration::from_millis(500), activity.next()).await;
    assert!(
        !matches!(&first, Ok(Some(Ok(r))) if !r.result),
        "StreamIsActive pushed false before the replicas were read"
    );
    control.stop().await
}

// === KEDA through a follower, over mutual TLS ===

/// A mutual-TLS channel to `control`, trusting `trust` and presenting `client` (its `.crt` and
/// `.key`), files of `tests/tls`.
async fn tls_channel(
    control: &support::Running,
    trust: &str,
    client: &str,
) -> Result<Channel, Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let pem = |name: &str| std::fs::read(support::tls_fixture(name));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(trust)?))
        .identity(Identity::from_pem(
            pem(&format!("{client}.crt"))?,
            pem(&format!("{client}.key"))?,
        ))
        .domain_name("flyball-control");
    Ok(Channel::from_shared(format!("https://{}", control.grpc))?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// A gateway reporting load for `llama` every 100 ms on `channel`, until aborted.
fn feed(channel: Channel) -> tokio::task::JoinHandle<()> {
    let mut gateway = TelemetryServiceClient::new(channel);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        for sequence in 1.. {
            tick.tick().await;
            let load = v1::KeyTelemetry {
                backend: "vllm".into(),
                model: "llama".into(),
                tokens: Some(v1::TokenUsage {
                    input: 300,
                    ..Default::default()
                }),
                in_flight: Some(v1::InFlight {
                    waiting_first_token: 4,
                    decoding: 0,
                }),
                ..Default::default()
            };
            if gateway.report(report(sequence, vec![load])).await.is_err() {
                return;
            }
        }
    })
}

/// Waits (up to 20 s) for `keda` to answer `llama` active.
async fn wait_active(keda: &mut ExternalScalerClient<Channel>) -> Result<(), Error> {
    let llama = object(&[("pool", "llama")]);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !keda.is_active(llama.clone()).await?.into_inner().result {
        assert!(tokio::time::Instant::now() < deadline, "never active");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `control` on an actuator at zero, leading or following `leader` as told.
fn led(
    control: flyball_control::Control,
    leading: bool,
    leader: Option<String>,
) -> Result<support::Running, Error> {
    let identity = if leading { "a" } else { "b" };
    let (_keep_leading, leading) = tokio::sync::watch::channel(leading);
    let (_keep_leader, leader) = tokio::sync::watch::channel(leader);
    support::spawn(
        control
            .with_actuator(Arc::new(ScaledToZero::default()), false)
            .with_leadership(flyball_control::leader::Leadership::from_channels(
                identity, leading, leader,
            )),
    )
}

/// The README: after a renewal, "new connections, and new forwarding streams to the leader,
/// use the new certificate, key and CA, with no restart". A follower passes KEDA's calls to the
/// leader on a channel it keeps per leader address, made with the TLS files of the time; when
/// that channel connects again (the leader's container restarted in place, keeping its pod IP
/// and its Lease identity; or any dropped connection) it still presents the old certificate
/// and trusts only the old CA, long after both were renewed (and the old certificate expired).
/// KEDA then gets the follower's partial view for as long as that leader leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_keda_calls_reach_the_leader_with_renewed_certificates() -> Result<(), Error> {
    // One mounted Secret, as every replica has it.
    let secret = support::MountedSecret::new("keda-renewal")?;
    let mount = |from: &str, to: &str| secret.mount(from, to);
    let mut flags = secret.flags();
    flags.extend(FAST_WINDOWS.iter().map(|f| (*f).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    let leader = support::bind(FAST, &flags).await?;
    let at = leader.grpc_addr().unwrap();
    let leader = led(leader, true, None)?;
    let follower = led(
        support::bind(FAST, &flags).await?,
        false,
        Some(format!("http://{at}")),
    )?;
    let llama = object(&[("pool", "llama")]);

    // Before the renewal: load reaches the leader only, and the follower gives its answer.
    let feeding = feed(tls_channel(&leader, "ca.crt", "replica").await?);
    wait_active(&mut ExternalScalerClient::new(
        tls_channel(&leader, "ca.crt", "replica").await?,
    ))
    .await?;
    let mut at_follower =
        ExternalScalerClient::new(tls_channel(&follower, "ca.crt", "replica").await?);
    assert!(
        at_follower
            .is_active(llama.clone())
            .await?
            .into_inner()
            .result,
        "before the renewal the follower gives the leader's answer"
    );
    drop(at_follower);

    // cert-manager renews, with a new CA; kubelet rewrites the files; both replicas load them.
    mount("next.crt", "tls.crt")?;
    mount("next.key", "tls.key")?;
    mount("next-ca.crt", "ca.crt")?;
    let applied = r#"flyball_grpc_tls_reloads_total{result="applied"}"#;
    let wait = std::time::Duration::from_secs(10);
    leader.wait_metric(applied, 1.0, wait).await?;
    follower.wait_metric(applied, 1.0, wait).await?;

    // The leader's container restarts in place: same address, same Lease holder.
    feeding.abort();
    leader.stop().await?;
    let leader = led(support::bind_at(FAST, at, &flags).await?, true, None)?;
    let feeding = feed(tls_channel(&leader, "next-ca.crt", "next").await?);
    wait_active(&mut ExternalScalerClient::new(
        tls_channel(&leader, "next-ca.crt", "next").await?,
    ))
    .await?;

    // The follower, which has no load of its own, asks the leader for KEDA. (A few times: the
    // first call after the old connection closed is not the point.)
    let mut at_follower =
        ExternalScalerClient::new(tls_channel(&follower, "next-ca.crt", "next").await?);
    let mut answer = at_follower.is_active(llama.clone()).await;
    for _ in 0..5 {
        if matches!(&answer, Ok(active) if active.get_ref().result) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        answer = at_follower.is_active(llama.clone()).await;
    }

    // (New forwarding streams from the follower do use the renewed files and reach it.)
    let mut gateway =
        TelemetryServiceClient::new(tls_channel(&follower, "next-ca.crt", "next").await?);
    gateway
        .report(support::report("via-follower", 1, 1))
        .await?;
    follower
        .wait_metric("flyball_forward_reports_total", 1.0, wait)
        .await?;
    let refused = |reason: &'static str| {
        let leader = &leader;
        async move {
            leader
                .metric(&format!(
                    "flyball_grpc_tls_handshake_failures_total{{reason=\"{reason}\"}}"
                ))
                .await
        }
    };
    let (protocol, certificate) = (refused("protocol").await?, refused("certificate").await?);
    assert!(
        matches!(&answer, Ok(active) if active.get_ref().result),
        "the follower answered KEDA {answer:?} from its own view: its call to the leader failed \
         (the leader refused handshakes: protocol {protocol:?}, certificate {certificate:?})"
    );
    feeding.abort();
    leader.stop().await?;
    follower.stop().await?;
    std::fs::remove_dir_all(&secret.dir)?;
    Ok(())
}
