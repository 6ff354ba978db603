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

fn resource(name: &str, target: &str, max: u32) -> AutoscalerResource {
    let spec = serde_yaml_ng::from_str(&format!(
        "{{ selector: {{ model: {name} }}, pools: {{ unified: {{ scaleTargetRef: {{ name: {target} }}, maxReplicas: {max} }} }}, slo: {{ ttft: 1s }} }}"
    ))
    .unwrap();
    AutoscalerResource {
        name: name.into(),
        namespace: "serving".into(),
        uid: Some(format!("uid-{name}")),
        generation: Some(2),
        spec,
    }
}

#[test]
fn each_resource_stands_alone_and_a_bad_one_is_left_out_with_its_field_errors() {
    let (config, rejected) = ControlConfig::from_resources(&[
        resource("a", "a", 2),
        resource("b", "b", 0),
        resource("c", "c", 3),
    ]);
    let names: Vec<_> = config
        .autoscalers()
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(
        config.autoscalers()[1].origin,
        Origin::Resource {
            uid: Some("uid-c".into()),
            generation: Some(2)
        }
    );
    assert_eq!(config.pools()[1].target.namespace, "serving");
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        (rejected[0].namespace.as_str(), rejected[0].name.as_str()),
        ("serving", "b")
    );
    let errors: Vec<String> = rejected[0].errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        ["spec.pools.unified.maxReplicas = 0: must be >= minReplicas (1)"]
    );
}

#[test]
fn a_scale_target_claimed_twice_stays_with_the_earlier_resource() {
    let (config, rejected) =
        ControlConfig::from_resources(&[resource("old", "vllm", 2), resource("new", "vllm", 4)]);
    assert_eq!(config.autoscalers().len(), 1);
    assert_eq!(config.autoscalers()[0].name, "old");
    assert_eq!(rejected[0].name, "new");
    assert_eq!(
        rejected[0].errors[0].path,
        "spec.pools.unified.scaleTargetRef.name"
    );
    assert!(
        rejected[0].errors[0]
            .rule
            .contains("already scaled by FlyballAutoscaler serving/old"),
        "{:?}",
        rejected[0].errors
    );
}

#[test]
fn teams_in_different_namespaces_may_each_have_a_pool_of_the_same_name() {
    let yaml = r#"
autoscalers:
  - name: llama
    namespace: team-a
    spec:
      selector: { backend: a }
      pools: { unified: { scaleTargetRef: { name: vllm }, maxReplicas: 2 } }
      slo: { ttft: 1s }
  - name: llama
    namespace: team-b
    spec:
      selector: { backend: b }
      pools: { unified: { scaleTargetRef: { name: vllm }, maxReplicas: 2 } }
      slo: { ttft: 1s }
  - name: other
    namespace: team-c
    spec:
      selector: { backend: c }
      pools: { unified: { scaleTargetRef: { name: vllm, namespace: team-b }, maxReplicas: 2 } }
      slo: { ttft: 1s }
"#;
    let ConfigError::Invalid { errors } = ControlConfig::from_yaml(yaml).unwrap_err() else {
        panic!("expected validation errors");
    };
    // Only the third, which names team-b's target again, is refused.
    let refused: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        refused,
        [
            "autoscalers[2].spec.pools.unified.scaleTargetRef.name = \"vllm\": must be unique \
             within namespace \"team-b\" across all autoscalers (it names the pool)"
        ]
    );
    let two: String = yaml.lines().take(14).collect::<Vec<_>>().join("\n");
    let config = ControlConfig::from_yaml(&two).unwrap();
    let pools: Vec<_> = config
        .pools()
        .iter()
        .map(|p| (p.target.namespace.as_str(), p.name.as_str()))
        .collect();
    assert_eq!(pools, [("team-a", "vllm"), ("team-b", "vllm")]);

    let mut elsewhere = resource("new", "vllm", 4);
    elsewhere.namespace = "team-b".into();
    let (config, rejected) =
        ControlConfig::from_resources(&[resource("old", "vllm", 2), elsewhere]);
    assert_eq!((config.pools().len(), rejected.len()), (2, 0));
}

#[test]
fn renumbering_keeps_the_ids_of_pools_that_stay_and_never_reuses_the_others() {
    let (first, _) = ControlConfig::from_resources(&[resource("a", "a", 2), resource("b", "b", 2)]);
    let first = first.renumbered(&ControlConfig::default());
    let ids = |c: &ControlConfig| -> Vec<(String, PoolId)> {
        c.pools().iter().map(|p| (p.name.clone(), p.id)).collect()
    };
    assert_eq!(
        ids(&first),
        [("a".into(), PoolId(0)), ("b".into(), PoolId(1))]
    );

    // a goes, c comes, b stays where it was (and its spec changed: same pool all the same).
    let (second, _) =
        ControlConfig::from_resources(&[resource("b", "b", 5), resource("c", "c", 2)]);
    let second = second.renumbered(&first);
    assert_eq!(
        ids(&second),
        [("b".into(), PoolId(1)), ("c".into(), PoolId(2))]
    );
    assert_eq!(second.pool(PoolId(2)).unwrap().name, "c");
    assert_eq!(second.pool(PoolId(0)), None);
    assert_eq!(second.autoscalers()[1].pools, [PoolId(2)]);

    // a comes back: a new id, not its old one.
    let (third, _) = ControlConfig::from_resources(&[
        resource("a", "a", 2),
        resource("b", "b", 5),
        resource("c", "c", 2),
    ]);
    let third = third.renumbered(&second);
    assert_eq!(
        ids(&third),
        [
            ("a".into(), PoolId(3)),
            ("b".into(), PoolId(1)),
            ("c".into(), PoolId(2))
        ]
    );
}

