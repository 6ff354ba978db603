//! Worker-local accumulation of request records per (backend, model) key, with capped labels.
//!
//! Each Envoy worker has its own VM and its own [`Accumulator`]. Requests feed it without any
//! host call; on each tick the glue takes a [`WorkerDelta`] and merges it into shared data
//! (`crate::shared`). Label sets are capped ([`Labels`]) because both Envoy stats and the control
//! service's key space must stay bounded whatever clients put in `model`.

use crate::Nanos;
use crate::config::FilterConfig;
use crate::response::{Outcome, Phase, RequestRecord};
use flyball_proto::{MAX_NAME_BYTES, v1};
use flyball_sketch::Sketch;
use std::borrow::Cow;
use std::collections::HashMap;

/// The label for names beyond a cap.
pub const OTHER: &str = "other";
/// The model label of requests whose body named none (or was not inspected).
pub const UNKNOWN: &str = "unknown";

/// Index of a (backend, model) key in an [`Accumulator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub u32);

/// Whether a name new to a worker may have a label of its own. The caps are the Envoy process's,
/// but each worker's VM holds its own [`Labels`]: the glue answers from a table in shared data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// It may.
    Named,
    /// It may not: the cap is reached. `named` lists every name that has a label process-wide,
    /// for the worker to label them by name too from now on (the table no longer changes).
    Capped { named: Vec<String> },
    /// Not known (shared data failed): the worker's own count decides.
    Unknown,
}

/// Decides [`Admission`] for names new to a worker.
pub trait LabelAdmission {
    fn backend(&mut self, backend: &str) -> Admission;
    /// `backend` is the backend's label.
    fn model(&mut self, backend: &str, model: &str) -> Admission;
}

/// Each worker counts alone (tests; a host whose shared data fails).
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerLocal;

impl LabelAdmission for WorkerLocal {
    fn backend(&mut self, _: &str) -> Admission {
        Admission::Unknown
    }

    fn model(&mut self, _: &str, _: &str) -> Admission {
        Admission::Unknown
    }
}

/// Interned, capped backend and model names.
///
/// At most `max_backends` distinct backends, then every new one is "other"; at most
/// `max_models_per_backend` models per backend, then "other". The "other" and "unknown" labels do
/// not count against the caps, so the number of keys is bounded by
/// `(max_backends + 1) * (max_models_per_backend + 2)`. Which names get a label is decided for
/// the whole process by a [`LabelAdmission`]; this table caches the answers (a name capped is
/// not remembered, so memory stays bounded whatever clients send).
#[derive(Debug, Clone)]
pub struct Labels {
    max_backends: usize,
    max_models_per_backend: usize,
    backends: HashMap<String, usize>,
    /// The process-wide backend cap is reached: a backend not labelled here is "other".
    backends_closed: bool,
    /// Per backend: its name, its models, and how many of them count against the cap.
    entries: Vec<BackendEntry>,
    keys: Vec<(usize, String)>,
}

#[derive(Debug, Clone)]
struct BackendEntry {
    name: String,
    models: HashMap<String, KeyId>,
    capped_models: usize,
    /// The process-wide model cap is reached: a model not labelled here is "other".
    closed: bool,
}

// === impl Labels ===

