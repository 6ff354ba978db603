//! The autoscaler spec: raw shape, defaults, validation messages.

use std::time::Duration;

use super::support::*;
use crate::spec::*;
use crate::*;

fn errors_of(yaml: &str) -> Vec<String> {
    match AutoscalerSpec::try_from(&raw(yaml)) {
        Ok(_) => panic!("expected validation errors for:\n{yaml}"),
        Err(e) => e.errors().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn the_example_spec_validates_with_its_values() {
    let spec = spec(UNIFIED);
    let Pools::Unified(pool) = spec.pools() else {
        panic!("expected a unified pool");
    };
    assert_eq!(pool.scale_target_ref.name, "llama");
    assert_eq!(pool.scale_target_ref.namespace.as_deref(), Some("default"));
    assert_eq!((pool.replicas.min(), pool.replicas.max()), (1, 16));
    assert_eq!(pool.capacity.prefill_tokens_per_s, Some(8000.0));
    assert_eq!(pool.capacity.concurrent_sequences, Some(64.0));
    assert_eq!(spec.slo().ttft, Some(ms(500)));
    assert_eq!(spec.slo().tpot, Some(ms(50)));
    assert_eq!(spec.selector().backend.as_deref(), Some("vllm-llama"));
    assert!(!spec.scale_to_zero());
    assert!(!spec.dry_run());
    assert_eq!(spec.gpu_budget(), None);
}

#[test]
fn omitted_fields_take_hpa_like_defaults() {
    let spec = spec(
        r#"
selector: { model: llama }
pools:
  unified: { scaleTargetRef: { name: llama }, maxReplicas: 4 }
slo: { ttft: 1s }
"#,
    );
    let Pools::Unified(pool) = spec.pools() else {
        panic!("expected a unified pool");
    };
    assert_eq!(pool.scale_target_ref.api_version, "apps/v1");
    assert_eq!(pool.scale_target_ref.kind, "Deployment");
    assert_eq!(pool.replicas.min(), 1);
    assert_eq!(pool.gpus_per_replica, 1);
    assert_eq!(spec.slo().percentile, DEFAULT_PERCENTILE);
    let b = spec.behavior();
    assert_eq!(b.scale_up, DEFAULT_SCALE_UP);
    assert_eq!(b.scale_down, DEFAULT_SCALE_DOWN);
    assert_eq!(b.scale_down.stabilization_window, secs(300));
    assert_eq!(b.cooldown, DEFAULT_COOLDOWN);
    assert_eq!(b.panic_threshold, DEFAULT_PANIC_THRESHOLD);
}

#[test]
fn a_partly_given_direction_keeps_that_directions_defaults() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_down = Some(ScalingRulesRaw {
            max_step: Some(2),
            ..Default::default()
        });
    });
    let down = spec.behavior().scale_down;
    assert_eq!(down.max_step, 2);
    assert_eq!(down.stabilization_window, secs(300));
    assert_eq!(down.period, secs(60));
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    let yaml = UNIFIED.replace("minReplicas: 1", "minReplica: 1");
    let err = serde_yaml_ng::from_str::<AutoscalerSpecRaw>(&yaml)
        .expect_err("a misspelt key must not parse");
    assert!(err.to_string().contains("minReplica"), "{err}");
}

#[test]
fn the_raw_spec_round_trips_through_yaml() {
    let raw = raw(UNIFIED);
    let text = serde_yaml_ng::to_string(&raw).unwrap();
    let again: AutoscalerSpecRaw = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(raw, again);
}

#[test]
fn the_schema_is_camel_case_and_constrains_durations() {
    let schema = schemars::schema_for!(AutoscalerSpecRaw);
    let text = serde_json::to_string(&schema).unwrap();
    for key in [
        "scaleTargetRef",
        "minReplicas",
        "gpusPerReplica",
        "prefillTokensPerSecond",
        "stabilizationWindow",
        "panicThreshold",
        "scaleToZero",
        "dryRun",
        "gpuBudget",
    ] {
        assert!(text.contains(key), "schema lacks {key}");
    }
    let pattern = serde_json::to_string(crate::duration::DURATION_PATTERN).unwrap();
    assert!(text.contains(&pattern), "schema lacks the duration pattern");
    assert!(text.contains("\"additionalProperties\":false"));
}

