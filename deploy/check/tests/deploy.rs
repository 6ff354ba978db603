//! What users apply from `deploy/`, checked without a cluster, a network or a `helm` binary:
//! - every YAML file parses, and every Kubernetes object in it validates: built-in kinds against
//!   k8s-openapi's types, custom resources against their CRD's schema (upstream ones from
//!   `../shared/schemas`, skipped with a message when that folder is absent; flyball's own from
//!   `deploy/crds`);
//! - the FlyballAutoscaler examples pass the control service's own rules, and `control.yaml`
//!   holds the same specs;
//! - the filter configurations inside the mesh manifests are accepted by the filter, and every
//!   manifest names the control Service the chart creates;
//! - the KEDA example names an example autoscaler with its bounds, and tells flyball the
//!   tolerance its HPA has;
//! - the Helm chart renders (with the renderer in this crate) to the checked-in manifests, grants
//!   exactly the RBAC rules in `flyball_k8s::rbac::RULES`, and its values match its schema.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flyball_deploy_check::crd::Registry;
use flyball_deploy_check::helm::{self, Chart, Release};
use flyball_deploy_check::manifest::{self, Document};
use flyball_deploy_check::{builtin, paths};
use flyball_filter_core::FilterConfig;
use flyball_policy::spec::{AutoscalerSpec, AutoscalerSpecRaw};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::Deserialize;
use serde_json::{Value, json};

/// The release the gateway manifests assume (`flyball-control.flyball-system`).
const RELEASE: Release<'static> = Release {
    name: "flyball",
    namespace: "flyball-system",
};

const RENDERED: &str = "helm/rendered/flyball.yaml";
const CHART: &str = "helm/flyball";
const CRD: &str = "crds/flyball.dev_flyballautoscalers.yaml";
const CHART_CRD: &str = "helm/flyball/crds/flyball.dev_flyballautoscalers.yaml";
const LOCAL_CONFIG: &str = "examples/control.yaml";

/// Kinds shipped here whose CRD /work/shared/schemas does not hold; printed, never silently
/// passed.
const NO_SCHEMA_HERE: &[(&str, &str)] = &[("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy")];

// ===== files =====

fn deploy(path: &str) -> PathBuf {
    paths::deploy_dir().join(path)
}

/// Every YAML file under `deploy/`, except chart templates (not YAML before rendering) and the
/// chart's own metadata.
fn yaml_files() -> Vec<PathBuf> {
    let templates = deploy(CHART).join("templates");
    paths::files_under(&paths::deploy_dir(), &["yaml", "yml"])
        .unwrap()
        .into_iter()
        .filter(|p| !p.starts_with(&templates))
        .collect()
}

fn is_chart_file(path: &Path) -> bool {
    path == deploy(CHART).join("Chart.yaml") || path == deploy(CHART).join("values.yaml")
}

/// Every Kubernetes object in the files users apply.
fn manifest_documents() -> Vec<Document> {
    yaml_files()
        .into_iter()
        .filter(|p| !is_chart_file(p) && *p != deploy(LOCAL_CONFIG))
        .flat_map(|p| manifest::load(&p).unwrap())
        .collect()
}

fn documents_in(path: &str) -> Vec<Document> {
    manifest::load(&deploy(path)).unwrap()
}

fn one(documents: &[Document], kind: &str) -> Document {
    let found: Vec<_> = documents.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0].clone()
}

fn chart() -> Chart {
    Chart::load(&deploy(CHART)).unwrap()
}

/// Every document is a kind Kubernetes builds in, and valid as one.
fn assert_built_in_and_valid(documents: &[Document]) {
    for document in documents {
        let problems =
            builtin::check(document).unwrap_or_else(|| panic!("{document}: not built in"));
        assert!(problems.is_empty(), "{document}: {problems:?}");
    }
}

fn render(values: &Value) -> Vec<Document> {
    let chart = chart();
    let rendered = chart.render(values, RELEASE).unwrap();
    let text = helm::join(chart.name(), &rendered);
    manifest::parse(&text, Path::new("<rendered chart>")).unwrap()
}

/// Overwrites a generated file that differs from `expected`, then fails, so the developer only
/// has to review and commit while CI notices.
fn check_generated(path: &Path, expected: &str, command: &str) {
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    if checked_in != expected {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, expected).unwrap();
        panic!(
            "{} was out of date and has been regenerated; review the diff and commit it \
             (command: {command})",
            paths::display(path)
        );
    }
}

fn shared_registry() -> Option<Registry> {
    match paths::shared_schemas() {
        Some(dir) => {
            let files = paths::files_under(&dir, &["yaml", "yml"]).unwrap();
            let mut registry = Registry::from_files(&files).unwrap();
            for document in documents_in(CRD) {
                registry.add_crd(&document.value).unwrap();
            }
            Some(registry)
        }
        None => {
            let message = format!(
                "SKIPPED: upstream CRD schemas not found at {}; the WasmPlugin, EnvoyFilter, \
                 EnvoyExtensionPolicy, ScaledObject and Gateway API checks did not run",
                paths::shared_schemas_dir().display()
            );
            println!("{message}");
            eprintln!("{message}");
            None
        }
    }
}

fn flyball_registry() -> Registry {
    Registry::from_files(&[deploy(CRD)]).unwrap()
}