impl Labels {
    pub fn new(max_backends: usize, max_models_per_backend: usize) -> Self {
        Labels {
            max_backends,
            max_models_per_backend,
            backends: HashMap::new(),
            backends_closed: false,
            entries: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// The key for `backend` and `model` (`None`: "unknown"), creating it if needed, each worker
    /// counting alone; the bool is true when it was created.
    pub fn key(&mut self, backend: &str, model: Option<&str>) -> (KeyId, bool) {
        self.key_with(backend, model, &mut WorkerLocal)
    }

    /// As [`Labels::key`], new names admitted by `admission`.
    pub fn key_with(
        &mut self,
        backend: &str,
        model: Option<&str>,
        admission: &mut impl LabelAdmission,
    ) -> (KeyId, bool) {
        let b = self.backend_index(backend, admission);
        // A name the control service would refuse would take the whole report with it, resent
        // until the gateway gives it up: one client's request would blank the gateway's load.
        let model = match model {
            Some(model) if model.len() > MAX_NAME_BYTES => OTHER,
            model => model.unwrap_or(UNKNOWN),
        };
        let Some(entry) = self.entries.get(b) else {
            // Unreachable: backend_index returns an existing index.
            return (KeyId(0), false);
        };
        if let Some(id) = entry.models.get(model) {
            return (*id, false);
        }
        let special = model == OTHER || model == UNKNOWN;
        let has_room = !entry.closed && entry.capped_models < self.max_models_per_backend;
        let label = if special {
            model
        } else if !has_room {
            OTHER
        } else {
            match admission.model(&entry.name, model) {
                Admission::Named | Admission::Unknown => model,
                Admission::Capped { named } => {
                    for name in &named {
                        self.add_model(b, name);
                    }
                    if let Some(entry) = self.entries.get_mut(b) {
                        entry.closed = true;
                    }
                    match self.entries.get(b).and_then(|e| e.models.get(model)) {
                        Some(id) => return (*id, true),
                        None => OTHER,
                    }
                }
            }
        };
        match self.entries.get(b).and_then(|e| e.models.get(label)) {
            Some(id) => (*id, false),
            None => (self.add_model(b, label), true),
        }
    }

    /// A key for `model` under backend `b`, unless it has one or the backend has no room left
    /// (then the existing or "other" key).
    fn add_model(&mut self, b: usize, model: &str) -> KeyId {
        let max = self.max_models_per_backend;
        let Some(entry) = self.entries.get_mut(b) else {
            return KeyId(0);
        };
        if let Some(id) = entry.models.get(model) {
            return *id;
        }
        let special = model == OTHER || model == UNKNOWN;
        if !special {
            if entry.capped_models >= max {
                if let Some(id) = entry.models.get(OTHER) {
                    return *id;
                }
                return self.add_model(b, OTHER);
            }
            entry.capped_models += 1;
        }
        let id = KeyId(self.keys.len() as u32);
        entry.models.insert(model.to_string(), id);
        self.keys.push((b, model.to_string()));
        id
    }

    fn backend_index(&mut self, backend: &str, admission: &mut impl LabelAdmission) -> usize {
        let backend = if backend.len() > MAX_NAME_BYTES {
            OTHER
        } else {
            backend
        };
        if let Some(b) = self.backends.get(backend) {
            return *b;
        }
        let label = if backend == OTHER {
            backend
        } else if self.backends_closed || self.counted_backends() >= self.max_backends {
            OTHER
        } else {
            match admission.backend(backend) {
                Admission::Named | Admission::Unknown => backend,
                Admission::Capped { named } => {
                    for name in &named {
                        if !self.backends.contains_key(name.as_str())
                            && self.counted_backends() < self.max_backends
                        {
                            self.add_backend(name);
                        }
                    }
                    self.backends_closed = true;
                    if self.backends.contains_key(backend) {
                        backend
                    } else {
                        OTHER
                    }
                }
            }
        };
        match self.backends.get(label) {
            Some(b) => *b,
            None => self.add_backend(label),
        }
    }

    /// Backends that count against the cap ("other" does not).
    fn counted_backends(&self) -> usize {
        self.backends.len() - usize::from(self.backends.contains_key(OTHER))
    }

    fn add_backend(&mut self, label: &str) -> usize {
        let b = self.entries.len();
        self.backends.insert(label.to_string(), b);
        self.entries.push(BackendEntry {
            name: label.to_string(),
            models: HashMap::new(),
            capped_models: 0,
            closed: false,
        });
        b
    }

    /// (backend, model) of a key; ("", "") for an id this table never issued.
    pub fn get(&self, key: KeyId) -> (&str, &str) {
        match self.keys.get(key.0 as usize) {
            Some((b, model)) => (
                self.entries.get(*b).map_or("", |e| e.name.as_str()),
                model.as_str(),
            ),
            None => ("", ""),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A name made safe for an Envoy stat name segment: anything but ASCII letters, digits, `_` and
/// `-` becomes `_`. Envoy splits stat names on `.` and the usual tag regexes (`([^.]+)`) cannot
/// carry a dot, and Prometheus names cannot carry most punctuation.
pub fn stat_label(s: &str) -> Cow<'_, str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !s.is_empty() && s.chars().all(ok) {
        Cow::Borrowed(s)
    } else if s.is_empty() {
        Cow::Borrowed("_")
    } else {
        Cow::Owned(s.chars().map(|c| if ok(c) { c } else { '_' }).collect())
    }
}

/// What one worker accumulated for one key since the last take.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyDelta {
    /// Deltas (outcomes, tokens, sketches); `in_flight` is always `None` here.
    pub telemetry: v1::KeyTelemetry,
    /// Signed changes of the in-flight gauges since the last take.
    pub waiting_change: i64,
    pub decoding_change: i64,
}

/// What one worker accumulated since the last take.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerDelta {
    pub keys: Vec<KeyDelta>,
}

impl WorkerDelta {
    /// Requests completed in this delta.
    pub fn requests(&self) -> u64 {
        self.keys
            .iter()
            .map(|k| {
                k.telemetry
                    .requests
                    .as_ref()
                    .map_or(0, v1::RequestOutcomes::total)
            })
            .fold(0, u64::saturating_add)
    }
}

#[derive(Debug, Clone, Default)]
struct KeyState {
    outcomes: v1::RequestOutcomes,
    tokens: v1::TokenUsage,
    ttft_us: Sketch,
    tpot_us: Sketch,
    itl_us: Sketch,
    e2e_us: Sketch,
    waiting_change: i64,
    decoding_change: i64,
    dirty: bool,
}

/// Worker-local accumulation. See the module docs.
#[derive(Debug, Clone)]
pub struct Accumulator {
    labels: Labels,
    keys: Vec<KeyState>,
    dirty: Vec<u32>,
}

// === impl Accumulator ===

impl Accumulator {
    pub fn new(cfg: &FilterConfig) -> Self {
        Accumulator {
            labels: Labels::new(cfg.max_backends, cfg.max_models_per_backend),
            keys: Vec::new(),
            dirty: Vec::new(),
        }
    }