#[test]
fn max_replicas_below_min_names_path_value_and_rule() {
    let errors = errors_of(&DISAGGREGATED.replace(
        "    scaleTargetRef: { name: llama-decode }\n    maxReplicas: 16",
        "    scaleTargetRef: { name: llama-decode }\n    maxReplicas: 0",
    ));
    assert_eq!(
        errors,
        ["spec.pools.decode.maxReplicas = 0: must be >= minReplicas (1)"]
    );
}

#[test]
fn every_violation_is_reported_not_just_the_first() {
    let errors = errors_of(
        r#"
selector: {}
pools:
  unified:
    scaleTargetRef: { name: "" }
    minReplicas: 0
    maxReplicas: 4
    capacity: { prefillTokensPerSecond: -1, concurrentSequences: 0 }
slo: { ttft: 5 ms, tpot: 0s, percentile: 100 }
behavior:
  scaleUp: { maxStep: 0, period: 0s }
  scaleDown: { stabilizationWindow: 5d }
  cooldown: soon
  panicThreshold: 1
"#,
    );
    let expected = [
        "spec.selector = {}: give backend, model or both",
        "spec.pools.unified.scaleTargetRef.name = \"\": must not be empty",
        "spec.pools.unified.minReplicas = 0: must be >= 1 (scaleToZero: true lets idle pools reach 0)",
        "spec.pools.unified.capacity.prefillTokensPerSecond = -1: must be a number above 0",
        "spec.pools.unified.capacity.concurrentSequences = 0: must be >= 1",
        "spec.slo.ttft = \"5 ms\": not a duration (unknown unit \" ms\" (use ns, us, ms, s, m or h)); write e.g. \"500ms\", \"2s\", \"1m30s\"",
        "spec.slo.tpot = \"0s\": must be above 0",
        "spec.slo.percentile = 100: must be > 0 and < 100",
        "spec.behavior.scaleUp.maxStep = 0: must be >= 1",
        "spec.behavior.scaleUp.period = \"0s\": must be above 0",
        "spec.behavior.scaleDown.stabilizationWindow = \"5d\": not a duration (unknown unit \"d\" (use ns, us, ms, s, m or h)); write e.g. \"500ms\", \"2s\", \"1m30s\"",
        "spec.behavior.cooldown = \"soon\": not a duration (expected a number at byte 0); write e.g. \"500ms\", \"2s\", \"1m30s\"",
        "spec.behavior.panicThreshold = 1: must be a number above 1",
    ];
    assert_eq!(errors, expected);
}

#[test]
fn pools_must_be_unified_or_prefill_and_decode() {
    let both = UNIFIED.replace(
        "pools:\n",
        "pools:\n  prefill: { scaleTargetRef: { name: p }, maxReplicas: 2 }\n",
    );
    assert_eq!(
        errors_of(&both),
        ["spec.pools = {unified, prefill}: give either unified, or prefill and decode"]
    );

    let prefill_only = r#"
selector: { backend: b }
pools:
  prefill: { scaleTargetRef: { name: p }, maxReplicas: 2 }
slo: { ttft: 1s }
"#;
    assert_eq!(
        errors_of(prefill_only),
        [
            "spec.pools.decode = (absent): required with prefill (disaggregated serving needs both pools)"
        ]
    );

    let none = "selector: { backend: b }\npools: {}\nslo: { ttft: 1s }\n";
    assert_eq!(
        errors_of(none),
        ["spec.pools = {}: give either unified, or prefill and decode"]
    );
}

