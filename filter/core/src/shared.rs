//! The process-wide accumulation every worker merges into, kept in Envoy shared data.
//!
//! Workers share nothing but Envoy's shared data (one map per `vm_id`, values copied in and out,
//! `set` refused on a CAS mismatch). Under [`ACCUM_KEY`] lives an [`Accumulation`]: the deltas of
//! all workers since the last report, plus the absolute in-flight gauges. These functions are pure:
//! the glue reads `(bytes, cas)`, calls one of them, and writes the result back with the CAS,
//! retrying from the read on a mismatch.
//!
//! worker `take_delta` -> [`merge_worker_delta`] -> shared bytes -> [`take_report_keys`] -> report

use crate::aggregate::{Admission, OTHER, WorkerDelta};
use flyball_proto::v1;
use prost::Message;
use std::collections::HashMap;

/// Shared-data key of the [`Accumulation`].
pub const ACCUM_KEY: &str = "flyball.accum";

/// Deltas of all workers since the last report, plus absolute in-flight gauges.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Accumulation {
    /// Per key: deltas, and `in_flight` as absolute gauges.
    #[prost(message, repeated, tag = "1")]
    pub keys: Vec<v1::KeyTelemetry>,
    /// Requests completed in `keys`' deltas.
    #[prost(uint64, tag = "2")]
    pub buffered_requests: u64,
    /// Requests whose deltas were dropped because the accumulation was full, cumulative since
    /// the shared data was created.
    #[prost(uint64, tag = "3")]
    pub dropped_requests: u64,
}

/// Shared-data key of the [`LabelTable`].
pub const LABELS_KEY: &str = "flyball.labels";

/// The names that have labels of their own in this Envoy process: the caps
/// (`maxBackends`, `maxModelsPerBackend`) are the process's, and each worker's VM consults this
/// table for a name it has not seen. Names are never removed, so a full list stays full.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelTable {
    #[prost(message, repeated, tag = "1")]
    pub backends: Vec<BackendLabels>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BackendLabels {
    /// The backend's label ("other" for backends past the cap, whose models are capped too).
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub models: Vec<String>,
}

impl LabelTable {
    /// Decodes shared bytes; missing or corrupt bytes give an empty table (a worker then admits
    /// names as if first: at worst a cap is exceeded once, never traffic affected).
    pub fn decode_or_empty(shared: Option<&[u8]>) -> LabelTable {
        shared
            .and_then(|bytes| LabelTable::decode(bytes).ok())
            .unwrap_or_default()
    }

    /// Admits `backend` when it is listed or fewer than `max` backends are; the bool says the
    /// table changed (write it back).
    pub fn admit_backend(&mut self, backend: &str, max: usize) -> (Admission, bool) {
        if self.backends.iter().any(|b| b.name == backend) {
            return (Admission::Named, false);
        }
        let counted = self.backends.iter().filter(|b| b.name != OTHER).count();
        if counted >= max {
            let named = self
                .backends
                .iter()
                .filter(|b| b.name != OTHER)
                .map(|b| b.name.clone())
                .collect();
            return (Admission::Capped { named }, false);
        }
        self.backends.push(BackendLabels {
            name: backend.to_owned(),
            models: Vec::new(),
        });
        (Admission::Named, true)
    }

    /// Admits `model` of the backend labelled `backend` when it is listed or fewer than `max`
    /// models of that backend are; the bool says the table changed.
    pub fn admit_model(&mut self, backend: &str, model: &str, max: usize) -> (Admission, bool) {
        let at = match self.backends.iter().position(|b| b.name == backend) {
            Some(at) => at,
            None => {
                // Labelled by a worker that could not reach this table: listed now.
                self.backends.push(BackendLabels {
                    name: backend.to_owned(),
                    models: Vec::new(),
                });
                self.backends.len() - 1
            }
        };
        let Some(entry) = self.backends.get_mut(at) else {
            return (Admission::Unknown, false);
        };
        if entry.models.iter().any(|m| m == model) {
            return (Admission::Named, false);
        }
        if entry.models.len() >= max {
            return (
                Admission::Capped {
                    named: entry.models.clone(),
                },
                false,
            );
        }
        entry.models.push(model.to_owned());
        (Admission::Named, true)
    }
}

/// What [`take_report_keys`] moved out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReportKeys {
    /// Deltas and absolute in-flight gauges, one entry per key with either.
    pub keys: Vec<v1::KeyTelemetry>,
    /// Requests completed in those deltas.
    pub requests: u64,
    /// [`Accumulation::dropped_requests`] (cumulative).
    pub dropped_requests: u64,
}