    /// The key for a request, each worker counting alone against the caps; the bool is true
    /// when the key is new (the glue defines its stats).
    pub fn key(&mut self, backend: &str, model: Option<&str>) -> (KeyId, bool) {
        self.key_with(backend, model, &mut WorkerLocal)
    }

    /// As [`Accumulator::key`], new names admitted by `admission` (the process's caps).
    pub fn key_with(
        &mut self,
        backend: &str,
        model: Option<&str>,
        admission: &mut impl LabelAdmission,
    ) -> (KeyId, bool) {
        let (id, new) = self.labels.key_with(backend, model, admission);
        while self.keys.len() < self.labels.len() {
            self.keys.push(KeyState::default());
        }
        (id, new)
    }

    /// (backend, model) labels of a key.
    pub fn labels(&self, key: KeyId) -> (&str, &str) {
        self.labels.get(key)
    }

    pub fn request_started(&mut self, key: KeyId) {
        if let Some(k) = self.touch(key) {
            k.waiting_change += 1;
        }
    }

    pub fn first_token(&mut self, key: KeyId) {
        if let Some(k) = self.touch(key) {
            k.waiting_change -= 1;
            k.decoding_change += 1;
        }
    }

    pub fn record_itl(&mut self, key: KeyId, gap_ns: u64) {
        if let Some(k) = self.touch(key) {
            k.itl_us.record(micros(gap_ns));
        }
    }

    /// Counts a finished request; `phase_at_end` says which in-flight gauge it leaves.
    pub fn request_finished(&mut self, key: KeyId, phase_at_end: Phase, record: &RequestRecord) {
        let Some(k) = self.touch(key) else {
            return;
        };
        match phase_at_end {
            Phase::WaitingFirstToken => k.waiting_change -= 1,
            Phase::Decoding => k.decoding_change -= 1,
        }
        let o = &mut k.outcomes;
        let counter = match record.outcome {
            Outcome::Ok => &mut o.ok,
            Outcome::ClientError => &mut o.client_error,
            Outcome::ServerError => &mut o.server_error,
            Outcome::UpstreamReset => &mut o.upstream_reset,
            Outcome::ClientCancel => &mut o.client_cancel,
        };
        *counter = counter.saturating_add(1);
        let t = &mut k.tokens;
        t.input = t.input.saturating_add(record.input_tokens);
        t.output = t.output.saturating_add(record.output_tokens);
        if record.input_estimated {
            t.input_estimated = t.input_estimated.saturating_add(record.input_tokens);
        }
        if record.output_estimated {
            t.output_estimated = t.output_estimated.saturating_add(record.output_tokens);
        }
        if record.input_estimated || record.output_estimated {
            t.requests_estimated = t.requests_estimated.saturating_add(1);
        }
        if record.unmeasured {
            t.requests_unmeasured = t.requests_unmeasured.saturating_add(1);
        }
        if let Some(ttft) = record.ttft {
            k.ttft_us.record(micros(ttft));
        }
        if let Some(tpot) = record.tpot {
            k.tpot_us.record(micros(tpot));
        }
        k.e2e_us.record(micros(record.e2e));
    }

