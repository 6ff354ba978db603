#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::*;

const TWO: &str = r#"
autoscalers:
  - name: llama
    spec:
      selector: { backend: vllm-llama }
      pools:
        unified: { scaleTargetRef: { name: llama }, maxReplicas: 8 }
      slo: { ttft: 500ms }
  - name: qwen
    namespace: serving
    spec:
      selector: { model: qwen }
      pools:
        prefill: { scaleTargetRef: { name: qwen-prefill }, maxReplicas: 4 }
        decode: { scaleTargetRef: { name: qwen-decode, namespace: gpu }, maxReplicas: 6 }
      slo: { ttft: 400ms, tpot: 40ms }
"#;

#[test]
fn each_role_of_each_autoscaler_is_a_pool_named_by_its_target() {
    let config = ControlConfig::from_yaml(TWO).unwrap();
    assert_eq!(config.autoscalers().len(), 2);
    let pools: Vec<_> = config
        .pools()
        .iter()
        .map(|p| (p.id, p.name.as_str(), p.autoscaler, p.role))
        .collect();
    assert_eq!(
        pools,
        vec![
            (PoolId(0), "llama", 0, Role::Unified),
            (PoolId(1), "qwen-prefill", 1, Role::Prefill),
            (PoolId(2), "qwen-decode", 1, Role::Decode),
        ]
    );
    assert_eq!(config.autoscalers()[1].pools, vec![PoolId(1), PoolId(2)]);
    assert_eq!(config.pools()[0].target.namespace, "default");
    assert_eq!(config.pools()[1].target.namespace, "serving");
    assert_eq!(config.pools()[2].target.namespace, "gpu");
    assert_eq!(
        config.pools()[2].selector,
        Selector {
            backend: None,
            model: Some("qwen".into())
        }
    );
}

#[test]
fn spec_errors_name_the_field_from_the_file_root() {
    let yaml = r#"
autoscalers:
  - name: ok
    spec:
      selector: { model: a }
      pools: { unified: { scaleTargetRef: { name: a }, maxReplicas: 2 } }
      slo: { ttft: 1s }
  - name: bad
    spec:
      selector: { model: b }
      pools:
        prefill: { scaleTargetRef: { name: b-prefill }, maxReplicas: 2 }
        decode: { scaleTargetRef: { name: b-decode }, maxReplicas: 0 }
      slo: { ttft: 1s, tpot: 50ms }
"#;
    let error = ControlConfig::from_yaml(yaml).unwrap_err().to_string();
    assert!(
        error.contains(
            "autoscalers[1].spec.pools.decode.maxReplicas = 0: must be >= minReplicas (1)"
        ),
        "{error}"
    );
}

#[test]
fn every_violation_is_reported_not_just_the_first() {
    let yaml = r#"
autoscalers:
  - name: ""
    spec:
      selector: { model: a }
      pools: { unified: { scaleTargetRef: { name: a }, maxReplicas: 2 } }
      slo: { ttft: 1s }
  - name: dup
    spec:
      selector: { model: b }
      pools: { unified: { scaleTargetRef: { name: a }, maxReplicas: 2 } }
      slo: { ttft: 1s }
  - name: dup
    spec:
      selector: { model: c }
      pools: { unified: { scaleTargetRef: { name: c }, maxReplicas: 2 } }
      slo: { ttft: 1s }
"#;
    let ConfigError::Invalid { errors } = ControlConfig::from_yaml(yaml).unwrap_err() else {
        panic!("expected validation errors");
    };
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "autoscalers[0].name",
            "autoscalers[1].spec.pools.unified.scaleTargetRef.name",
            "autoscalers[2].name",
        ]
    );
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let yaml = r#"
autoscalers:
  - name: a
    spec:
      selector: { model: a }
      pools: { unified: { scaleTargetRef: { name: a }, maxReplica: 2 } }
      slo: { ttft: 1s }
"#;
    let error = ControlConfig::from_yaml(yaml).unwrap_err().to_string();
    assert!(error.contains("maxReplica"), "{error}");
    assert!(
        error.contains("autoscalers[0].spec.pools.unified"),
        "{error}"
    );
}

#[test]
fn an_empty_file_means_no_autoscalers() {
    assert_eq!(ControlConfig::from_yaml("{}").unwrap().pools().len(), 0);
}

#[test]
fn a_missing_file_names_the_path() {
    let error = ControlConfig::load(Path::new("/nonexistent/flyball.yaml")).unwrap_err();
    assert!(error.to_string().starts_with("/nonexistent/flyball.yaml: "));
}