/// Decodes shared bytes; missing or corrupt bytes give an empty accumulation (a corrupt value
/// can only come from a foreign writer or an older layout, and must not wedge reporting).
pub fn decode_accumulation(shared: Option<&[u8]>) -> Accumulation {
    shared
        .and_then(|bytes| Accumulation::decode(bytes).ok())
        .unwrap_or_default()
}

/// Adds a worker's delta to the shared accumulation and returns the bytes to write back.
///
/// Deltas add; in-flight changes move the absolute gauges (never below zero). When the result
/// would exceed `max_bytes` the delta's figures are dropped and counted in `dropped_requests`,
/// but its in-flight changes still apply, so the gauges stay right.
pub fn merge_worker_delta(shared: Option<&[u8]>, delta: &WorkerDelta, max_bytes: usize) -> Vec<u8> {
    let mut merged = decode_accumulation(shared);
    apply(&mut merged, delta, true);
    let bytes = merged.encode_to_vec();
    if bytes.len() <= max_bytes {
        return bytes;
    }
    let mut gauges_only = decode_accumulation(shared);
    apply(&mut gauges_only, delta, false);
    gauges_only.dropped_requests = gauges_only
        .dropped_requests
        .saturating_add(delta.requests());
    gauges_only.encode_to_vec()
}

fn apply(acc: &mut Accumulation, delta: &WorkerDelta, with_figures: bool) {
    let mut index: HashMap<(String, String), usize> = acc
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| ((k.backend.clone(), k.model.clone()), i))
        .collect();
    for key in &delta.keys {
        let t = &key.telemetry;
        let at = *index
            .entry((t.backend.clone(), t.model.clone()))
            .or_insert_with(|| {
                acc.keys.push(v1::KeyTelemetry {
                    backend: t.backend.clone(),
                    model: t.model.clone(),
                    ..Default::default()
                });
                acc.keys.len() - 1
            });
        let Some(into) = acc.keys.get_mut(at) else {
            continue;
        };
        let gauges = into.in_flight.get_or_insert_with(Default::default);
        gauges.waiting_first_token = shift(gauges.waiting_first_token, key.waiting_change);
        gauges.decoding = shift(gauges.decoding, key.decoding_change);
        if with_figures {
            add_figures(into, t);
        }
    }
    if with_figures {
        acc.buffered_requests = acc.buffered_requests.saturating_add(delta.requests());
    }
    // Keys with nothing left would otherwise linger forever.
    acc.keys.retain(|k| !is_empty(k));
}

fn shift(gauge: u64, change: i64) -> u64 {
    if change >= 0 {
        gauge.saturating_add(change.unsigned_abs())
    } else {
        gauge.saturating_sub(change.unsigned_abs())
    }
}

/// Adds the delta figures of `from` to `into` (not `in_flight`).
pub fn add_figures(into: &mut v1::KeyTelemetry, from: &v1::KeyTelemetry) {
    into.add_figures(from);
}

fn has_figures(k: &v1::KeyTelemetry) -> bool {
    k.requests.is_some()
        || k.tokens.is_some()
        || k.ttft_us.is_some()
        || k.tpot_us.is_some()
        || k.itl_us.is_some()
        || k.e2e_us.is_some()
}

fn has_in_flight(k: &v1::KeyTelemetry) -> bool {
    k.in_flight
        .as_ref()
        .is_some_and(|f| f.waiting_first_token > 0 || f.decoding > 0)
}

fn is_empty(k: &v1::KeyTelemetry) -> bool {
    !has_figures(k) && !has_in_flight(k)
}