// ===== YAML and Kubernetes objects =====

#[test]
fn every_yaml_file_parses_and_every_manifest_document_is_a_kubernetes_object() {
    let files = yaml_files();
    assert!(files.len() >= 15, "found only {files:?}");
    for file in &files {
        let documents = manifest::load(file).unwrap();
        assert!(!documents.is_empty(), "{} is empty", paths::display(file));
        if is_chart_file(file) || *file == deploy(LOCAL_CONFIG) {
            continue;
        }
        for document in &documents {
            assert!(document.is_object(), "{document}: no apiVersion or kind");
            assert!(!document.name().is_empty(), "{document}: no metadata.name");
        }
    }
}

#[test]
fn built_in_kinds_carry_only_fields_kubernetes_knows() {
    let mut documents = manifest_documents();
    documents.extend(render(&chart().values));
    let mut problems = Vec::new();
    let mut checked = 0;
    for document in &documents {
        let found = match builtin::check(document) {
            Some(found) => {
                checked += 1;
                found
            }
            None => builtin::check_metadata(document),
        };
        problems.extend(found.into_iter().map(|p| format!("{document}: {p}")));
    }
    assert!(checked >= 8, "only {checked} built-in objects checked");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn custom_resources_validate_against_their_upstream_crd_schemas() {
    let Some(registry) = shared_registry() else {
        return;
    };
    let mut problems = Vec::new();
    let mut checked = BTreeMap::<String, usize>::new();
    for document in manifest_documents() {
        if builtin::check(&document).is_some() {
            continue;
        }
        let key = (document.api_version(), document.kind());
        if NO_SCHEMA_HERE.contains(&key) {
            println!("not schema-checked (no CRD in the shared schemas): {document}");
            continue;
        }
        match registry.check(&document) {
            Ok(errors) => {
                problems.extend(errors.into_iter().map(|e| format!("{document}: {e}")));
                *checked.entry(format!("{} {}", key.0, key.1)).or_default() += 1;
            }
            Err(error) => problems.push(error.to_string()),
        }
    }
    for kind in checked.keys() {
        let (api_version, kind) = kind.split_once(' ').unwrap();
        println!(
            "{api_version} {kind}: {} CEL rules in its schema not evaluated",
            registry.cel_rules(api_version, kind)
        );
    }
    assert!(problems.is_empty(), "{problems:#?}");
    for kind in [
        "extensions.istio.io/v1alpha1 WasmPlugin",
        "extensions.istio.io/v1alpha1 TrafficExtension",
        "networking.istio.io/v1alpha3 EnvoyFilter",
        "networking.istio.io/v1 DestinationRule",
        "gateway.envoyproxy.io/v1alpha1 EnvoyExtensionPolicy",
        "gateway.envoyproxy.io/v1alpha1 EnvoyPatchPolicy",
        "gateway.networking.k8s.io/v1 Gateway",
        "gateway.networking.k8s.io/v1 HTTPRoute",
        "keda.sh/v1alpha1 ScaledObject",
        "flyball.dev/v1alpha1 FlyballAutoscaler",
    ] {
        assert!(
            checked.contains_key(kind),
            "no {kind} was checked: {checked:?}"
        );
    }
}

#[test]
fn schema_checks_reject_a_misspelled_field() {
    // Without this, a schema that allowed anything would let every manifest pass.
    let mut example = one(
        &documents_in("examples/flyballautoscaler-unified.yaml"),
        "FlyballAutoscaler",
    );
    example.value["spec"]["slo"]["ttfT"] = json!("1s");
    let errors = flyball_registry().check(&example).unwrap();
    assert!(errors.iter().any(|e| e.contains("ttfT")), "{errors:?}");

    let Some(registry) = shared_registry() else {
        return;
    };
    let mut plugin = one(&documents_in("istio/wasmplugin.yaml"), "WasmPlugin");
    plugin.value["spec"]["failStrategy"] = json!("FAIL_OPENLY");
    plugin.value["spec"]["pluginConfg"] = json!({});
    let errors = registry.check(&plugin).unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");

    let mut policy = one(
        &documents_in("envoy-gateway/envoyextensionpolicy.yaml"),
        "EnvoyExtensionPolicy",
    );
    policy.value["spec"]["wasm"][0]["failopen"] = json!(true);
    let errors = registry.check(&policy).unwrap();
    assert!(errors.iter().any(|e| e.contains("failopen")), "{errors:?}");
}

// ===== FlyballAutoscaler examples and the local file =====

fn examples() -> Vec<Document> {
    [
        "examples/flyballautoscaler-unified.yaml",
        "examples/flyballautoscaler-disaggregated.yaml",
    ]
    .iter()
    .flat_map(|p| documents_in(p))
    .collect()
}

/// The examples and the dry-run autoscaler the KEDA example reads.
fn shipped_autoscalers() -> Vec<Document> {
    let mut all = examples();
    all.extend(documents_in("keda/flyballautoscaler.yaml"));
    all
}

#[test]
fn flyball_examples_validate_against_the_generated_crd_schema() {
    let registry = flyball_registry();
    let examples = shipped_autoscalers();
    assert_eq!(examples.len(), 3);
    for example in &examples {
        assert_eq!(
            registry.check(example).unwrap(),
            Vec::<String>::new(),
            "{example}"
        );
    }
}

#[test]
fn flyball_examples_pass_the_rules_the_control_service_applies() {
    for example in shipped_autoscalers() {
        // As the control service reads the custom resource...
        let resource: flyball_k8s::FlyballAutoscaler =
            serde_json::from_value(example.value.clone()).unwrap();
        resource
            .spec
            .validate()
            .unwrap_or_else(|e| panic!("{example}: {e}"));
        // ...and as the policy reads a spec from any source.
        let raw: AutoscalerSpecRaw = serde_json::from_value(example.value["spec"].clone()).unwrap();
        AutoscalerSpec::try_from(&raw).unwrap_or_else(|e| panic!("{example}: {e}"));
    }
}

#[test]
fn a_spec_the_policy_refuses_is_refused_in_the_examples_shape() {
    // The examples' shape carries the rules: break one and the same path reports it.
    let mut spec = one(
        &documents_in("examples/flyballautoscaler-disaggregated.yaml"),
        "FlyballAutoscaler",
    )
    .value["spec"]
        .clone();
    spec["pools"]["decode"]["maxReplicas"] = json!(1);
    let raw: AutoscalerSpecRaw = serde_json::from_value(spec).unwrap();
    let error = AutoscalerSpec::try_from(&raw).unwrap_err().to_string();
    assert!(
        error.contains("spec.pools.decode.maxReplicas = 1"),
        "{error}"
    );
}

/// `control.yaml` as `flyball control --config` reads it (flyball_control::config's raw shape).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalConfig {
    autoscalers: Vec<LocalAutoscaler>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalAutoscaler {
    name: String,
    namespace: Option<String>,
    spec: AutoscalerSpecRaw,
}

#[test]
fn local_config_holds_the_same_autoscalers_as_the_crd_examples() {
    let text = std::fs::read_to_string(deploy(LOCAL_CONFIG)).unwrap();
    let config: LocalConfig = serde_yaml_ng::from_str(&text).unwrap();
    let mut by_name = BTreeMap::new();
    for (i, entry) in config.autoscalers.iter().enumerate() {
        AutoscalerSpec::from_raw(&entry.spec, &format!("autoscalers[{i}].spec"))
            .unwrap_or_else(|e| panic!("{LOCAL_CONFIG}: {e}"));
        let namespace = entry.namespace.clone().unwrap_or_else(|| "default".into());
        by_name.insert((namespace, entry.name.clone()), entry.spec.clone());
    }
    let examples = examples();
    assert_eq!(
        by_name.len(),
        examples.len(),
        "{LOCAL_CONFIG} and the examples differ in count"
    );
    for example in examples {
        let key = (
            example.namespace().unwrap_or("default").to_string(),
            example.name().to_string(),
        );
        let spec: AutoscalerSpecRaw =
            serde_json::from_value(example.value["spec"].clone()).unwrap();
        assert_eq!(
            by_name.get(&key),
            Some(&spec),
            "{example} differs from {LOCAL_CONFIG}"
        );
    }
}

// ===== the filter's configuration and the control Service's name =====

/// Each filter configuration shipped, with where it is.
fn plugin_configs() -> Vec<(String, Value)> {
    let mut configs = Vec::new();
    let plugin = one(&documents_in("istio/wasmplugin.yaml"), "WasmPlugin");
    configs.push((
        plugin.to_string(),
        plugin.value["spec"]["pluginConfig"].clone(),
    ));
    let extension = one(
        &documents_in("istio/trafficextension.yaml"),
        "TrafficExtension",
    );
    configs.push((
        extension.to_string(),
        extension.value["spec"]["wasm"]["pluginConfig"].clone(),
    ));
    let filter = one(&documents_in("istio/envoyfilter.yaml"), "EnvoyFilter");
    let text = wasm_extension(&filter)["configuration"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    configs.push((filter.to_string(), serde_json::from_str(&text).unwrap()));
    let policy = one(
        &documents_in("envoy-gateway/envoyextensionpolicy.yaml"),
        "EnvoyExtensionPolicy",
    );
    configs.push((
        policy.to_string(),
        policy.value["spec"]["wasm"][0]["config"].clone(),
    ));
    configs
}

/// The Wasm `config` of the EnvoyFilter's EXTENSION_CONFIG patch.
fn wasm_extension(filter: &Document) -> Value {
    let patches = filter.value["spec"]["configPatches"].as_array().unwrap();
    let extension = patches
        .iter()
        .find(|p| p["applyTo"] == "EXTENSION_CONFIG")
        .unwrap();
    extension["patch"]["value"]["typed_config"]["config"].clone()
}

#[test]
fn plugin_configurations_are_accepted_by_the_filter() {
    let configs = plugin_configs();
    assert_eq!(configs.len(), 4);
    for (at, config) in configs {
        assert!(config.is_object(), "{at}: no configuration");
        // Istio and Envoy Gateway hand the filter this object serialized as JSON.
        let json = serde_json::to_vec(&config).unwrap();
        let parsed = FilterConfig::from_json(&json).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert!(
            parsed.control_cluster.is_some(),
            "{at}: no controlCluster: no reports"
        );
    }
}

#[test]
fn manifests_name_the_control_service_the_chart_creates() {
    let values = chart().values;
    let port = values["service"]["grpcPort"].as_u64().unwrap();
    let host = format!("{}-control.{}", RELEASE.name, RELEASE.namespace);
    let authority = format!("{host}.svc.cluster.local");
    let service = one(&render(&values), "Service");
    assert_eq!(
        format!("{}.{}", service.name(), service.namespace().unwrap()),
        host
    );

    // Istio: its outbound cluster name for the Service port; Envoy Gateway: the cluster the
    // EnvoyPatchPolicy adds, pointing at the Service.
    let patch = one(
        &documents_in("envoy-gateway/envoypatchpolicy-control-cluster.yaml"),
        "EnvoyPatchPolicy",
    );
    let cluster = &patch.value["spec"]["jsonPatches"][0]["operation"]["value"];
    let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(address["address"], json!(authority));
    assert_eq!(address["port_value"].as_u64(), Some(port));
    assert_eq!(cluster["load_assignment"]["cluster_name"], cluster["name"]);

    for (at, config) in plugin_configs() {
        let expected_cluster = if at.contains("EnvoyExtensionPolicy") {
            cluster["name"].as_str().unwrap().to_string()
        } else {
            format!("outbound|{port}||{authority}")
        };
        assert_eq!(config["controlCluster"], json!(expected_cluster), "{at}");
        assert_eq!(config["controlAuthority"], json!(authority), "{at}");
    }

    // Istio: the DestinationRule for the gateways' connections to it, beside the plugin.
    let rule = one(
        &documents_in("istio/destinationrule.yaml"),
        "DestinationRule",
    );
    assert_eq!(rule.value["spec"]["host"], json!(authority));
    let plugin = one(&documents_in("istio/wasmplugin.yaml"), "WasmPlugin");
    assert_eq!(rule.namespace(), plugin.namespace());

    let scaled = one(&documents_in("keda/scaledobject.yaml"), "ScaledObject");
    assert_eq!(
        scaled.value["spec"]["triggers"][0]["metadata"]["scalerAddress"],
        json!(format!("{host}:{port}"))
    );
}

#[test]
fn every_filter_manifest_loads_the_same_module_fail_open_under_root_id_flyball() {
    let plugin = one(&documents_in("istio/wasmplugin.yaml"), "WasmPlugin").value;
    assert_eq!(plugin["spec"]["pluginName"], "flyball");
    assert_eq!(plugin["spec"]["failStrategy"], "FAIL_OPEN");
    let extension = one(
        &documents_in("istio/trafficextension.yaml"),
        "TrafficExtension",
    )
    .value;
    assert_eq!(extension["spec"]["wasm"]["pluginName"], "flyball");
    assert_eq!(extension["spec"]["wasm"]["failStrategy"], "FAIL_OPEN");
    assert_eq!(extension["spec"]["phase"], plugin["spec"]["phase"]);
    let filter = wasm_extension(&one(&documents_in("istio/envoyfilter.yaml"), "EnvoyFilter"));
    assert_eq!(filter["root_id"], "flyball");
    assert_eq!(filter["vm_config"]["vm_id"], "flyball");
    assert_eq!(filter["failure_policy"], "FAIL_OPEN");
    assert_eq!(filter["fail_open"], true);
    let policy = one(
        &documents_in("envoy-gateway/envoyextensionpolicy.yaml"),
        "EnvoyExtensionPolicy",
    )
    .value;
    assert_eq!(policy["spec"]["wasm"][0]["rootID"], "flyball");
    assert_eq!(policy["spec"]["wasm"][0]["failOpen"], true);

    let oci = plugin["spec"]["url"].as_str().unwrap();
    assert_eq!(extension["spec"]["wasm"]["url"], json!(oci));
    assert_eq!(
        filter["vm_config"]["code"]["remote"]["http_uri"]["uri"],
        json!(oci)
    );
    // Envoy Gateway takes the image reference without the scheme.
    assert_eq!(
        policy["spec"]["wasm"][0]["code"]["image"]["url"],
        json!(oci.trim_start_matches("oci://"))
    );
}

#[test]
fn keda_scaled_object_names_an_example_autoscaler_and_its_bounds() {
    let scaled = one(&documents_in("keda/scaledobject.yaml"), "ScaledObject");
    let metadata = &scaled.value["spec"]["triggers"][0]["metadata"];
    let examples = shipped_autoscalers();
    let autoscaler = examples
        .iter()
        .find(|e| e.name() == metadata["autoscaler"] && e.namespace() == scaled.namespace())
        .unwrap_or_else(|| panic!("{scaled}: names no example autoscaler"));
    let role = metadata["role"].as_str().unwrap();
    let pool = &autoscaler.value["spec"]["pools"][role];
    assert!(pool.is_object(), "{autoscaler} has no {role} pool");
    assert_eq!(
        scaled.value["spec"]["scaleTargetRef"]["name"],
        pool["scaleTargetRef"]["name"]
    );
    assert_eq!(scaled.value["spec"]["minReplicaCount"], pool["minReplicas"]);
    assert_eq!(scaled.value["spec"]["maxReplicaCount"], pool["maxReplicas"]);
}

/// A Kubernetes quantity as the HPA's tolerance takes it: a number, or a decimal string with an
/// optional `m` (milli) suffix; `None` when absent.
fn tolerance_quantity(value: &Value) -> Option<f64> {
    match value {
        Value::Null => None,
        Value::Number(n) => n.as_f64(),
        Value::String(s) => Some(match s.strip_suffix('m') {
            Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
            None => s.parse().unwrap(),
        }),
        other => panic!("tolerance {other}: not a quantity"),
    }
}

/// Why the trigger's `tolerance` metadata differs from the HPA's tolerances (each defaults to
/// 0.1): flyball computes the value it reports from the former, the HPA applies the latter.
fn tolerance_mismatch(scaled: &Value) -> Option<String> {
    let behavior = &scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"];
    let trigger = scaled["spec"]["triggers"][0]["metadata"]["tolerance"]
        .as_str()
        .map_or(0.1, |t| t.parse::<f64>().unwrap());
    ["scaleUp", "scaleDown"].into_iter().find_map(|direction| {
        let hpa = tolerance_quantity(&behavior[direction]["tolerance"]).unwrap_or(0.1);
        (hpa != trigger).then(|| {
            format!("HPA {direction} tolerance {hpa}, trigger metadata tolerance {trigger}")
        })
    })
}

#[test]
fn keda_trigger_tolerance_is_the_hpas() {
    let scaled = one(&documents_in("keda/scaledobject.yaml"), "ScaledObject").value;
    assert_eq!(
        tolerance_mismatch(&scaled),
        None,
        "deploy/keda/scaledobject.yaml"
    );

    let mut only_the_hpa = scaled.clone();
    only_the_hpa["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["tolerance"] =
        json!(0);
    assert!(tolerance_mismatch(&only_the_hpa).is_some());
    let mut both = only_the_hpa.clone();
    both["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]["tolerance"] =
        json!("0m");
    both["spec"]["triggers"][0]["metadata"]["tolerance"] = json!("0");
    assert_eq!(tolerance_mismatch(&both), None);
}

// ===== Envoy stats labels =====

fn stats_tags(bootstrap: &Value) -> Vec<(String, String)> {
    bootstrap["stats_config"]["stats_tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["tag_name"].as_str().unwrap().to_string(),
                t["regex"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Envoy's tag extraction: each regex runs on the full name; the second group is the value and
/// the first group is cut from the name.
fn extract(tags: &[(String, String)], name: &str) -> (String, BTreeMap<String, String>) {
    let mut values = BTreeMap::new();
    let mut cuts = Vec::new();
    for (tag, regex) in tags {
        let regex = regex::Regex::new(regex).unwrap();
        if let Some(captures) = regex.captures(name) {
            let cut = captures.get(1).unwrap();
            cuts.push(cut.range());
            values.insert(tag.clone(), captures.get(2).unwrap().as_str().to_string());
        }
    }
    let kept: String = name
        .char_indices()
        .filter(|(i, _)| !cuts.iter().any(|c| c.contains(i)))
        .map(|(_, c)| c)
        .collect();
    (kept, values)
}

#[test]
fn stats_tags_are_the_local_envoy_configs_and_label_the_filters_stats() {
    let local: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(paths::repo_root().join("envoy/flyball.yaml")).unwrap(),
    )
    .unwrap();
    let expected = stats_tags(&local);
    assert_eq!(expected.len(), 5);

    let istio = one(
        &documents_in("istio/bootstrap-stats-tags.yaml"),
        "ConfigMap",
    );
    let bootstrap: Value = serde_json::from_str(
        istio.value["data"]["custom_bootstrap.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stats_tags(&bootstrap), expected, "{istio}");

    let proxy = one(
        &documents_in("envoy-gateway/envoyproxy-stats-tags.yaml"),
        "EnvoyProxy",
    );
    let bootstrap =
        Document::embedded(proxy.value["spec"]["bootstrap"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(stats_tags(&bootstrap), expected, "{proxy}");
    let gateway = one(
        &documents_in("envoy-gateway/inference-gateway.yaml"),
        "Gateway",
    );
    assert_eq!(
        gateway.value["spec"]["infrastructure"]["parametersRef"]["name"],
        json!(proxy.name())
    );

    // The names the filter defines (filter/src/stats.rs) come out labelled.
    let key = "wasmcustom.flyball.backend.outbound_9090__llm-a.model.llama-3_1-8b";
    for (suffix, name, labels) in [
        (
            "outcome.ok.requests_total",
            "requests_total",
            json!({"outcome": "ok"}),
        ),
        (
            "token_type.input.tokens_total",
            "tokens_total",
            json!({"token_type": "input"}),
        ),
        (
            "phase.waiting.requests_in_flight",
            "requests_in_flight",
            json!({"phase": "waiting"}),
        ),
        (
            "time_to_first_token_ms",
            "time_to_first_token_ms",
            json!({}),
        ),
    ] {
        let (kept, values) = extract(&expected, &format!("{key}.{suffix}"));
        assert_eq!(kept, format!("wasmcustom.flyball.{name}"));
        let mut labels: BTreeMap<String, String> = serde_json::from_value(labels).unwrap();
        labels.insert("backend".into(), "outbound_9090__llm-a".into());
        labels.insert("model".into(), "llama-3_1-8b".into());
        assert_eq!(values, labels, "{suffix}");
    }
}

// ===== the Helm chart =====

#[test]
fn chart_renders_to_the_checked_in_manifests() {
    let chart = chart();
    let rendered = chart.render(&chart.values, RELEASE).unwrap();
    let text = format!(
        "# Generated by `cargo test -p flyball-deploy-check` from deploy/helm/flyball with its\n\
         # default values, release `{}` in namespace `{}`; do not edit.\n\
         # Without helm: kubectl apply -f deploy/crds/ && kubectl create namespace {} &&\n\
         #               kubectl apply -f deploy/helm/rendered/flyball.yaml\n{}",
        RELEASE.name,
        RELEASE.namespace,
        RELEASE.namespace,
        helm::join(chart.name(), &rendered)
    );
    check_generated(
        &deploy(RENDERED),
        &text,
        "cargo test -p flyball-deploy-check",
    );
}

#[test]
fn chart_crd_is_a_copy_of_the_generated_crd() {
    let generated = std::fs::read_to_string(deploy(CRD)).unwrap();
    check_generated(
        &deploy(CHART_CRD),
        &generated,
        "cargo test -p flyball-deploy-check",
    );
}

type RuleKey = (Vec<String>, Vec<String>, Vec<String>, Vec<String>);

fn rules_key(rule: &PolicyRule) -> RuleKey {
    (
        rule.api_groups.clone().unwrap_or_default(),
        rule.resources.clone().unwrap_or_default(),
        rule.verbs.clone(),
        rule.resource_names.clone().unwrap_or_default(),
    )
}

#[test]
fn chart_rbac_grants_exactly_the_rules_the_code_needs() {
    let documents = render(&chart().values);
    let cluster_role: ClusterRole =
        serde_json::from_value(one(&documents, "ClusterRole").value).unwrap();
    let role: Role = serde_json::from_value(one(&documents, "Role").value).unwrap();
    let cluster_rules = cluster_role.rules.unwrap_or_default();
    let role_rules = role.rules.unwrap_or_default();

    let mut granted: Vec<_> = cluster_rules
        .iter()
        .chain(&role_rules)
        .map(rules_key)
        .collect();
    // The Lease the Deployment elects on, which the Role names.
    let deployment = one(&documents, "Deployment");
    let args: Vec<String> = serde_json::from_value(
        deployment.value["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
    )
    .unwrap();
    let lease = args
        .iter()
        .position(|a| a == "--lease-name")
        .map(|i| args[i + 1].clone())
        .expect("the chart names its Lease");
    assert_eq!(lease, format!("{}-control", RELEASE.name));
    let mut needed: Vec<_> = flyball_k8s::rbac::policy_rules(&lease)
        .iter()
        .map(rules_key)
        .collect();
    granted.sort();
    needed.sort();
    assert_eq!(granted, needed);
    // The Lease is the one thing in the release namespace only.
    assert!(
        role_rules
            .iter()
            .all(|r| r.resources == Some(vec!["leases".to_string()]))
    );
    assert!(
        cluster_rules
            .iter()
            .all(|r| r.resources != Some(vec!["leases".to_string()]))
    );
    for rule in cluster_rules.iter().chain(&role_rules) {
        assert_eq!(rule.non_resource_urls, None, "{rule:?}");
    }

    // Each rule says which call needs it.
    let template = std::fs::read_to_string(deploy(CHART).join("templates/rbac.yaml")).unwrap();
    for rule in flyball_k8s::rbac::RULES {
        assert!(
            template.contains(&format!("# {}\n", rule.why)),
            "no comment for {rule:?}"
        );
    }

    // Both grants reach the ServiceAccount the Deployment runs as.
    let account = deployment.value["spec"]["template"]["spec"]["serviceAccountName"].clone();
    let cluster_binding: ClusterRoleBinding =
        serde_json::from_value(one(&documents, "ClusterRoleBinding").value).unwrap();
    let binding: RoleBinding =
        serde_json::from_value(one(&documents, "RoleBinding").value).unwrap();
    assert_eq!(
        cluster_binding.role_ref.name,
        cluster_role.metadata.name.unwrap()
    );
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    assert_eq!(role.metadata.namespace.as_deref(), Some(RELEASE.namespace));
    for subjects in [cluster_binding.subjects, binding.subjects] {
        let subject = &subjects.unwrap()[0];
        assert_eq!(subject.kind, "ServiceAccount");
        assert_eq!(json!(subject.name), account);
        assert_eq!(subject.namespace.as_deref(), Some(RELEASE.namespace));
    }
}

fn values_schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(deploy(CHART).join("values.schema.json")).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[test]
fn chart_values_validate_against_the_values_schema() {
    let schema = values_schema();
    let errors: Vec<String> = schema
        .iter_errors(&chart().values)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn values_schema_rejects_misspelled_and_mistyped_values() {
    let schema = values_schema();
    let values = chart().values;
    for (path, value) in [
        ("replica", json!(2)),
        ("replicas", json!("two")),
        ("replicas", json!(0)),
        ("service.grpcPort", json!(70000)),
        ("image.pullPolicy", json!("Sometimes")),
        ("resources.limits.gpu", json!("1")),
        ("podDisruptionBudget.maxUnavailable", json!("half")),
        ("listenAddress", json!("::")),
        ("listenAddress", json!("localhost")),
    ] {
        let broken = helm::with_value(&values, path, value.clone());
        assert!(!schema.is_valid(&broken), "{path} = {value} passed");
    }
}

fn pod_labels(deployment: &Document) -> Value {
    deployment.value["spec"]["template"]["metadata"]["labels"].clone()
}

/// Whether every label in `selector` is in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn chart_runs_the_control_service_as_documented() {
    let values = chart().values;
    let documents = render(&values);
    let deployment = one(&documents, "Deployment");
    let spec = &deployment.value["spec"];
    assert_eq!(spec["replicas"], json!(2));
    let container = &spec["template"]["spec"]["containers"][0];
    assert_eq!(
        container["args"],
        json!([
            "control",
            "--grpc-listen",
            "[::]:9090",
            "--http-listen",
            "[::]:9091",
            "--source",
            "kubernetes",
            "--lease-name",
            "flyball-control"
        ])
    );
    assert_eq!(
        container["image"],
        json!("ghcr.io/flyball-dev/flyball:0.1.0")
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "http");
    }
    let ports: BTreeMap<String, u64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("grpc".into(), 9090), ("http".into(), 9091)])
    );
    assert_eq!(
        spec["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert!(container["resources"]["requests"].is_object());
    assert!(container["resources"]["limits"]["memory"].is_string());

    let labels = pod_labels(&deployment);
    assert!(selects(&spec["selector"]["matchLabels"], &labels));
    let service = one(&documents, "Service");
    assert!(selects(&service.value["spec"]["selector"], &labels));
    let service_ports: BTreeMap<String, (Value, Value)> = service.value["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                (p["port"].clone(), p["targetPort"].clone()),
            )
        })
        .collect();
    assert_eq!(
        service_ports,
        BTreeMap::from([
            ("grpc".into(), (json!(9090), json!("grpc"))),
            ("http".into(), (json!(9091), json!("http"))),
        ])
    );
    let budget = one(&documents, "PodDisruptionBudget");
    assert!(selects(
        &budget.value["spec"]["selector"]["matchLabels"],
        &labels
    ));
    assert_eq!(budget.value["spec"]["maxUnavailable"], json!(1));
}

#[test]
fn chart_options_render_to_valid_objects() {
    let mut values = chart().values;
    for (path, value) in [
        ("replicas", json!(3)),
        ("image.tag", json!("0.2.0-rc.1")),
        ("imagePullSecrets", json!([{"name": "registry"}])),
        ("extraArgs", json!(["--stale-after", "5s"])),
        ("podAnnotations", json!({"prometheus.io/scrape": "true"})),
        ("priorityClassName", json!("system-cluster-critical")),
        ("nodeSelector", json!({"kubernetes.io/os": "linux"})),
        (
            "tolerations",
            json!([{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]),
        ),
        (
            "affinity",
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}]}}}),
        ),
        ("podDisruptionBudget.maxUnavailable", json!("50%")),
        ("listenAddress", json!("0.0.0.0")),
    ] {
        values = helm::with_value(&values, path, value);
    }
    assert!(values_schema().is_valid(&values));
    let documents = render(&values);
    assert_built_in_and_valid(&documents);
    let deployment = one(&documents, "Deployment");
    let pod = &deployment.value["spec"]["template"];
    assert_eq!(deployment.value["spec"]["replicas"], json!(3));
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        json!("ghcr.io/flyball-dev/flyball:0.2.0-rc.1")
    );
    let args = pod["spec"]["containers"][0]["args"].as_array().unwrap();
    assert_eq!(
        args[2..5],
        [
            json!("0.0.0.0:9090"),
            json!("--http-listen"),
            json!("0.0.0.0:9091")
        ]
    );
    assert_eq!(args[9..], [json!("--stale-after"), json!("5s")]);
    assert_eq!(pod["metadata"]["annotations"], values["podAnnotations"]);
    assert_eq!(pod["spec"]["imagePullSecrets"], values["imagePullSecrets"]);
    assert_eq!(
        pod["spec"]["priorityClassName"],
        values["priorityClassName"]
    );
    assert_eq!(pod["spec"]["nodeSelector"], values["nodeSelector"]);
    assert_eq!(pod["spec"]["tolerations"], values["tolerations"]);
    assert_eq!(pod["spec"]["affinity"], values["affinity"]);
    let budget = one(&documents, "PodDisruptionBudget");
    assert_eq!(budget.value["spec"]["maxUnavailable"], json!("50%"));
}

#[test]
fn chart_turns_on_mutual_tls_from_a_secret() {
    let values = helm::with_value(
        &chart().values,
        "grpcTLS.secretName",
        json!("flyball-control-tls"),
    );
    assert!(values_schema().is_valid(&values));
    let documents = render(&values);
    assert_built_in_and_valid(&documents);
    let deployment = one(&documents, "Deployment");
    let pod = &deployment.value["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let flag = |name: &str| {
        let at = args
            .iter()
            .position(|a| *a == name)
            .unwrap_or_else(|| panic!("{name}"));
        args[at + 1]
    };
    assert_eq!(flag("--grpc-tls-cert"), "/etc/flyball/tls/tls.crt");
    assert_eq!(flag("--grpc-tls-key"), "/etc/flyball/tls/tls.key");
    assert_eq!(flag("--grpc-tls-ca"), "/etc/flyball/tls/ca.crt");
    assert_eq!(
        flag("--grpc-tls-server-name"),
        format!("{}-control.{}.svc", RELEASE.name, RELEASE.namespace)
    );
    assert_eq!(
        container["volumeMounts"],
        json!([{"name": "grpc-tls", "mountPath": "/etc/flyball/tls", "readOnly": true}])
    );
    assert_eq!(
        pod["volumes"],
        json!([{"name": "grpc-tls", "secret": {"secretName": "flyball-control-tls"}}])
    );
    // The flags are the control service's own.
    let named = helm::with_value(&values, "grpcTLS.serverName", json!("control.example"));
    let deployment = one(&render(&named), "Deployment");
    let args = &deployment.value["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(args.as_array().unwrap().contains(&json!("control.example")));
}

// ===== what a real gateway does with these manifests =====

/// The HTTP_FILTER patch of the EnvoyFilter: the filter's reference to its ECDS resource.
fn envoy_filter_http_filter(filter: &Document) -> Value {
    let patches = filter.value["spec"]["configPatches"].as_array().unwrap();
    patches
        .iter()
        .find(|p| p["applyTo"] == "HTTP_FILTER")
        .unwrap()["patch"]["value"]
        .clone()
}

#[test]
fn istio_envoyfilter_accepts_the_agents_fail_open_stand_in() {
    // When the Istio agent cannot pull a remote Wasm module (registry down, tag moved, pull
    // secret missing) of a fail-open filter, it hands Envoy an allow-all RBAC filter under the
    // same ECDS name instead (istio/istio pkg/wasm/convert.go: MaybeConvertWasmExtensionConfig ->
    // createHTTPDefaultFilter, allowHTTPTypedConfig). Envoy rejects an ECDS update whose type is
    // not in the filter's `config_discovery.type_urls` ("Extension configuration updates are
    // rejected if they do not match any type URL in the set", envoy.config.core.v3
    // .ExtensionConfigSource), and a filter left without configuration answers every request
    // with a 500. Istio's own WasmPlugin and TrafficExtension filters list both types for this
    // reason (pilot/pkg/networking/core/extension/wasmplugin.go, toEnvoyHTTPFilter).
    //
    // Reproduced with this repository's Envoy 1.40: an ECDS file holding that RBAC filter, the
    // filter's type_urls [Wasm] -> "Filesystem config update rejected: Error: filter config has
    // type URL envoy.extensions.filters.http.rbac.v3.RBAC but expect ...wasm.v3.Wasm", and
    // `HTTP/1.1 500` for every request; type_urls [Wasm, RBAC] -> `HTTP/1.1 200`. So a gateway
    // pod that starts while the module cannot be pulled serves nothing but 500s, where the
    // manifest's `fail_open: true` means "requests pass unmeasured".
    let filter = one(&documents_in("istio/envoyfilter.yaml"), "EnvoyFilter");
    let type_urls: Vec<String> = serde_json::from_value(
        envoy_filter_http_filter(&filter)["config_discovery"]["type_urls"].clone(),
    )
    .unwrap();
    for needed in [
        "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
    ] {
        assert!(
            type_urls.iter().any(|t| t == needed),
            "{filter}: config_discovery.type_urls {type_urls:?} lacks {needed}: the Istio \
             agent's fail-open stand-in is rejected and the filter answers 500"
        );
    }
}

#[test]
fn keda_scaled_object_names_an_autoscaler_that_leaves_replicas_to_keda() {
    // The ScaledObject's own header: "The FlyballAutoscaler named below should have
    // `spec.dryRun: true`: flyball then decides and reports the same numbers but never writes
    // /scale itself, so KEDA's HPA and flyball do not both set replicas". Without it both write
    // the target's /scale: flyball its count d through ScaleClient::set_replicas, KEDA's HPA the
    // count the bridge's metric makes it land on, which is deliberately not d inside the HPA's
    // tolerance band (README "KEDA": 41 -> 45 asks 45.101 and lands on 46): two writers of one
    // /scale that can undo each other, which the header itself rules out. The actuator also only treats an HPA on the target as no
    // conflict in a dry run (control/src/actuator.rs: "In a dry run flyball writes no replicas,
    // so an HPA (KEDA's own, in the KEDA setup) is no conflict"). Shipped as they are,
    // examples/flyballautoscaler-unified.yaml and keda/scaledobject.yaml name each other and
    // the autoscaler has no dryRun (default false).
    let scaled = one(&documents_in("keda/scaledobject.yaml"), "ScaledObject");
    let metadata = &scaled.value["spec"]["triggers"][0]["metadata"];
    let named: Vec<Document> = manifest_documents()
        .into_iter()
        .filter(|d| {
            d.kind() == "FlyballAutoscaler"
                && d.name() == metadata["autoscaler"]
                && d.namespace() == scaled.namespace()
        })
        .collect();
    assert!(!named.is_empty(), "{scaled}: names no shipped autoscaler");
    for autoscaler in named {
        assert_eq!(
            autoscaler.value["spec"]["dryRun"],
            json!(true),
            "{autoscaler} is the autoscaler {scaled} feeds KEDA from, but it sets replicas \
             itself too (spec.dryRun is not true)"
        );
    }
}
