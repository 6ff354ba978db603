#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::*;
use crate::config::LiveConfig;
use crate::ingest::IngestConfig;
use crate::window::{Selector, WindowConfig};
use flyball_proto::v1;

#[test]
fn rfc3339_renders_utc_with_milliseconds() {
    let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    assert_eq!(rfc3339(at(1_700_000_000_250)), "2023-11-14T22:13:20.250Z");
    assert_eq!(rfc3339(at(951_782_400_000)), "2000-02-29T00:00:00.000Z");
    assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00.000Z");
}

#[test]
fn freshness_needs_a_live_reporter_heard_recently() {
    let base = Instant::now();
    let fresh_until = Some(base + Duration::from_secs(3));
    let now = base + Duration::from_secs(2);
    assert_eq!(
        freshness(1, Some(base), 0, false, fresh_until, now),
        Freshness::Fresh
    );
    assert_eq!(
        freshness(0, None, 0, false, fresh_until, now),
        Freshness::Missing
    );
    assert_eq!(
        freshness(1, Some(base), 2, false, fresh_until, now),
        Freshness::Partial {
            silent_reporters: 2,
            keys_over_limit: false
        }
    );
    assert_eq!(
        freshness(1, Some(base), 0, true, fresh_until, now),
        Freshness::Partial {
            silent_reporters: 0,
            keys_over_limit: true
        }
    );
    assert_eq!(
        freshness(0, Some(base), 0, true, fresh_until, now),
        Freshness::Stale {
            age: Duration::from_secs(2)
        }
    );
    let late = base + Duration::from_secs(4);
    assert_eq!(
        freshness(3, Some(base), 1, true, fresh_until, late),
        Freshness::Stale {
            age: Duration::from_secs(4)
        }
    );
}

#[test]
fn window_stats_take_the_slo_percentile_in_durations() {
    let mut summary = WindowSummary {
        covered: Duration::from_secs(5),
        spanned: Duration::from_secs(5),
        ..WindowSummary::default()
    };
    summary.requests.ok = 50;
    summary.tokens.output = 5_000;
    // 3 waiting and 40 decoding on average over the 5 s covered.
    summary.in_flight.waiting_first_token_us = 15_000_000;
    summary.in_flight.decoding_us = 200_000_000;
    for v in 1..=100 {
        summary.latency.ttft_us.record(f64::from(v) * 1_000.0);
    }
    let stats = window_stats(&summary, Duration::from_secs(10), 95.0);
    assert_eq!(stats.coverage, Duration::from_secs(5));
    assert_eq!(stats.request_rate_per_s, 10.0);
    assert_eq!(stats.output_tokens_per_s, 1_000.0);
    let ttft = stats.ttft.unwrap().as_secs_f64();
    assert!((ttft - 0.095).abs() <= 0.095 * 0.021, "{ttft}");
    assert_eq!(stats.tpot, None);
    assert_eq!(stats.mean_waiting, Some(3.0));
    assert_eq!(stats.mean_decoding, Some(40.0));
}

const SPEC: &str = r#"
autoscalers:
  - name: llama
    spec:
      selector: { backend: vllm }
      pools:
        unified:
          scaleTargetRef: { name: llama }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
"#;

struct Harness<A = DryRunActuator> {
    telemetry: Arc<Telemetry>,
    status: Arc<Status>,
    actuator: Arc<A>,
    live: LiveConfig,
    leading: watch::Sender<bool>,
    stop: tokio::sync::oneshot::Sender<()>,
}

fn start(config: ControlConfig) -> Harness {
    start_with(config, true, &[])
}

/// `replicas`: targets (by name) that start at a count other than their minReplicas.
fn start_with(config: ControlConfig, leading: bool, replicas: &[(&str, u32)]) -> Harness {
    start_budgeted(config, leading, replicas, None)
}

fn start_budgeted(
    config: ControlConfig,
    leading: bool,
    replicas: &[(&str, u32)],
    gpu_budget: Option<u32>,
) -> Harness {
    let actuator = Arc::new(DryRunActuator::for_config(&config));
    for (name, n) in replicas {
        actuator.preset(name, *n);
    }
    start_on(config, actuator, leading, gpu_budget)
}

fn start_on<A: Actuator>(
    config: ControlConfig,
    actuator: Arc<A>,
    leading: bool,
    gpu_budget: Option<u32>,
) -> Harness<A> {
    let epoch = Instant::now();
    let telemetry = Arc::new(Telemetry::new(
        IngestConfig::default(),
        WindowConfig::default(),
        config.selectors(),
        epoch,
    ));
    let status = Arc::new(Status::new(config.pools().len()));
    let live = LiveConfig::new(config);
    let (leading_tx, leading) = watch::channel(leading);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run(
        live.subscribe(),
        telemetry.clone(),
        status.clone(),
        actuator.clone(),
        Clock::new(epoch),
        LoopConfig {
            min_interval: Duration::from_millis(100),
            idle_interval: Duration::from_secs(1),
            decision_log: 100,
            dry_run: false,
            stale_after: Duration::from_secs(3),
            gpu_budget,
        },
        leading,
        async move {
            let _ = stopped.await;
        },
    ));
    Harness {
        telemetry,
        status,
        actuator,
        live,
        leading: leading_tx,
        stop,
    }
}

fn load(sequence: u64, input_tokens: u64) -> v1::ReportRequest {
    v1::ReportRequest {
        reporter: Some(v1::Reporter {
            gateway: "gw".into(),
            process_start_unix_ms: 1,
            filter_version: "test".into(),
        }),
        sequence,
        sent_at_unix_ms: 0,
        keys: vec![v1::KeyTelemetry {
            backend: "vllm".into(),
            model: "llama".into(),
            requests: Some(v1::RequestOutcomes {
                ok: 10,
                ..Default::default()
            }),
            tokens: Some(v1::TokenUsage {
                input: input_tokens,
                output: 100,
                ..Default::default()
            }),
            in_flight: Some(v1::InFlight {
                waiting_first_token: 2,
                decoding: 3,
            }),
            ..Default::default()
        }],
        dropped: None,
        held_ms: 0,
        connections_closed: false,
    }
}