const SAME_TARGET_TWICE: &str = "{ selector: { model: llama }, pools: { \
    prefill: { scaleTargetRef: { name: vllm }, maxReplicas: 4 }, \
    decode: { scaleTargetRef: { name: vllm, namespace: serving }, maxReplicas: 4 } }, \
    slo: { ttft: 500ms, tpot: 50ms } }";

fn resource_with(name: &str, namespace: &str, spec: &str) -> AutoscalerResource {
    AutoscalerResource {
        name: name.into(),
        namespace: namespace.into(),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        spec: serde_yaml_ng::from_str(spec).unwrap(),
    }
}

#[test]
fn a_resource_whose_two_pools_scale_one_target_is_refused_as_in_the_file() {
    // The namespace left out is the resource's: both pools would set Deployment serving/vllm.
    let file = format!(
        "autoscalers:\n  - name: llama\n    namespace: serving\n    spec: {SAME_TARGET_TWICE}\n"
    );
    assert!(ControlConfig::from_yaml(&file).is_err());
    let (config, rejected) =
        ControlConfig::from_resources(&[resource_with("llama", "serving", SAME_TARGET_TWICE)]);
    assert_eq!(config.pools().len(), 0);
    assert_eq!(
        rejected[0].errors[0].to_string(),
        "spec.pools.decode.scaleTargetRef.name = \"vllm\": already scaled by FlyballAutoscaler \
         serving/llama (a scale target's name names its pool, so it must be unique within \
         namespace \"serving\")"
    );
}

#[test]
fn a_resource_scales_only_workloads_of_its_own_namespace() {
    let spec = "{ selector: { model: llama }, pools: { unified: { scaleTargetRef: \
                { name: vllm, namespace: payments }, maxReplicas: 4 } }, slo: { ttft: 1s } }";
    let (config, rejected) =
        ControlConfig::from_resources(&[resource_with("llama", "team-a", spec)]);
    assert_eq!(config.pools().len(), 0);
    assert_eq!(
        rejected[0].errors[0].to_string(),
        "spec.pools.unified.scaleTargetRef.namespace = \"payments\": must be the \
         FlyballAutoscaler's own namespace (\"team-a\") or omitted: it scales workloads of its \
         namespace, as an HPA does"
    );
    // Its own namespace, named or not, is fine; the file (the operator's) may name any.
    let own = spec.replace("payments", "team-a");
    let (config, rejected) =
        ControlConfig::from_resources(&[resource_with("llama", "team-a", &own)]);
    assert_eq!((config.pools().len(), rejected.len()), (1, 0));
    let file = format!("autoscalers:\n  - name: llama\n    namespace: team-a\n    spec: {spec}\n");
    assert!(ControlConfig::from_yaml(&file).is_ok());
}

#[test]
fn autoscalers_selecting_the_same_traffic_are_refused() {
    let spec = |selector: &str, target: &str| {
        format!(
            "{{ selector: {selector}, pools: {{ unified: {{ scaleTargetRef: {{ name: {target} }}, \
             maxReplicas: 4 }} }}, slo: {{ ttft: 1s }} }}"
        )
    };
    let file = |a: &str, b: &str| {
        format!(
            "autoscalers:\n  - name: a\n    spec: {}\n  - name: b\n    spec: {}\n",
            spec(a, "vllm-a"),
            spec(b, "vllm-b")
        )
    };
    for (a, b) in [
        ("{ backend: vllm }", "{ backend: vllm }"),
        ("{ backend: vllm }", "{ backend: vllm, model: m }"),
        ("{ model: m }", "{ backend: vllm, model: m }"),
    ] {
        let Err(ConfigError::Invalid { errors }) = ControlConfig::from_yaml(&file(a, b)) else {
            panic!("{a} and {b} both accepted");
        };
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "autoscalers[1].spec.selector");
        assert!(
            errors[0]
                .rule
                .starts_with("selects telemetry autoscaler default/a selects too"),
            "{}",
            errors[0]
        );
        let (config, rejected) = ControlConfig::from_resources(&[
            resource_with("a", "serving", &spec(a, "vllm-a")),
            resource_with("b", "serving", &spec(b, "vllm-b")),
        ]);
        assert_eq!(config.autoscalers().len(), 1);
        assert_eq!(rejected[0].name, "b");
    }
    // Different models, or selectors on different fields (which meet only where that backend
    // serves that model), stand.
    for (a, b) in [
        ("{ backend: vllm, model: m }", "{ backend: vllm, model: n }"),
        ("{ backend: vllm }", "{ model: m }"),
    ] {
        assert!(ControlConfig::from_yaml(&file(a, b)).is_ok(), "{a} {b}");
    }
}