    /// Everything accumulated since the last take, or `None` when nothing changed. Leaves the
    /// accumulator zeroed with its storage kept.
    pub fn take_delta(&mut self) -> Option<WorkerDelta> {
        if self.dirty.is_empty() {
            return None;
        }
        let mut delta = WorkerDelta {
            keys: Vec::with_capacity(self.dirty.len()),
        };
        for &i in &self.dirty {
            let Some(k) = self.keys.get_mut(i as usize) else {
                continue;
            };
            let (backend, model) = self.labels.get(KeyId(i));
            let key_delta = KeyDelta {
                telemetry: v1::KeyTelemetry {
                    backend: backend.to_string(),
                    model: model.to_string(),
                    requests: (k.outcomes.total() > 0).then(|| std::mem::take(&mut k.outcomes)),
                    tokens: (k.tokens != v1::TokenUsage::default())
                        .then(|| std::mem::take(&mut k.tokens)),
                    ttft_us: wire(&mut k.ttft_us),
                    tpot_us: wire(&mut k.tpot_us),
                    itl_us: wire(&mut k.itl_us),
                    e2e_us: wire(&mut k.e2e_us),
                    in_flight: None,
                },
                waiting_change: std::mem::take(&mut k.waiting_change),
                decoding_change: std::mem::take(&mut k.decoding_change),
            };
            k.dirty = false;
            let empty = key_delta.waiting_change == 0
                && key_delta.decoding_change == 0
                && key_delta.telemetry.requests.is_none()
                && key_delta.telemetry.tokens.is_none()
                && key_delta.telemetry.itl_us.is_none();
            if !empty {
                delta.keys.push(key_delta);
            }
        }
        self.dirty.clear();
        (!delta.keys.is_empty()).then_some(delta)
    }

    fn touch(&mut self, key: KeyId) -> Option<&mut KeyState> {
        let k = self.keys.get_mut(key.0 as usize)?;
        if !k.dirty {
            k.dirty = true;
            self.dirty.push(key.0);
        }
        Some(k)
    }
}

/// Nanoseconds to the microseconds sketches hold.
fn micros(ns: Nanos) -> f64 {
    ns as f64 / 1000.0
}

/// The wire form of a sketch, or `None` when empty; clears the sketch, keeping its storage.
fn wire(sketch: &mut Sketch) -> Option<v1::Sketch> {
    if sketch.is_empty() {
        return None;
    }
    let out = v1::Sketch::from(&*sketch);
    sketch.clear();
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn config(max_backends: usize, max_models: usize) -> FilterConfig {
        FilterConfig {
            max_backends,
            max_models_per_backend: max_models,
            ..FilterConfig::default()
        }
    }

    fn record(outcome: Outcome) -> RequestRecord {
        RequestRecord {
            outcome,
            input_tokens: 10,
            output_tokens: 5,
            input_estimated: true,
            output_estimated: false,
            unmeasured: false,
            ttft: Some(2_000_000),
            tpot: Some(500_000),
            e2e: 4_000_000,
        }
    }

    #[test]
    fn labels_beyond_the_caps_become_other() {
        let mut acc = Accumulator::new(&config(2, 2));
        let (a, new) = acc.key("a", Some("m1"));
        assert!(new);
        assert_eq!(acc.key("a", Some("m1")), (a, false));
        acc.key("a", Some("m2"));
        let (third, _) = acc.key("a", Some("m3"));
        assert_eq!(acc.labels(third), ("a", OTHER));
        let (fourth, new) = acc.key("a", Some("m4"));
        assert_eq!((fourth, new), (third, false));
        let (unknown, _) = acc.key("a", None);
        assert_eq!(acc.labels(unknown), ("a", UNKNOWN));
        acc.key("b", Some("m1"));
        let (c, _) = acc.key("c", Some("m1"));
        assert_eq!(acc.labels(c), (OTHER, "m1"));
        let (d, _) = acc.key("d", Some("m1"));
        assert_eq!(d, c);
    }

    /// Two workers' tables consulting one process-wide table, as the glue does in shared data.
    struct Process<'a> {
        table: &'a mut crate::shared::LabelTable,
        max_backends: usize,
        max_models: usize,
    }