#[test]
fn disaggregated_pools_need_an_objective_or_a_hint_each_and_distinct_targets() {
    let yaml = r#"
selector: { backend: b }
pools:
  prefill: { scaleTargetRef: { name: same }, maxReplicas: 2 }
  decode: { scaleTargetRef: { name: same }, maxReplicas: 2 }
slo: { tpot: 50ms }
"#;
    assert_eq!(
        errors_of(yaml),
        [
            "spec.pools.decode.scaleTargetRef = \"Deployment/same\": must differ from pools.prefill.scaleTargetRef",
            "spec.slo.ttft = (absent): required for the prefill pool unless pools.prefill.capacity.prefillTokensPerSecond is given",
        ]
    );
}

#[test]
fn a_gpu_budget_must_cover_every_pool_at_min_replicas() {
    let mut raw = raw(DISAGGREGATED);
    raw.gpu_budget = Some(3);
    for pool in [&mut raw.pools.prefill, &mut raw.pools.decode]
        .into_iter()
        .flatten()
    {
        pool.min_replicas = 1;
        pool.gpus_per_replica = 2;
    }
    let err = AutoscalerSpec::try_from(&raw).expect_err("budget too small");
    assert_eq!(
        err.to_string(),
        "spec.gpuBudget = 3: must be >= the GPUs of all pools at minReplicas (4)"
    );
}

#[test]
fn a_custom_path_prefix_names_fields_in_a_file() {
    let yaml = UNIFIED.replace("maxReplicas: 16", "maxReplicas: 0");
    let err = AutoscalerSpec::from_raw(&raw(&yaml), "autoscalers[2]").expect_err("invalid");
    assert_eq!(
        err.to_string(),
        "autoscalers[2].pools.unified.maxReplicas = 0: must be >= minReplicas (1)"
    );
}

#[test]
fn validated_constructors_keep_their_invariants() {
    assert!(ReplicaBounds::try_new(2, 1).is_err());
    assert!(ReplicaBounds::try_new(0, 1).is_err());
    let bounds = ReplicaBounds::try_new(1, 3).unwrap();
    assert_eq!((bounds.min(), bounds.max()), (1, 3));
    assert!(ScalingRules::try_new(Duration::ZERO, 0, secs(1)).is_err());
    assert!(ScalingRules::try_new(Duration::ZERO, 1, Duration::ZERO).is_err());
    assert!(ScalingRules::try_new(secs(300), 1, secs(60)).is_ok());
}

#[test]
fn a_capacity_hint_of_a_load_the_pool_is_not_sized_on_is_refused_naming_it() {
    // A prefill pool is sized on input tokens only, a decode pool on output tokens and decoding
    // sequences: a hint of another kind on either (the unified example's hints copied to both
    // pools of a pair) is never read, so it must be refused rather than dropped without a word.
    let yaml = DISAGGREGATED
        .replace(
            "capacity: { prefillTokensPerSecond: 8000 }",
            "capacity: { prefillTokensPerSecond: 8000, concurrentSequences: 64, decodeTokensPerSecond: 2000 }",
        )
        .replace(
            "capacity: { decodeTokensPerSecond: 2000, concurrentSequences: 64 }",
            "capacity: { decodeTokensPerSecond: 2000, concurrentSequences: 64, prefillTokensPerSecond: 8000 }",
        );
    let errors = errors_of(&yaml);
    for path in [
        "spec.pools.prefill.capacity.concurrentSequences",
        "spec.pools.prefill.capacity.decodeTokensPerSecond",
        "spec.pools.decode.capacity.prefillTokensPerSecond",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{path} = "))),
            "no error names {path}: {errors:?}"
        );
    }
}

#[test]
fn a_quantile_written_for_the_percentile_is_refused() {
    let errors = errors_of(&UNIFIED.replace("percentile: 95", "percentile: 0.99"));
    assert_eq!(
        errors,
        [
            "spec.slo.percentile = 0.99: must be >= 1: a percentile, not a quantile (99 for p99, not 0.99)"
        ]
    );
    let lowest = raw(&UNIFIED.replace("percentile: 95", "percentile: 1"));
    assert!(AutoscalerSpec::try_from(&lowest).is_ok());
}