/// Moves every delta out of the shared accumulation for a report. Returns the report's keys
/// (deltas plus the absolute in-flight gauges) and the bytes to write back (the gauges only; keys
/// with nothing in flight vanish).
pub fn take_report_keys(shared: &[u8]) -> (ReportKeys, Vec<u8>) {
    let acc = decode_accumulation(Some(shared));
    let mut remaining = Accumulation {
        keys: Vec::new(),
        buffered_requests: 0,
        dropped_requests: acc.dropped_requests,
    };
    let mut keys = Vec::with_capacity(acc.keys.len());
    for mut key in acc.keys {
        if !has_in_flight(&key) {
            key.in_flight = None;
        } else {
            remaining.keys.push(v1::KeyTelemetry {
                backend: key.backend.clone(),
                model: key.model.clone(),
                in_flight: key.in_flight,
                ..Default::default()
            });
        }
        if !is_empty(&key) {
            keys.push(key);
        }
    }
    (
        ReportKeys {
            keys,
            requests: acc.buffered_requests,
            dropped_requests: acc.dropped_requests,
        },
        remaining.encode_to_vec(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::aggregate::KeyDelta;
    use flyball_sketch::Sketch;

    fn delta(model: &str, ok: u64, waiting: i64, decoding: i64) -> WorkerDelta {
        let mut sketch = Sketch::new();
        for v in 0..ok {
            sketch.record(1000.0 + v as f64);
        }
        WorkerDelta {
            keys: vec![KeyDelta {
                telemetry: v1::KeyTelemetry {
                    backend: "b".into(),
                    model: model.into(),
                    requests: (ok > 0).then(|| v1::RequestOutcomes {
                        ok,
                        ..Default::default()
                    }),
                    tokens: (ok > 0).then(|| v1::TokenUsage {
                        input: 10 * ok,
                        output: 3 * ok,
                        ..Default::default()
                    }),
                    e2e_us: (ok > 0).then(|| v1::Sketch::from(&sketch)),
                    ..Default::default()
                },
                waiting_change: waiting,
                decoding_change: decoding,
            }],
        }
    }

    #[test]
    fn deltas_add_and_gauges_move() {
        let a = merge_worker_delta(None, &delta("m", 2, 3, 0), usize::MAX);
        let b = merge_worker_delta(Some(&a), &delta("m", 1, -2, 1), usize::MAX);
        let acc = decode_accumulation(Some(&b));
        assert_eq!(acc.buffered_requests, 3);
        let key = &acc.keys[0];
        assert_eq!(key.requests.as_ref().map(|r| r.ok), Some(3));
        assert_eq!(key.tokens.as_ref().map(|t| t.input), Some(30));
        let gauges = key.in_flight.unwrap_or_default();
        assert_eq!((gauges.waiting_first_token, gauges.decoding), (1, 1));
        let e2e = key.e2e_us.as_ref().and_then(|s| Sketch::try_from(s).ok());
        assert_eq!(e2e.map(|s| s.count()), Some(3));
    }

    #[test]
    fn gauges_never_go_below_zero() {
        let bytes = merge_worker_delta(None, &delta("m", 0, -5, -1), usize::MAX);
        let acc = decode_accumulation(Some(&bytes));
        assert!(acc.keys.is_empty(), "{acc:?}");
    }

    #[test]
    fn taking_keys_leaves_only_gauges() {
        let a = merge_worker_delta(None, &delta("m", 2, 1, 1), usize::MAX);
        let a = merge_worker_delta(Some(&a), &delta("n", 1, 0, 0), usize::MAX);
        let (taken, rest) = take_report_keys(&a);
        assert_eq!(taken.requests, 3);
        assert_eq!(taken.keys.len(), 2);
        let m = taken.keys.iter().find(|k| k.model == "m");
        assert_eq!(m.and_then(|k| k.in_flight).map(|f| f.decoding), Some(1));
        let n = taken.keys.iter().find(|k| k.model == "n");
        assert!(n.is_some_and(|k| k.in_flight.is_none()));

        let rest_acc = decode_accumulation(Some(&rest));
        assert_eq!(rest_acc.keys.len(), 1);
        assert!(!has_figures(&rest_acc.keys[0]));
        let (again, _) = take_report_keys(&rest);
        assert_eq!(again.requests, 0);
        assert_eq!(again.keys.len(), 1);
    }

    #[test]
    fn a_full_accumulation_drops_figures_but_keeps_gauges() {
        let a = merge_worker_delta(None, &delta("m", 2, 1, 0), usize::MAX);
        let limit = a.len() + 4;
        let b = merge_worker_delta(Some(&a), &delta("other-model", 5, 2, 0), limit);
        let acc = decode_accumulation(Some(&b));
        assert_eq!(acc.buffered_requests, 2);
        assert_eq!(acc.dropped_requests, 5);
        let other = acc.keys.iter().find(|k| k.model == "other-model");
        assert_eq!(
            other
                .and_then(|k| k.in_flight)
                .map(|f| f.waiting_first_token),
            Some(2)
        );
        assert!(other.is_some_and(|k| !has_figures(k)));
    }

    #[test]
    fn corrupt_shared_bytes_start_over_instead_of_failing() {
        let bytes = merge_worker_delta(Some(&[0xff, 0xff, 0xff]), &delta("m", 1, 0, 0), usize::MAX);
        assert_eq!(decode_accumulation(Some(&bytes)).buffered_requests, 1);
        let (taken, _) = take_report_keys(&[0x0a, 0xff]);
        assert!(taken.keys.is_empty());
    }
}