    impl LabelAdmission for Process<'_> {
        fn backend(&mut self, backend: &str) -> Admission {
            self.table.admit_backend(backend, self.max_backends).0
        }

        fn model(&mut self, backend: &str, model: &str) -> Admission {
            self.table.admit_model(backend, model, self.max_models).0
        }
    }

    /// The control service takes every report a gateway with the default caps can send
    /// (`DEFAULT_MAX_KEYS_PER_REPORT`), which counts on this bound: reached, never passed.
    #[test]
    fn the_keys_reach_but_never_pass_the_bound_the_control_service_counts_on() {
        let (max_backends, max_models) = (3, 4);
        let mut labels = Labels::new(max_backends, max_models);
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let mut names: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
        names.extend([OTHER.to_string(), UNKNOWN.to_string(), long]);
        for backend in &names {
            for model in &names {
                labels.key(backend, Some(model));
            }
            labels.key(backend, None);
        }
        assert_eq!(
            labels.len(),
            flyball_proto::max_keys_under_caps(max_backends, max_models)
        );
    }

    /// The report merges every worker's keys: workers that meet the names in different orders,
    /// admitted through the process's one table, still make no more keys between them.
    #[test]
    fn workers_meeting_names_in_different_orders_make_no_more_keys_together() {
        let (max_backends, max_models) = (2, 3);
        let mut table = crate::shared::LabelTable::default();
        let mut names: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
        names.extend([OTHER.to_string(), UNKNOWN.to_string()]);
        let mut keys = std::collections::BTreeSet::new();
        for order in [false, true] {
            let mut worker = Labels::new(max_backends, max_models);
            let mut ordered = names.clone();
            if order {
                ordered.reverse();
            }
            for backend in &ordered {
                for model in &ordered {
                    let mut process = Process {
                        table: &mut table,
                        max_backends,
                        max_models,
                    };
                    let (id, _) = worker.key_with(backend, Some(model), &mut process);
                    let (b, m) = worker.get(id);
                    keys.insert((b.to_string(), m.to_string()));
                }
            }
        }
        assert_eq!(
            keys.len(),
            flyball_proto::max_keys_under_caps(max_backends, max_models),
            "{keys:?}"
        );
    }

    #[test]
    fn the_caps_hold_for_the_process_not_per_worker() {
        let mut table = crate::shared::LabelTable::default();
        let (mut first, mut second) = (Labels::new(1, 1), Labels::new(1, 1));
        fn process(table: &mut crate::shared::LabelTable) -> Process<'_> {
            Process {
                table,
                max_backends: 1,
                max_models: 1,
            }
        }
        let (m0, _) = first.key_with("a", Some("m0"), &mut process(&mut table));
        assert_eq!(first.get(m0), ("a", "m0"));
        // The second worker meets another model first: the process's one place is taken.
        let (m1, _) = second.key_with("a", Some("m1"), &mut process(&mut table));
        assert_eq!(second.get(m1), ("a", OTHER));
        // ... and labels the first worker's model by its name, without asking again.
        let mut refuse = Process {
            table: &mut crate::shared::LabelTable::default(),
            max_backends: 0,
            max_models: 0,
        };
        let (m0_second, _) = second.key_with("a", Some("m0"), &mut refuse);
        assert_eq!(second.get(m0_second), ("a", "m0"));
        // Backends likewise.
        let (b, _) = second.key_with("b", Some("m0"), &mut process(&mut table));
        assert_eq!(second.get(b), (OTHER, "m0"));
        let (a_first, _) = first.key_with("a", Some("m2"), &mut process(&mut table));
        assert_eq!(first.get(a_first), ("a", OTHER));
        assert_eq!(table.backends.len(), 2, "{table:?}");
    }

    #[test]
    fn names_the_control_service_would_refuse_become_other() {
        let mut acc = Accumulator::new(&config(2, 2));
        let long = "m".repeat(MAX_NAME_BYTES + 1);
        let (id, _) = acc.key("a", Some(&long));
        assert_eq!(acc.labels(id), ("a", OTHER));
        let (id, _) = acc.key(&"b".repeat(MAX_NAME_BYTES + 1), Some("m1"));
        assert_eq!(acc.labels(id), (OTHER, "m1"));
        // Neither counted against the caps: two real models still get their own keys.
        let at_bound = "m".repeat(MAX_NAME_BYTES);
        for model in ["m1", at_bound.as_str()] {
            let (id, _) = acc.key("a", Some(model));
            assert_eq!(acc.labels(id), ("a", model));
        }
    }

    #[test]
    fn key_count_stays_bounded_for_any_names() {
        let mut acc = Accumulator::new(&config(3, 4));
        for b in 0..50 {
            for m in 0..50 {
                acc.key(&format!("b{b}"), Some(&format!("m{m}")));
            }
            acc.key(&format!("b{b}"), None);
        }
        assert!(
            acc.labels.len() <= (3 + 1) * (4 + 2),
            "{}",
            acc.labels.len()
        );
    }

    #[test]
    fn stat_labels_lose_dots_and_punctuation() {
        assert_eq!(stat_label("llama-3_1"), Cow::Borrowed("llama-3_1"));
        assert_eq!(stat_label("meta/llama-3.1:8b"), "meta_llama-3_1_8b");
        assert_eq!(stat_label("é"), "_");
        assert_eq!(stat_label(""), "_");
    }

    #[test]
    fn a_delta_carries_changes_and_then_the_accumulator_is_empty() {
        let mut acc = Accumulator::new(&FilterConfig::default());
        assert!(acc.take_delta().is_none());
        let (k, _) = acc.key("vllm", Some("m"));
        acc.request_started(k);
        acc.request_started(k);
        acc.first_token(k);
        acc.record_itl(k, 30_000_000);
        acc.request_finished(k, Phase::Decoding, &record(Outcome::Ok));

        let delta = acc.take_delta().unwrap_or_default();
        assert_eq!(delta.keys.len(), 1);
        let key = &delta.keys[0];
        assert_eq!((key.waiting_change, key.decoding_change), (1, 0));
        assert_eq!(delta.requests(), 1);
        let t = key.telemetry.tokens.unwrap_or_default();
        assert_eq!(
            (t.input, t.output, t.input_estimated, t.output_estimated),
            (10, 5, 10, 0)
        );
        assert_eq!(t.requests_estimated, 1);
        let ttft = key.telemetry.ttft_us.clone().unwrap_or_default();
        let ttft = Sketch::try_from(&ttft).unwrap_or_default();
        assert_eq!(ttft.count(), 1);
        assert!((ttft.sum() - 2000.0).abs() < 1e-9);
        assert!(key.telemetry.itl_us.is_some());
        assert!(key.telemetry.in_flight.is_none());

        assert!(acc.take_delta().is_none());
        acc.request_finished(k, Phase::WaitingFirstToken, &record(Outcome::ClientCancel));
        let delta = acc.take_delta().unwrap_or_default();
        assert_eq!(delta.keys[0].waiting_change, -1);
        assert_eq!(
            delta.keys[0]
                .telemetry
                .requests
                .as_ref()
                .map(|r| r.client_cancel),
            Some(1)
        );
    }

    #[test]
    fn touching_a_key_without_change_reports_nothing() {
        let mut acc = Accumulator::new(&FilterConfig::default());
        let (k, _) = acc.key("b", None);
        acc.request_started(k);
        let _ = acc.take_delta();
        // Started and finished before any take: the gauges net to zero but the outcome counts.
        acc.request_started(k);
        acc.request_finished(k, Phase::WaitingFirstToken, &record(Outcome::ServerError));
        let delta = acc.take_delta().unwrap_or_default();
        assert_eq!(
            (delta.keys[0].waiting_change, delta.keys[0].decoding_change),
            (0, 0)
        );
        assert_eq!(delta.requests(), 1);
        // An id this accumulator never issued is ignored.
        acc.request_started(KeyId(99));
        assert!(acc.take_delta().is_none());
    }
}