#[tokio::test(start_paused = true)]
async fn load_over_capacity_scales_the_pool_up_through_the_actuator() {
    let h = start(ControlConfig::from_yaml(SPEC).unwrap());
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();
    assert_eq!(status.borrow().replicas.unwrap().desired, 1);

    // 5,000 input tokens per second against 1,000 per replica.
    for s in 1..=3 {
        h.telemetry.ingest(load(s, 5_000), Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let decided = status
        .wait_for(|s| s.desired >= Some(5))
        .await
        .unwrap()
        .clone();
    assert_eq!(decided.active, Some(true));
    let last = decided.decisions.back().unwrap();
    assert!(last.to >= 5, "{last:?}");
    let set = h.actuator.recommendations();
    assert!(
        set.iter()
            .any(|(target, n)| target.name == "llama" && *n >= 5),
        "{set:?}"
    );
    let _ = h.stop.send(());
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_reports_costs_one_evaluation_per_interval() {
    let h = start(ControlConfig::from_yaml(SPEC).unwrap());
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();
    let evaluations = |s: &PoolStatus| -> u64 { s.decisions.iter().map(|d| d.repeats + 1).sum() };
    let before = evaluations(&status.borrow());
    // 100 reports 10 ms apart: one second of virtual time.
    for s in 1..=100 {
        h.telemetry.ingest(load(s, 10), Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = evaluations(&h.status.get(PoolId(0)).unwrap());
    let n = after - before;
    assert!((5..=11).contains(&n), "{n} evaluations in 1 s");
    let _ = h.stop.send(());
}

/// A report is acted on once merged: within the 100 ms two evaluations of an autoscaler are kept
/// apart, never on the next idle tick (1 s here). Paused time makes "within" exact: whenever it
/// arrives, from just after an evaluation to long after one.
#[tokio::test(start_paused = true)]
async fn every_report_is_evaluated_within_100_ms_of_its_arrival() {
    let h = start(ControlConfig::from_yaml(SPEC).unwrap());
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();
    let evaluations = |s: &PoolStatus| -> u64 { s.decisions.iter().map(|d| d.repeats + 1).sum() };
    // Quiet first: the next evaluation without a report would be the idle one.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut slowest = Duration::ZERO;
    for (sequence, gap_ms) in [
        (1, 0),
        (2, 1),
        (3, 30),
        (4, 70),
        (5, 99),
        (6, 100),
        (7, 250),
    ] {
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        let before = evaluations(&status.borrow_and_update());
        let arrived = Instant::now();
        h.telemetry.ingest(load(sequence, 5_000), arrived).unwrap();
        status.wait_for(|s| evaluations(s) > before).await.unwrap();
        let waited = arrived.elapsed();
        assert!(
            waited <= Duration::from_millis(100),
            "report {sequence}, {gap_ms} ms after the last evaluation: evaluated {waited:?} later"
        );
        slowest = slowest.max(waited);
    }
    // Reports right after an evaluation wait for the interval; that is what bounds the rate.
    assert!(slowest >= Duration::from_millis(69), "{slowest:?}");
    let _ = h.stop.send(());
}

#[tokio::test(start_paused = true)]
async fn without_reports_the_loop_still_evaluates_every_idle_interval() {
    let h = start(ControlConfig::from_yaml(SPEC).unwrap());
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5_050)).await;
    let s = h.status.get(PoolId(0)).unwrap();
    let n: u64 = s.decisions.iter().map(|d| d.repeats + 1).sum();
    assert_eq!(n, 6, "{:?}", s.decisions);
    let last = s.decisions.back().unwrap();
    assert_eq!(last.rule, Rule::MissingTelemetryHold);
    let _ = h.stop.send(());
}

#[test]
fn identical_decisions_fold_into_one_log_entry() {
    let base = Instant::now();
    let record = |to: u32, rule: Rule| DecisionRecord {
        at: "t".into(),
        last_at: "t".into(),
        at_instant: base,
        from: 1,
        to,
        action: Action::between(1, to),
        rule,
        reason: String::new(),
        details: sample_reason(),
        applied: false,
        error: None,
        repeats: 0,
    };
    let mut log = VecDeque::new();
    push_decision(&mut log, record(1, Rule::NoChange), 3);
    push_decision(&mut log, record(1, Rule::NoChange), 3);
    push_decision(&mut log, record(2, Rule::FeedForward), 3);
    push_decision(&mut log, record(1, Rule::Cooldown), 3);
    push_decision(&mut log, record(1, Rule::NoChange), 3);
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].rule, Rule::FeedForward);
    assert_eq!(log[2].rule, Rule::NoChange);

    // A change written is never folded into by ones that were not: its entry would say
    // `applied` for evaluations that wrote nothing.
    let mut log = VecDeque::new();
    push_decision(
        &mut log,
        DecisionRecord {
            applied: true,
            ..record(2, Rule::FeedForward)
        },
        3,
    );
    push_decision(&mut log, record(2, Rule::FeedForward), 3);
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].applied, log[0].repeats), (true, 0));
    assert!(!log[1].applied);
}

pub(super) fn sample_reason() -> flyball_policy::decision::Reason {
    flyball_policy::decision::Reason {
        driver: Rule::NoChange,
        freshness: Freshness::Fresh,
        panic: false,
        load: Default::default(),
        ttft: None,
        tpot: None,
        capacity: Default::default(),
        feed_forward_replicas: None,
        feed_forward_on_lower_bound: None,
        slo_feedback_replicas: None,
        recommended_replicas: 1,
        ready_replicas: 1,
        starting_replicas: 0,
        starting_counted: false,
        hold_until: None,
        before_budget: None,
    }
}

/// `desired` asked for and `ready` of them ready.
fn replicas(desired: u32, ready: u32) -> PoolReplicas {
    PoolReplicas {
        desired,
        current: desired,
        ready,
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Replicas asked for, then more asked for while the first are still starting: each is timed
/// from when it was first asked for. Timed from the latest ask, start-up looks shorter than it
/// is, and the policy re-asks for replicas that are only slow.
#[test]
fn time_to_ready_runs_from_the_first_ask_for_each_replica() {
    // 1 -> 3 at 0 s, 3 -> 5 at 10 s; all five ready at 30 s.
    let mut observed = Observed::default();
    observed.observe(replicas(1, 1), secs(0));
    observed.observe(replicas(3, 1), secs(0));
    observed.observe(replicas(5, 1), secs(10));
    observed.observe(replicas(5, 1), secs(20));
    assert_eq!(observed.time_to_ready, None);
    observed.observe(replicas(5, 5), secs(30));
    assert_eq!(
        observed.time_to_ready,
        Some(secs(30)),
        "replicas 2 and 3 were asked for 30 s before they were ready"
    );

    // The replicas of the first ask ready at 25 s, the others at 40 s: each ask is measured as
    // it comes ready, the first one not held back by the re-ask.
    let mut observed = Observed::default();
    observed.observe(replicas(1, 1), secs(0));
    observed.observe(replicas(3, 1), secs(0));
    observed.observe(replicas(5, 1), secs(10));
    observed.observe(replicas(5, 3), secs(25));
    assert_eq!(observed.time_to_ready, Some(secs(25)));
    observed.observe(replicas(5, 5), secs(40));
    assert_eq!(observed.time_to_ready, Some(secs(30)));

    // Lowered before it was ready, then raised again: the replicas given up are asked for anew
    // and timed from then; the ones kept keep their first ask.
    let mut observed = Observed::default();
    observed.observe(replicas(1, 1), secs(0));
    observed.observe(replicas(5, 1), secs(0));
    observed.observe(replicas(3, 1), secs(10));
    observed.observe(replicas(6, 1), secs(20));
    observed.observe(replicas(6, 3), secs(50));
    assert_eq!(observed.time_to_ready, Some(secs(50)));
    observed.observe(replicas(6, 6), secs(60));
    assert_eq!(observed.time_to_ready, Some(secs(40)));
}

#[test]
fn selectors_follow_the_config() {
    let config = ControlConfig::from_yaml(SPEC).unwrap();
    assert_eq!(
        config.selectors(),
        vec![Selector {
            backend: Some("vllm".into()),
            model: None
        }]
    );
}

const QUICK_DOWN: &str = r#"
autoscalers:
  - name: llama
    spec:
      selector: { backend: vllm }
      pools:
        unified:
          scaleTargetRef: { name: llama }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
      behavior:
        cooldown: 0s
        scaleDown: { stabilizationWindow: 0s, maxStep: 10, period: 1s }
"#;

#[tokio::test(start_paused = true)]
async fn a_follower_decides_but_sets_nothing_until_it_leads() {
    let h = start_with(ControlConfig::from_yaml(SPEC).unwrap(), false, &[]);
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();
    for s in 1..=3 {
        h.telemetry.ingest(load(s, 5_000), Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let decided = status
        .wait_for(|s| s.desired >= Some(5))
        .await
        .unwrap()
        .clone();
    let last = decided.decisions.back().unwrap();
    assert!(!last.applied, "{last:?}");
    assert_eq!(h.actuator.recommendations(), vec![]);

    h.leading.send_replace(true);
    h.telemetry.ingest(load(4, 5_000), Instant::now()).unwrap();
    let applied = status
        .wait_for(|s| s.decisions.iter().any(|d| d.applied))
        .await
        .unwrap()
        .clone();
    let set = h.actuator.recommendations();
    assert_eq!(set.len(), 1, "{set:?}");
    assert!(set[0].1 >= 5, "{set:?} {applied:?}");
    let _ = h.stop.send(());
}

/// Feeds light load to `telemetry`, one report a second for the seconds asked.
fn light_load(telemetry: Arc<Telemetry>) -> impl AsyncFnMut(u64) {
    let mut sequence = 0;
    async move |seconds: u64| {
        for _ in 0..seconds {
            sequence += 1;
            telemetry
                .ingest(load(sequence, 10), Instant::now())
                .unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_waits_a_stable_window_before_scaling_down() {
    let config = ControlConfig::from_yaml(QUICK_DOWN).unwrap();
    let h = start_with(config, false, &[("llama", 5)]);
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    // Fresh, light load for longer than the stable window (60 s): a leader would scale down.
    let mut feed = light_load(h.telemetry.clone());
    feed(62).await;
    let follower = status.borrow_and_update().clone();
    let last = follower.decisions.back().unwrap();
    assert_eq!(
        (last.from, last.to, last.applied),
        (5, 1, false),
        "{last:?}"
    );

    h.leading.send_replace(true);
    feed(2).await;
    let leader = status.borrow_and_update().clone();
    let last = leader.decisions.back().unwrap();
    assert_eq!((last.to, last.rule), (5, Rule::RestartHold), "{last:?}");
    assert_eq!(h.actuator.recommendations(), vec![]);

    // A full stable window after gaining leadership, the scale-down goes through.
    feed(60).await;
    let set = h.actuator.recommendations();
    assert_eq!(set.len(), 1, "{set:?}");
    assert_eq!(set[0].1, 1);
    let _ = h.stop.send(());
}

#[tokio::test(start_paused = true)]
async fn an_edit_applies_without_restarting_the_scale_down_hold() {
    let h = start_with(
        ControlConfig::from_yaml(QUICK_DOWN).unwrap(),
        true,
        &[("llama", 5)],
    );
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    let mut feed = light_load(h.telemetry.clone());
    // Light load: one replica would do, but the service has not seen a stable window yet.
    feed(30).await;
    let last = status
        .borrow_and_update()
        .decisions
        .back()
        .cloned()
        .unwrap();
    assert_eq!((last.to, last.rule), (5, Rule::RestartHold), "{last:?}");

    // Edited halfway through: a higher maxReplicas, the same replicas.
    let edited = QUICK_DOWN.replace("maxReplicas: 10", "maxReplicas: 12");
    assert!(reconfigure(
        &h.live,
        &h.telemetry,
        &h.status,
        ControlConfig::from_yaml(&edited).unwrap()
    ));
    assert_eq!(h.live.current().pools()[0].id, PoolId(0));
    // The hold ends a stable window after the start, not after the edit.
    feed(32).await;
    let set = h.actuator.recommendations();
    assert_eq!(set.len(), 1, "{set:?}");
    assert_eq!(set[0].1, 1);
    let _ = h.stop.send(());
}

const TWO: &str = r#"
autoscalers:
  - name: llama
    spec:
      selector: { backend: vllm }
      pools:
        unified:
          scaleTargetRef: { name: llama }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
  - name: qwen
    spec:
      selector: { model: qwen }
      pools:
        unified: { scaleTargetRef: { name: qwen }, maxReplicas: 4 }
      slo: { ttft: 500ms }
"#;

#[tokio::test(start_paused = true)]
async fn a_new_configuration_starts_new_autoscalers_and_keeps_unchanged_ones() {
    let h = start(ControlConfig::from_yaml(SPEC).unwrap());
    let mut llama = h.status.subscribe(PoolId(0)).unwrap();
    h.telemetry.ingest(load(1, 5_000), Instant::now()).unwrap();
    llama.wait_for(|s| s.desired >= Some(5)).await.unwrap();
    let before = llama.borrow().decisions.len();

    // qwen added: llama keeps its id, its status and its task; qwen gets a new id.
    let next = ControlConfig::from_yaml(TWO).unwrap();
    assert!(reconfigure(&h.live, &h.telemetry, &h.status, next.clone()));
    assert!(!reconfigure(&h.live, &h.telemetry, &h.status, next));
    let config = h.live.current();
    let ids: Vec<_> = config
        .pools()
        .iter()
        .map(|p| (p.name.as_str(), p.id))
        .collect();
    assert_eq!(ids, vec![("llama", PoolId(0)), ("qwen", PoolId(1))]);
    let mut qwen = h.status.subscribe(PoolId(1)).unwrap();
    qwen.wait_for(|s| s.replicas.is_some()).await.unwrap();
    let kept = h.status.get(PoolId(0)).unwrap();
    assert!(kept.decisions.len() >= before);
    assert_eq!(kept.decisions.front(), llama.borrow().decisions.front());
    assert!(decision_series(&h.status).contains("autoscaler=\"llama\""));

    // llama removed: its status goes, and whoever watched it hears so.
    let only_qwen = r#"
autoscalers:
  - name: qwen
    spec:
      selector: { model: qwen }
      pools:
        unified: { scaleTargetRef: { name: qwen }, maxReplicas: 4 }
      slo: { ttft: 500ms }
"#;
    assert!(reconfigure(
        &h.live,
        &h.telemetry,
        &h.status,
        ControlConfig::from_yaml(only_qwen).unwrap()
    ));
    assert!(h.status.get(PoolId(0)).is_none());
    assert!(llama.changed().await.is_err());
    assert_eq!(h.live.current().pools()[0].id, PoolId(1));
    // Its decision series leave /metrics with it (once its task has ended); qwen's stay.
    let gone = async {
        while decision_series(&h.status).contains("autoscaler=\"llama\"") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("llama's decision series are removed");
    assert!(decision_series(&h.status).contains("autoscaler=\"qwen\""));
    let _ = h.stop.send(());
}

/// `flyball_decisions_total` as /metrics exports it.
fn decision_series(status: &Status) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("flyball_decisions", "", status.decisions.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// llama (backend vllm) and qwen (backend tgi), each with 1,000 input tokens a second per
/// replica and free to grow 10 replicas a second.
const SHARING: &str = r#"
autoscalers:
  - name: llama
    spec:
      selector: { backend: vllm }
      pools:
        unified:
          scaleTargetRef: { name: llama }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
      behavior: { scaleUp: { maxStep: 10, period: 1s } }
  - name: qwen
    spec:
      selector: { backend: tgi }
      pools:
        unified:
          scaleTargetRef: { name: qwen }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
      behavior: { scaleUp: { maxStep: 10, period: 1s } }
"#;

/// [`SHARING`] without qwen.
fn sharing_without_qwen() -> ControlConfig {
    let mut config: serde_json::Value = serde_yaml_ng::from_str(SHARING).unwrap();
    config["autoscalers"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["name"] != "qwen");
    ControlConfig::from_yaml(&serde_yaml_ng::to_string(&config).unwrap()).unwrap()
}

/// A report of 5,000 input tokens a second for `backend` (vllm: llama; tgi: qwen), from a
/// gateway of its own.
fn load_for(backend: &str, sequence: u64) -> v1::ReportRequest {
    let mut report = load(sequence, 5_000);
    report.reporter.as_mut().unwrap().gateway = format!("gw-{backend}");
    report.keys[0].backend = backend.into();
    report
}

#[tokio::test(start_paused = true)]
async fn autoscalers_sharing_a_gpu_budget_split_it_by_need() {
    let config = ControlConfig::from_yaml(SHARING).unwrap();
    let h = start_budgeted(config, true, &[], Some(4));
    // Each wants 5 replicas (5,000 input tokens a second over 1,000 each); 4 GPUs in all.
    for s in 1..=6 {
        h.telemetry
            .ingest(load_for("vllm", s), Instant::now())
            .unwrap();
        h.telemetry
            .ingest(load_for("tgi", s), Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let desired = |pool| h.status.get(PoolId(pool)).unwrap().desired.unwrap();
    // Equal need, equal shares: 2 each, not 3 for whoever evaluated first.
    assert_eq!((desired(0), desired(1)), (2, 2));
    let last = h
        .status
        .get(PoolId(1))
        .unwrap()
        .decisions
        .back()
        .cloned()
        .unwrap();
    assert_eq!(last.rule, Rule::GpuBudget, "{last:?}");
    let _ = h.stop.send(());
}

/// The dry-run actuator, except that its first `set` of the target named `target` panics (a bug
/// anywhere in an evaluation).
struct PanicsOnce {
    inner: DryRunActuator,
    target: &'static str,
    panicked: std::sync::atomic::AtomicBool,
}

impl Actuator for PanicsOnce {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        self.inner.current(target).await
    }

    async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        if target.name == self.target
            && !self
                .panicked
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("a bug in an evaluation");
        }
        self.inner.set(target, replicas).await
    }
}

#[tokio::test(start_paused = true)]
async fn an_autoscaler_whose_task_panics_starts_again() {
    let config = ControlConfig::from_yaml(SPEC).unwrap();
    let actuator = Arc::new(PanicsOnce {
        inner: DryRunActuator::for_config(&config),
        target: "llama",
        panicked: false.into(),
    });
    let h = start_on(config, actuator, true, None);
    let started = Instant::now();
    let mut sequence = 0;
    // Reports keep coming, as they would; the first scale-up panics, the restarted task makes it.
    while h.actuator.inner.recommendations().is_empty() {
        sequence += 1;
        h.telemetry
            .ingest(load(sequence, 5_000), Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never restarted"
        );
    }
    assert!(
        h.actuator
            .panicked
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(started.elapsed() >= PANIC_RESTART_DELAY);
    let _ = h.stop.send(());
}

/// An autoscaler whose task panicked and that is removed before it starts again (within
/// `PANIC_RESTART_DELAY`) has no task to stop: its last want must still leave the shared
/// budget, or the others' split counts it for good.
#[tokio::test(start_paused = true)]
async fn an_autoscaler_removed_while_its_task_restarts_leaves_the_shared_budget() {
    let config = ControlConfig::from_yaml(SHARING).unwrap();
    let actuator = Arc::new(PanicsOnce {
        inner: DryRunActuator::for_config(&config),
        target: "qwen",
        panicked: false.into(),
    });
    let h = start_on(config, actuator, true, Some(4));
    // Each wants 5 replicas of the 4 GPUs; qwen's first write panics.
    let mut sequence = 0;
    while !h
        .actuator
        .panicked
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        sequence += 1;
        h.telemetry
            .ingest(load_for("vllm", sequence), Instant::now())
            .unwrap();
        h.telemetry
            .ingest(load_for("tgi", sequence), Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(sequence < 100, "qwen never wrote");
    }
    // Removed while the service waits to start qwen again.
    assert!(reconfigure(
        &h.live,
        &h.telemetry,
        &h.status,
        sharing_without_qwen()
    ));
    for _ in 0..30 {
        sequence += 1;
        h.telemetry
            .ingest(load_for("vllm", sequence), Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let llama = h.status.get(PoolId(0)).unwrap();
    assert_eq!(
        llama.desired,
        Some(4),
        "llama alone in the budget of 4 GPUs, 2 s after the restart delay: {:?}",
        llama.decisions.back()
    );
    let _ = h.stop.send(());
}

/// The dry-run actuator, except that the next read of `llama` waits until `llama_go`, and the
/// next read of `qwen` keeps its thread (as an evaluation busy on another worker does) until
/// `release_qwen` is sent. Tells when each read has begun, and when `qwen` records an
/// evaluation after its release.
struct Interleaved {
    inner: DryRunActuator,
    llama_armed: std::sync::atomic::AtomicBool,
    llama_reading: tokio::sync::Notify,
    llama_go: tokio::sync::Notify,
    qwen_armed: std::sync::atomic::AtomicBool,
    qwen_reading: tokio::sync::Notify,
    release_qwen: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    qwen_released: std::sync::atomic::AtomicBool,
    qwen_recorded: tokio::sync::Notify,
}

impl Actuator for Interleaved {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        use std::sync::atomic::Ordering::SeqCst;
        if target.name == "llama" && self.llama_armed.swap(false, SeqCst) {
            self.llama_reading.notify_one();
            self.llama_go.notified().await;
        }
        if target.name == "qwen" && self.qwen_armed.swap(false, SeqCst) {
            let release = self.release_qwen.lock().unwrap().take().unwrap();
            self.qwen_reading.notify_one();
            // Not an await: the task is being polled throughout, so an abort cannot cancel it
            // here, only at its next await.
            tokio::task::block_in_place(|| release.recv().unwrap());
            self.qwen_released.store(true, SeqCst);
        }
        self.inner.current(target).await
    }

    async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        self.inner.set(target, replicas).await
    }

    async fn record(&self, evaluation: &Evaluation<'_>) {
        if evaluation.autoscaler.name == "qwen"
            && self.qwen_released.load(std::sync::atomic::Ordering::SeqCst)
        {
            self.qwen_recorded.notify_one();
        }
    }
}

/// On a multi-threaded runtime an autoscaler's task may be in the middle of an evaluation when
/// it is removed: the abort takes effect at its next await, after it has shared its want. That
/// late want must not stay in the budget: the next evaluation of the other autoscaler gets the
/// whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_want_shared_by_a_removed_autoscaler_finishing_an_evaluation_is_not_kept() {
    use std::sync::atomic::Ordering::SeqCst;
    let config = ControlConfig::from_yaml(SHARING).unwrap();
    let (release_qwen, released) = std::sync::mpsc::channel();
    let actuator = Arc::new(Interleaved {
        inner: DryRunActuator::for_config(&config),
        llama_armed: false.into(),
        llama_reading: tokio::sync::Notify::new(),
        llama_go: tokio::sync::Notify::new(),
        qwen_armed: false.into(),
        qwen_reading: tokio::sync::Notify::new(),
        release_qwen: Mutex::new(Some(released)),
        qwen_released: false.into(),
        qwen_recorded: tokio::sync::Notify::new(),
    });
    let h = start_on(config, actuator, true, Some(4));
    let mut llama = h.status.subscribe(PoolId(0)).unwrap();
    let mut qwen = h.status.subscribe(PoolId(1)).unwrap();
    // Each wants more than the 4 GPUs: both are held to their shares. Which share is whose
    // depends on which load each saw first (the budget never takes replicas back), but together
    // they never hold more than the 4 GPUs.
    let feed = {
        let telemetry = h.telemetry.clone();
        tokio::spawn(async move {
            for sequence in 1.. {
                telemetry
                    .ingest(load_for("vllm", sequence), Instant::now())
                    .unwrap();
                telemetry
                    .ingest(load_for("tgi", sequence), Instant::now())
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let held_by_the_budget = |s: &PoolStatus| {
        s.decisions
            .back()
            .is_some_and(|d| d.rule == Rule::GpuBudget && d.from == d.to && d.from >= 1)
    };
    let split = async {
        llama.wait_for(held_by_the_budget).await.unwrap();
        qwen.wait_for(held_by_the_budget).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(20), split)
        .await
        .expect("the budget split between llama and qwen");
    let held = |status: &PoolStatus| status.desired.unwrap_or_default();
    let (llama_held, qwen_held) = (held(&llama.borrow()), held(&qwen.borrow()));
    assert!(
        llama_held + qwen_held <= 4,
        "llama {llama_held} and qwen {qwen_held} replicas of one GPU each, budget 4"
    );

    // A step that never comes fails the test rather than hangs it.
    let handed_over = async {
        // Both in the middle of an evaluation: llama waiting for its read, qwen busy on a thread.
        h.actuator.llama_armed.store(true, SeqCst);
        h.actuator.qwen_armed.store(true, SeqCst);
        h.actuator.llama_reading.notified().await;
        h.actuator.qwen_reading.notified().await;
        feed.abort();
        // qwen removed: once its series have left /metrics its task has been told to stop.
        assert!(reconfigure(
            &h.live,
            &h.telemetry,
            &h.status,
            sharing_without_qwen()
        ));
        while decision_series(&h.status).contains("autoscaler=\"qwen\"") {
            tokio::task::yield_now().await;
        }
        // qwen finishes its evaluation: it shares its want, then is cancelled at its next await.
        release_qwen.send(()).unwrap();
        h.actuator.qwen_recorded.notified().await;

        llama.borrow_and_update();
        h.actuator.llama_go.notify_one();
        llama.changed().await.map(|()| llama.borrow().clone())
    };
    let after = tokio::time::timeout(Duration::from_secs(20), handed_over)
        .await
        .expect("qwen's removal and llama's next evaluation within 20 s")
        .unwrap();
    assert_eq!(
        after.desired,
        Some(4),
        "llama alone in the budget of 4 GPUs: {:?}",
        after.decisions.back()
    );
    let _ = h.stop.send(());
}

/// The dry-run actuator, except that reads fail with `read_failure`'s kind while it is set and
/// writes take `write_takes`; counts the evaluations recorded with an unreadable target.
struct Scripted {
    inner: DryRunActuator,
    read_failure: Mutex<Option<&'static str>>,
    write_takes: Duration,
    unreadable_recorded: std::sync::atomic::AtomicUsize,
}

impl Scripted {
    fn new(config: &ControlConfig, write_takes: Duration) -> Self {
        Scripted {
            inner: DryRunActuator::for_config(config),
            read_failure: Mutex::new(None),
            write_takes,
            unreadable_recorded: 0.into(),
        }
    }

    fn fail_reads(&self, kind: Option<&'static str>) {
        *self.read_failure.lock().unwrap() = kind;
    }

    fn unreadable_recorded(&self) -> usize {
        self.unreadable_recorded
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Actuator for Scripted {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        let failure = *self.read_failure.lock().unwrap();
        match failure {
            Some(kind) => Err(ActuatorError {
                target: target.to_string(),
                kind,
                transient: matches!(kind, "transient" | "conflict"),
                source: "refused".into(),
            }),
            None => self.inner.current(target).await,
        }
    }

    async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        tokio::time::sleep(self.write_takes).await;
        self.inner.set(target, replicas).await
    }

    async fn record(&self, evaluation: &Evaluation<'_>) {
        if !evaluation.unreadable.is_empty() {
            self.unreadable_recorded
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_target_refused_for_good_is_recorded_by_the_leader_and_a_transient_failure_is_not() {
    let config = ControlConfig::from_yaml(SPEC).unwrap();
    let actuator = Arc::new(Scripted::new(&config, Duration::ZERO));
    actuator.fail_reads(Some("not_found"));
    let h = start_on(config, actuator, false, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        h.actuator.unreadable_recorded(),
        0,
        "a follower records nothing"
    );

    h.leading.send_replace(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let recorded = h.actuator.unreadable_recorded();
    assert!(recorded >= 3, "{recorded} records in 3 evaluations");

    h.actuator.fail_reads(Some("transient"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.actuator.unreadable_recorded(), recorded);
    let _ = h.stop.send(());
}

/// A service without election leads for good, its leadership channel closed: that is no loss
/// of leadership, and a slow write lands.
#[tokio::test(start_paused = true)]
async fn a_slow_write_lands_where_leadership_is_fixed() {
    let config = ControlConfig::from_yaml(SPEC).unwrap();
    let actuator = Arc::new(Scripted::new(&config, Duration::from_secs(2)));
    let h = start_on(config, actuator, true, None);
    drop(h.leading);
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();
    for s in 1..=3 {
        h.telemetry.ingest(load(s, 5_000), Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let applied = tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.decisions.iter().any(|d| d.applied)),
    )
    .await;
    let log = h.status.get(PoolId(0)).unwrap().decisions;
    assert!(applied.is_ok(), "{log:?}");
    assert_eq!(h.actuator.inner.recommendations().len(), 1);
    let _ = h.stop.send(());
}

/// The dry-run actuator, except that the read after `arm` stops until `go`, telling `reading`
/// first: the test changes leadership while an evaluation is reading replicas.
struct PausesOneRead {
    inner: DryRunActuator,
    armed: std::sync::atomic::AtomicBool,
    reading: tokio::sync::Notify,
    go: tokio::sync::Notify,
    recorded: std::sync::atomic::AtomicUsize,
}

impl PausesOneRead {
    /// Over a dry-run actuator for `config` whose `llama` target has `replicas`, disarmed.
    fn with_llama_at(config: &ControlConfig, replicas: u32) -> Self {
        let inner = DryRunActuator::for_config(config);
        inner.preset("llama", replicas);
        PausesOneRead {
            inner,
            armed: false.into(),
            reading: tokio::sync::Notify::new(),
            go: tokio::sync::Notify::new(),
            recorded: 0.into(),
        }
    }
}

impl Actuator for PausesOneRead {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.reading.notify_one();
            self.go.notified().await;
        }
        self.inner.current(target).await
    }

    async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        self.inner.set(target, replicas).await
    }

    async fn record(&self, _evaluation: &Evaluation<'_>) {
        self.recorded
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A follower that becomes leader while an evaluation reads replicas must not write that
/// evaluation's decision: it was made with the follower's memory, without the restart hold.
#[tokio::test(start_paused = true)]
async fn leadership_gained_during_an_evaluation_does_not_skip_the_restart_hold() {
    let config = ControlConfig::from_yaml(QUICK_DOWN).unwrap();
    let actuator = Arc::new(PausesOneRead::with_llama_at(&config, 5));
    let h = start_on(config, actuator, false, None);
    let mut feed = light_load(h.telemetry.clone());
    // As a follower, a stable window of light load: it would scale 5 -> 1 if it led.
    feed(62).await;
    let last = h
        .status
        .get(PoolId(0))
        .unwrap()
        .decisions
        .back()
        .cloned()
        .unwrap();
    assert_eq!(
        (last.from, last.to, last.applied),
        (5, 1, false),
        "{last:?}"
    );

    // Leadership arrives while the next evaluation reads /scale.
    h.actuator
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    h.actuator.reading.notified().await;
    h.leading.send_replace(true);
    h.actuator.go.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let set = h.actuator.inner.recommendations();
    let last = h
        .status
        .get(PoolId(0))
        .unwrap()
        .decisions
        .back()
        .cloned()
        .unwrap();
    assert_eq!(
        set,
        vec![],
        "a scale-down written by a replica leading for 0 s, without the restart hold \
         (Events/status recorded: {}); last decision {last:?}",
        h.actuator
            .recorded
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    // The evaluations after it lead, from a restarted memory: they hold.
    feed(2).await;
    let last = h
        .status
        .get(PoolId(0))
        .unwrap()
        .decisions
        .back()
        .cloned()
        .unwrap();
    assert_eq!((last.to, last.rule), (5, Rule::RestartHold), "{last:?}");
    assert!(h.actuator.inner.recommendations().is_empty());
    let _ = h.stop.send(());
}

/// The dry-run actuator, except that while `missing` is set the target named `broken` is gone
/// (reads answer not found).
struct OneTargetMissing {
    inner: DryRunActuator,
    broken: &'static str,
    missing: std::sync::atomic::AtomicBool,
}

impl Actuator for OneTargetMissing {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        if target.name == self.broken && self.missing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ActuatorError {
                target: target.to_string(),
                kind: TARGET_NOT_FOUND,
                transient: false,
                source: format!("deployments.apps \"{}\" not found", self.broken).into(),
            });
        }
        self.inner.current(target).await
    }

    async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        self.inner.set(target, replicas).await
    }
}

/// README: an autoscaler the shared budget cuts waits "at most one --max-evaluation-interval"
/// for the others; one bad target must not stop the others.
#[tokio::test(start_paused = true)]
async fn an_unreadable_autoscaler_holds_the_shared_budget_one_interval_at_most() {
    let config = ControlConfig::from_yaml(
        r#"
autoscalers:
  - name: llama
    spec:
      selector: { backend: vllm }
      pools:
        unified:
          scaleTargetRef: { name: llama }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
      behavior: { scaleUp: { maxStep: 10, period: 1s } }
  - name: qwen
    spec:
      selector: { backend: tgi }
      pools:
        unified:
          scaleTargetRef: { name: qwen }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
      slo: { ttft: 500ms }
"#,
    )
    .unwrap();
    let actuator = Arc::new(OneTargetMissing {
        inner: DryRunActuator::for_config(&config),
        broken: "qwen",
        missing: true.into(),
    });
    let h = start_on(config, actuator, true, Some(4));
    // llama wants 5 replicas; the budget has 4 GPUs; qwen's target does not exist.
    for s in 1..=30 {
        h.telemetry.ingest(load(s, 5_000), Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let llama = h.status.get(PoolId(0)).unwrap();
    let last = llama.decisions.back().cloned().unwrap();
    assert_eq!(
        llama.desired,
        Some(4),
        "30 s later llama still holds: {last:?}; set: {:?}",
        h.actuator.inner.recommendations()
    );
    let _ = h.stop.send(());
}

/// With replicas unreadable, KEDA's activation comes from telemetry alone: unknown with none
/// (KEDA must not scale to zero on that), false only from fresh reports showing no load, and
/// the last known answer while reports are stale.
#[tokio::test(start_paused = true)]
async fn unreadable_replicas_leave_activity_to_fresh_telemetry() {
    let config = ControlConfig::from_yaml(SPEC).unwrap();
    let actuator = Arc::new(OneTargetMissing {
        inner: DryRunActuator::for_config(&config),
        broken: "llama",
        missing: true.into(),
    });
    let h = start_on(config, actuator, true, None);
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.last_error.is_some()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.status.get(PoolId(0)).unwrap().active, None);

    let idle = |sequence: u64| v1::ReportRequest {
        keys: Vec::new(),
        ..load(sequence, 0)
    };
    for s in 1..=3 {
        h.telemetry.ingest(idle(s), Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(h.status.get(PoolId(0)).unwrap().active, Some(false));

    h.telemetry.ingest(load(4, 5_000), Instant::now()).unwrap();
    status.wait_for(|s| s.active == Some(true)).await.unwrap();
    // The gateways go silent: no load is seen any more, but nothing says the pool is idle.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.status.get(PoolId(0)).unwrap().active, Some(true));
    let _ = h.stop.send(());
}

/// An edit reaches the running task while it waits between evaluations (the usual case) and is
/// in force from its next evaluation. Each edit below lowers maxReplicas under the count, which
/// the policy applies at once (rule max_replicas).
#[tokio::test(start_paused = true)]
async fn every_edit_made_between_evaluations_is_applied() {
    let h = start_with(
        ControlConfig::from_yaml(SPEC).unwrap(),
        true,
        &[("llama", 10)],
    );
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();
    let mut sequence = 0;
    for max in (3..=9).rev() {
        let edited = SPEC.replace("maxReplicas: 10", &format!("maxReplicas: {max}"));
        assert!(reconfigure(
            &h.live,
            &h.telemetry,
            &h.status,
            ControlConfig::from_yaml(&edited).unwrap()
        ));
        // Fresh load (about 6 replicas' worth), so the policy decides rather than holds.
        for _ in 0..2 {
            sequence += 1;
            h.telemetry
                .ingest(load(sequence, 5_000), Instant::now())
                .unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let s = h.status.get(PoolId(0)).unwrap();
        let last = s.decisions.back().cloned().unwrap();
        assert!(
            s.desired.unwrap() <= max,
            "2 s after maxReplicas was edited to {max}: {} -> {} ({:?}); set so far {:?}",
            last.from,
            last.to,
            last.rule,
            h.actuator
                .recommendations()
                .iter()
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
        );
    }
    let _ = h.stop.send(());
}

/// Leadership lost and regained while an evaluation reads /scale (a slow API server: renewals
/// fail, another replica leads for a while, this one takes the Lease back): another leader acted
/// meanwhile, so scale-down waits a full stable window from the regain.
#[tokio::test(start_paused = true)]
async fn leadership_lost_and_regained_during_a_read_restarts_the_hold() {
    let config = ControlConfig::from_yaml(QUICK_DOWN).unwrap();
    let actuator = Arc::new(PausesOneRead::with_llama_at(&config, 5));
    let h = start_on(config, actuator, true, None);
    let mut feed = light_load(h.telemetry.clone());
    feed(30).await;
    h.actuator
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    h.actuator.reading.notified().await;
    h.leading.send_replace(false);
    tokio::time::sleep(Duration::from_secs(5)).await; // another replica leads
    h.leading.send_replace(true);
    h.actuator.go.notify_one();
    // 36 s after regaining leadership: less than a stable window (60 s).
    feed(36).await;
    let last = h
        .status
        .get(PoolId(0))
        .unwrap()
        .decisions
        .back()
        .cloned()
        .unwrap();
    assert_eq!(
        h.actuator.inner.recommendations(),
        vec![],
        "scaled down {} s after regaining leadership; last {:?}",
        36,
        (last.from, last.to, last.rule)
    );
    let _ = h.stop.send(());
}

/// Replicas asked for that never became ready, then given up (the count set back to what it was,
/// or below): none of them was timed, so no time to ready may be taken from them. The ready
/// replicas left are those that were ready before the ask.
#[test]
fn replicas_given_up_before_any_was_ready_measure_no_time_to_ready() {
    // 2 ready; 2 -> 10 at 10 s; the 8 stay Pending (no GPUs); back to 2 at 1,000 s.
    let mut observed = Observed::default();
    observed.observe(replicas(2, 2), secs(0));
    observed.observe(replicas(10, 2), secs(10));
    observed.observe(replicas(10, 2), secs(500));
    observed.observe(replicas(2, 2), secs(1_000));
    assert_eq!(
        observed.time_to_ready, None,
        "no replica asked for at 10 s ever became ready"
    );

    // The same, lowered to 1 rather than back to 2.
    let mut observed = Observed::default();
    observed.observe(replicas(2, 2), secs(0));
    observed.observe(replicas(10, 2), secs(10));
    observed.observe(replicas(1, 2), secs(1_000));
    assert_eq!(
        observed.time_to_ready, None,
        "no replica asked for at 10 s ever became ready"
    );
}

/// Replicas asked for, some of them ready within 50 s, the rest Pending until the count is
/// lowered (a scale-down after the burst) to fewer than are ready: the ready ones took at most
/// 50 s, not the 990 s until the scale-down.
#[test]
fn lowering_to_replicas_long_ready_does_not_time_them_to_the_lowering() {
    let mut observed = Observed::default();
    observed.observe(replicas(2, 2), secs(0));
    observed.observe(replicas(10, 2), secs(10));
    observed.observe(replicas(10, 6), secs(60));
    observed.observe(replicas(10, 6), secs(500));
    observed.observe(replicas(5, 6), secs(1_000));
    assert!(
        observed.time_to_ready.is_none_or(|t| t <= secs(50)),
        "replicas 3 to 5 were ready 50 s after they were asked for: {:?}",
        observed.time_to_ready
    );
}

/// Replicas ready above the count asked for (a rolling update's surge: a
/// Deployment's readyReplicas counts the old ReplicaSet's pods too; or a status that lags a
/// lowering). A raise then "comes ready" at once and measures 0 s, overwriting the 60 s
/// measured before: the policy's starting grace collapses to nothing.
#[test]
fn ready_above_the_count_asked_for_does_not_measure_a_zero_time_to_ready() {
    let mut observed = Observed::default();
    observed.observe(replicas(2, 2), secs(0));
    observed.observe(replicas(4, 2), secs(10));
    observed.observe(replicas(4, 4), secs(70));
    assert_eq!(observed.time_to_ready, Some(secs(60)));
    // Rolling update with maxSurge 1: 5 ready of 4 asked for.
    observed.observe(replicas(4, 5), secs(1_000));
    observed.observe(replicas(5, 5), secs(1_010));
    assert_ne!(
        observed.time_to_ready,
        Some(secs(0)),
        "no replica asked for at 1,010 s had started; the surge pod is not one of them"
    );
}

/// A replica crashes (4 asked for, 3 ready), 5 are asked for, the new replica is ready in 120 s
/// and the crashed one, crash-looping, is back only at 1,200 s: counted, not named, either may
/// have come first, so the ask is not timed (it measured 900 s) and the 120 s measured before
/// stays. A later ask with every replica below it ready is timed again.
#[test]
fn a_crashed_replica_back_late_is_not_timed_as_a_later_ask() {
    let mut observed = Observed::default();
    observed.observe(replicas(3, 3), secs(0));
    observed.observe(replicas(4, 3), secs(0));
    observed.observe(replicas(4, 4), secs(120));
    assert_eq!(observed.time_to_ready, Some(secs(120)));
    observed.observe(replicas(4, 3), secs(200));
    observed.observe(replicas(5, 3), secs(300));
    observed.observe(replicas(5, 4), secs(420));
    observed.observe(replicas(5, 5), secs(1_200));
    assert_eq!(
        observed.time_to_ready,
        Some(secs(120)),
        "the replica back at 1,200 s may be the crashed one"
    );
    observed.observe(replicas(6, 5), secs(1_300));
    observed.observe(replicas(6, 6), secs(1_400));
    assert_eq!(observed.time_to_ready, Some(secs(100)));

    // The crash after the ask: 4 -> 6 at 0 s, one of the four crashes at 30 s, two more are
    // ready at 90 s: which two cannot be told, so nothing is timed.
    let mut observed = Observed::default();
    observed.observe(replicas(4, 4), secs(0));
    observed.observe(replicas(6, 4), secs(0));
    observed.observe(replicas(6, 3), secs(30));
    observed.observe(replicas(6, 5), secs(90));
    assert_eq!(observed.time_to_ready, None);
}

/// A replica crashes (4 asked for, 3 ready), 5 are asked for, then the count goes back to 4
/// before the new replica is ready (its pod is deleted): the ask is given up, and the
/// crash-looping replica back at 1,100 s is not timed as it (a first fix, which counted asks
/// from what was ready, kept the given-up ask and measured 900 s).
#[test]
fn an_ask_given_up_after_a_crash_does_not_time_the_crashed_replica_back_late() {
    let mut observed = Observed::default();
    observed.observe(replicas(4, 4), secs(0));
    observed.observe(replicas(4, 3), secs(100));
    observed.observe(replicas(5, 3), secs(200));
    observed.observe(replicas(4, 3), secs(250));
    observed.observe(replicas(4, 4), secs(1_100));
    assert_eq!(
        observed.time_to_ready, None,
        "the only ask (the 5th replica, at 200 s) was given up at 250 s before any replica of it \
         was ready; asks left: {:?}",
        observed.asks
    );
}

/// 4 -> 5 at 0 s; at 10 s one of the four running replicas fails a readiness probe (a loaded
/// vLLM answering slowly: no crash, no restart, no model to load) and is ready again at 11 s;
/// the new replica is ready at 120 s. The flap must not be timed as the ask: a first fix, which
/// counted asks from what was ready, measured 11 s, and the starting grace collapsed to a
/// readiness flap's length.
#[test]
fn a_readiness_flap_during_an_ask_is_not_timed_as_the_ask() {
    let mut observed = Observed::default();
    observed.observe(replicas(4, 4), secs(0));
    observed.observe(replicas(5, 4), secs(0));
    observed.observe(replicas(5, 3), secs(10));
    observed.observe(replicas(5, 4), secs(11));
    observed.observe(replicas(5, 5), secs(120));
    // Counted, not named, the replica back at 11 s could as well be the one asked for (and the
    // one lost at 10 s back at 120 s): no measurement rather than 11 s.
    assert!(
        observed.time_to_ready.is_none_or(|t| t == secs(120)),
        "the replica asked for at 0 s was ready at 120 s; the one back at 11 s never stopped: {:?}",
        observed.time_to_ready
    );
}

/// llama takes all of the 4-GPU budget qwen's one replica leaves; then its Deployment is deleted (its autoscaler left in
/// place, deciding nothing while the target is gone). The GPUs its grant held are no pod's any
/// more: qwen, loaded, grows into them instead of being held at nothing for good.
#[tokio::test(start_paused = true)]
async fn a_deleted_target_gives_its_part_of_the_shared_budget_back() {
    let config = ControlConfig::from_yaml(SHARING).unwrap();
    let actuator = Arc::new(OneTargetMissing {
        inner: DryRunActuator::for_config(&config),
        broken: "llama",
        missing: false.into(),
    });
    let h = start_on(config, actuator.clone(), true, Some(4));
    for s in 1..=10 {
        h.telemetry
            .ingest(load_for("vllm", s), Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // qwen's one replica holds the fourth GPU.
    assert_eq!(h.status.get(PoolId(0)).unwrap().desired, Some(3));
    actuator
        .missing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for s in 1..=30 {
        h.telemetry
            .ingest(load_for("tgi", s), Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let qwen = h.status.get(PoolId(1)).unwrap();
    assert_eq!(
        qwen.desired,
        Some(4),
        "30 s after llama's target was deleted qwen holds: {:?}",
        qwen.decisions.back()
    );
    let _ = h.stop.send(());
}

/// An edit that moves an autoscaler to another scale target (or splits it into prefill and
/// decode) keeps it running; the pool it no longer has leaves `/metrics` with it. Series were
/// forgotten only when a whole autoscaler went: one more set for good per such edit.
#[tokio::test(start_paused = true)]
async fn an_edit_to_another_scale_target_drops_the_old_pools_decision_series() {
    let h = start(ControlConfig::from_yaml(SPEC).unwrap());
    let mut llama = h.status.subscribe(PoolId(0)).unwrap();
    llama.wait_for(|s| !s.decisions.is_empty()).await.unwrap();
    assert!(decision_series(&h.status).contains("pool=\"llama\""));

    let moved = SPEC.replace(
        "scaleTargetRef: { name: llama }",
        "scaleTargetRef: { name: llama-v2 }",
    );
    assert!(reconfigure(
        &h.live,
        &h.telemetry,
        &h.status,
        ControlConfig::from_yaml(&moved).unwrap()
    ));
    let id = h.live.current().pools()[0].id;
    assert_ne!(id, PoolId(0), "another target is another pool");
    assert!(h.status.get(PoolId(0)).is_none(), "the old pool is gone");
    let mut v2 = h.status.subscribe(id).unwrap();
    v2.wait_for(|s| !s.decisions.is_empty()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;

    let series = decision_series(&h.status);
    assert!(series.contains("pool=\"llama-v2\""), "{series}");
    assert!(
        !series.contains("pool=\"llama\""),
        "the pool the autoscaler no longer has is still exported:\n{series}"
    );
    let _ = h.stop.send(());
}

/// A scale target found deleted (404) no longer has replicas in the pool's status: `/v1/pools`
/// (`replicas.current`, `replicas.ready`) and `flyball_pool_replicas{state="current"|"ready"}`
/// went on reporting those of a Deployment that no longer existed, for as long as the
/// autoscaler did.
#[tokio::test(start_paused = true)]
async fn a_deleted_scale_target_is_not_reported_with_its_last_replicas() {
    let config = ControlConfig::from_yaml(SPEC).unwrap();
    let actuator = Arc::new(Scripted::new(&config, Duration::ZERO));
    let h = start_on(config, actuator, true, None);
    let mut llama = h.status.subscribe(PoolId(0)).unwrap();
    llama.wait_for(|s| s.replicas.is_some()).await.unwrap();

    h.actuator.fail_reads(Some(TARGET_NOT_FOUND));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = h.status.get(PoolId(0)).unwrap();
    assert!(status.last_error.is_some(), "{status:?}");
    assert_eq!(
        status.replicas.map(|r| (r.current, r.ready)),
        None,
        "replicas of a deleted target, still reported 5 s after it was found gone (error: {:?})",
        status.last_error
    );
    let _ = h.stop.send(());
}

/// One configuration change moves scale target `x` from autoscaler `a` (now on `y`) to
/// autoscaler `b`. The two tasks take it up independently; `b`'s first evaluation counts a
/// refused call on `x` before `a`'s task applies its redefinition. `flyball_actuator_errors_total`
/// is labelled (namespace, pool, kind) only, so both count under one series: `a`'s edit must not
/// remove it (it left `/metrics`, and `b`'s next error brought it back at 1: a counter of 4
/// going down to 1).
#[test]
fn an_edit_does_not_remove_a_series_another_autoscaler_counts_under() {
    let status = Status::new(0);
    let a = ("ns".to_owned(), "a".to_owned());
    let b = ("ns".to_owned(), "b".to_owned());
    let on_x = || ActuatorErrorLabels {
        namespace: "ns".into(),
        pool: "x".into(),
        kind: "forbidden",
    };
    for _ in 0..3 {
        status.count_actuator_error(&a, on_x());
    }
    // The edit: `b` now scales x and counts first; then `a`'s task applies its new definition.
    status.count_actuator_error(&b, on_x());
    status.retain_series(&a, &[("ns", "y", "unified")]);
    let exported = status
        .actuator_errors
        .get(&on_x())
        .map(|counter| counter.get());
    assert_eq!(
        exported,
        Some(4),
        "autoscaler b still counts errors on ns/x; its series must stay (and not go down)"
    );
}

/// A prefill/decode pair with one target unreadable is not decided, but the other pool, whose
/// /scale reads fine and which has load, is still published: its replicas, and its activity
/// (active). The evaluation used to return at the first unreadable pool, leaving it unknown
/// (KEDA's IsActive: UNAVAILABLE, StreamIsActive: nothing) for as long as its partner's target
/// could not be read.
#[tokio::test(start_paused = true)]
async fn a_readable_pool_with_load_is_active_while_its_partner_cannot_be_read() {
    let config = ControlConfig::from_yaml(
        r#"
autoscalers:
  - name: llama
    spec:
      selector: { backend: vllm }
      pools:
        prefill:
          scaleTargetRef: { name: llama-prefill }
          maxReplicas: 10
          capacity: { prefillTokensPerSecond: 1000 }
        decode:
          scaleTargetRef: { name: llama-decode }
          maxReplicas: 10
          capacity: { decodeTokensPerSecond: 1000 }
      slo: { ttft: 500ms, tpot: 50ms }
"#,
    )
    .unwrap();
    let decode = config
        .pools()
        .iter()
        .find(|p| p.name == "llama-decode")
        .unwrap()
        .id;
    let actuator = Arc::new(OneTargetMissing {
        inner: DryRunActuator::for_config(&config),
        broken: "llama-prefill",
        missing: true.into(),
    });
    let h = start_on(config, actuator, true, None);
    for s in 1..=5 {
        h.telemetry.ingest(load(s, 5_000), Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = h.status.get(decode).unwrap();
    assert_eq!(
        (status.active, status.replicas.is_some()),
        (Some(true), true),
        "decode (readable, 3 sequences decoding) 2.5 s into load while prefill's target is \
         missing: {status:?}"
    );
    let _ = h.stop.send(());
}

/// README: "quiet gateways become stale after `--stale-after` (3 s, or 3 of their report
/// intervals if longer)". A gateway configured with `reportIntervalMs: 5000` (the filter takes
/// 100 to 60000) that reports on schedule is live and its telemetry complete; yet the pool's
/// freshness compares the newest report's age with the bare `--stale-after`, so 3 to 5 s after
/// each report every evaluation reads `Stale` and records the current count as held in the
/// scale-down window: light load, fresh and complete, never lets the pool scale down.
#[tokio::test(start_paused = true)]
async fn a_gateway_reporting_every_five_seconds_does_not_hold_scale_down_for_ever() {
    let spec = QUICK_DOWN.replace("stabilizationWindow: 0s", "stabilizationWindow: 10s");
    let h = start_with(
        ControlConfig::from_yaml(&spec).unwrap(),
        true,
        &[("llama", 5)],
    );
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();
    // One gateway, light load, one report every 5 s for 3 minutes: past the restart hold (60 s)
    // and many scale-down windows (10 s).
    for sequence in 1..=36 {
        h.telemetry
            .ingest(load(sequence, 10), Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let reporters = h.telemetry.reporters(Instant::now());
    assert_eq!(
        (reporters.live, reporters.stale),
        (1, 0),
        "the gateway is live"
    );
    let s = h.status.get(PoolId(0)).unwrap();
    let rules: Vec<Rule> = s.decisions.iter().rev().take(6).map(|d| d.rule).collect();
    let set = h.actuator.recommendations();
    assert!(
        set.iter()
            .any(|(target, n)| target.name == "llama" && *n == 1),
        "light load from a live gateway on schedule never scaled 5 -> 1: set {set:?}, \
         latest rules {rules:?}"
    );
    let _ = h.stop.send(());
}

/// One fast start (an image already on the node) among slow ones does not make the policy expect
/// every start to be fast; a lasting change is followed within three asks.
#[test]
fn the_expected_time_to_ready_is_the_median_of_the_last_five() {
    // Each ask: one more replica asked for at `at`, ready `took` later.
    fn ask(observed: &mut Observed, n: u32, at: u64, took: u64) {
        observed.observe(replicas(n + 1, n), secs(at));
        observed.observe(replicas(n + 1, n + 1), secs(at + took));
    }
    let mut observed = Observed::default();
    observed.observe(replicas(1, 1), secs(0));
    assert_eq!(observed.expected_time_to_ready(), None);
    ask(&mut observed, 1, 0, 120);
    assert_eq!(observed.expected_time_to_ready(), Some(secs(120)));
    ask(&mut observed, 2, 1_000, 120);
    ask(&mut observed, 3, 2_000, 20);
    assert_eq!(
        observed.time_to_ready,
        Some(secs(20)),
        "the latest measured"
    );
    assert_eq!(observed.expected_time_to_ready(), Some(secs(120)));
    ask(&mut observed, 4, 3_000, 20);
    assert_eq!(
        observed.expected_time_to_ready(),
        Some(secs(120)),
        "of an even count, the longer middle one"
    );
    ask(&mut observed, 5, 4_000, 20);
    assert_eq!(observed.expected_time_to_ready(), Some(secs(20)));
    // Only the last five count: three slow ones now outweigh the two fast ones left.
    for (i, n) in (6..9).enumerate() {
        ask(&mut observed, n, 5_000 + 1_000 * i as u64, 300);
    }
    assert_eq!(observed.ready_times.len(), 5);
    assert_eq!(observed.expected_time_to_ready(), Some(secs(300)));
}

/// A pool whose replicas come ready `takes` after they are asked for, until `stuck`: replicas
/// asked for after that stay starting (Pending for want of nodes).
struct StartsSlowly {
    takes: Duration,
    state: std::sync::Mutex<SlowPool>,
}

struct SlowPool {
    desired: u32,
    ready: u32,
    /// When each count was asked for, and whether its replicas will ever be ready.
    asks: Vec<(Instant, u32, bool)>,
    stuck: bool,
}

impl StartsSlowly {
    fn new(takes: Duration) -> Self {
        StartsSlowly {
            takes,
            state: std::sync::Mutex::new(SlowPool {
                desired: 1,
                ready: 1,
                asks: Vec::new(),
                stuck: false,
            }),
        }
    }
}

impl Actuator for StartsSlowly {
    async fn current(&self, _: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        let mut pool = self.state.lock().unwrap();
        let now = Instant::now();
        let came_ready = pool
            .asks
            .iter()
            .filter(|(at, _, comes)| *comes && now.duration_since(*at) >= self.takes)
            .map(|(_, n, _)| *n)
            .max();
        pool.ready = pool.ready.max(came_ready.unwrap_or(0)).min(pool.desired);
        Ok(PoolReplicas {
            desired: pool.desired,
            current: pool.desired,
            ready: pool.ready,
        })
    }

    async fn set(&self, _: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        let mut pool = self.state.lock().unwrap();
        pool.desired = replicas;
        let comes = !pool.stuck;
        pool.asks.push((Instant::now(), replicas, comes));
        Ok(())
    }
}

/// The time a pool took to become ready is what the policy waits for before it asks again for
/// replicas that are still starting: measured at 20 s here, replicas stuck starting are asked
/// for again 1.5 x 20 s = 30 s after they were asked for, not after the 300 s assumed before any
/// was measured.
#[tokio::test(start_paused = true)]
async fn replicas_still_starting_are_asked_for_again_after_the_measured_time_to_ready() {
    let config = ControlConfig::from_yaml(SPEC).unwrap();
    let actuator = Arc::new(StartsSlowly::new(secs(20)));
    let h = start_on(config, actuator.clone(), true, None);
    let mut status = h.status.subscribe(PoolId(0)).unwrap();
    status.wait_for(|s| s.replicas.is_some()).await.unwrap();

    // Input tokens per second against 1,000 per replica, reported every 100 ms (so the rate
    // read over a window is within 1%: away from whole replicas, the need does not move).
    let rate = Arc::new(std::sync::atomic::AtomicU64::new(2_500));
    let feeding = {
        let (telemetry, rate) = (h.telemetry.clone(), rate.clone());
        tokio::spawn(async move {
            for sequence in 1.. {
                let tokens = rate.load(std::sync::atomic::Ordering::SeqCst) / 10;
                telemetry
                    .ingest(load(sequence, tokens), Instant::now())
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    status
        .wait_for(|s| s.replicas.is_some_and(|r| r.ready >= 3))
        .await
        .unwrap();

    // Twice the load, and no node for the replicas it needs.
    actuator.state.lock().unwrap().stuck = true;
    rate.store(5_500, std::sync::atomic::Ordering::SeqCst);
    status
        .wait_for(|s| s.replicas.is_some_and(|r| r.desired >= 6))
        .await
        .unwrap();
    let asked = Instant::now();
    let asked_for = status.borrow().replicas.unwrap().desired;
    status
        .wait_for(|s| s.replicas.is_some_and(|r| r.desired > asked_for))
        .await
        .unwrap();
    let waited = asked.elapsed();
    assert!(
        (secs(30)..=secs(32)).contains(&waited),
        "replicas starting for {waited:?} were asked for again; 1.5 x the 20 s measured is 30 s: {:#?}",
        status
            .borrow()
            .decisions
            .iter()
            .map(|d| &d.reason)
            .collect::<Vec<_>>()
    );
    feeding.abort();
    let _ = h.stop.send(());
}
