//! Envoy stats: the figures every Prometheus already scrapes from Envoy's admin
//! `/stats/prometheus`, labelled by `backend` and `model` through `stats_tags` regexes (the wasm
//! ABI has no labels). Names follow the OpenTelemetry GenAI semantic conventions where one
//! exists (`gen_ai.server.time_to_first_token`, `gen_ai.server.time_per_output_token`,
//! `gen_ai.server.request.duration`, `gen_ai.client.token.usage`), in milliseconds because wasm
//! histograms take integers. Stats never expire in Envoy, so keys are capped upstream of here.

use flyball_filter_core::{Outcome, RequestRecord, stat_label};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// The stat name prefix; bootstrap `stats_tags` regexes turn the key segments into labels.
const PREFIX: &str = "flyball";

const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Ok, "ok"),
    (Outcome::ClientError, "client_error"),
    (Outcome::ServerError, "server_error"),
    (Outcome::UpstreamReset, "upstream_reset"),
    (Outcome::ClientCancel, "client_cancel"),
];

/// Metric ids of one (backend, model) key in this VM. Ids are per VM; the stats behind them are
/// process-wide, so every worker adds into the same counters.
struct KeyStats {
    requests: [Option<u32>; 5],
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
    input_tokens_estimated: Option<u32>,
    output_tokens_estimated: Option<u32>,
    waiting: Option<u32>,
    decoding: Option<u32>,
    ttft_ms: Option<u32>,
    tpot_ms: Option<u32>,
    duration_ms: Option<u32>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("flyball: cannot define stat {name}: {status:?}");
            None
        }
    }
}

fn add(id: Option<u32>, by: i64) {
    if let Some(id) = id
        && by != 0
        && let Err(status) = hostcalls::increment_metric(id, by)
    {
        log::debug!("flyball: stat {id} increment failed: {status:?}");
    }
}

fn record(id: Option<u32>, value: u64) {
    if let Some(id) = id
        && let Err(status) = hostcalls::record_metric(id, value)
    {
        log::debug!("flyball: stat {id} record failed: {status:?}");
    }
}

fn nanos_to_ms(nanos: u64) -> u64 {
    nanos / 1_000_000
}

// === impl KeyStats ===

impl KeyStats {
    fn define(backend: &str, model: &str) -> KeyStats {
        let key = format!(
            "{PREFIX}.backend.{}.model.{}",
            stat_label(backend),
            stat_label(model)
        );
        let requests = OUTCOMES.map(|(_, outcome)| {
            define(
                MetricType::Counter,
                &format!("{key}.outcome.{outcome}.requests_total"),
            )
        });
        let tokens = |kind: &str, suffix: &str| {
            define(
                MetricType::Counter,
                &format!("{key}.token_type.{kind}.{suffix}"),
            )
        };
        KeyStats {
            requests,
            input_tokens: tokens("input", "tokens_total"),
            output_tokens: tokens("output", "tokens_total"),
            input_tokens_estimated: tokens("input", "tokens_estimated_total"),
            output_tokens_estimated: tokens("output", "tokens_estimated_total"),
            waiting: define(
                MetricType::Gauge,
                &format!("{key}.phase.waiting.requests_in_flight"),
            ),
            decoding: define(
                MetricType::Gauge,
                &format!("{key}.phase.decoding.requests_in_flight"),
            ),
            ttft_ms: define(
                MetricType::Histogram,
                &format!("{key}.time_to_first_token_ms"),
            ),
            tpot_ms: define(
                MetricType::Histogram,
                &format!("{key}.time_per_output_token_ms"),
            ),
            duration_ms: define(MetricType::Histogram, &format!("{key}.request_duration_ms")),
        }
    }

    fn request_finished(&self, was_decoding: bool, record: &RequestRecord) {
        add(
            if was_decoding {
                self.decoding
            } else {
                self.waiting
            },
            -1,
        );
        if let Some(index) = OUTCOMES.iter().position(|(o, _)| *o == record.outcome) {
            add(self.requests.get(index).copied().flatten(), 1);
        }
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        add(self.input_tokens, signed(record.input_tokens));
        add(self.output_tokens, signed(record.output_tokens));
        if record.input_estimated {
            add(self.input_tokens_estimated, signed(record.input_tokens));
        }
        if record.output_estimated {
            add(self.output_tokens_estimated, signed(record.output_tokens));
        }
        if let Some(ttft) = record.ttft {
            record_ms(self.ttft_ms, ttft);
        }
        if let Some(tpot) = record.tpot {
            record_ms(self.tpot_ms, tpot);
        }
        record_ms(self.duration_ms, record.e2e);
    }
}

fn record_ms(id: Option<u32>, nanos: u64) {
    record(id, nanos_to_ms(nanos));
}

/// The stats of every key this worker has seen.
///
/// Creating an Envoy stat takes from 40 us to over 2 ms (symbol table, tag extraction), so a key's
/// stats are never created on a request's way in or a response's way out: a new key's gauge moves
/// are held in its slot and its stats are created at the next tick, or when its first request
/// ends, whichever comes first.
#[derive(Default)]
pub(crate) struct StatsTable {
    slots: Vec<Slot>,
    /// Indices of the `Held` slots, so defining them does not scan every key per request.
    held: Vec<usize>,
}

#[derive(Default)]
enum Slot {
    #[default]
    Unseen,
    Held {
        waiting: i64,
        decoding: i64,
    },
    Defined(KeyStats),
}

// === impl StatsTable ===

impl StatsTable {
    fn slot(&mut self, index: usize) -> Option<&mut Slot> {
        if self.slots.len() <= index {
            self.slots.resize_with(index + 1, Slot::default);
        }
        self.slots.get_mut(index)
    }

    fn move_gauges(&mut self, index: usize, waiting: i64, decoding: i64) {
        let newly_held = match self.slot(index) {
            Some(Slot::Defined(stats)) => {
                add(stats.waiting, waiting);
                add(stats.decoding, decoding);
                false
            }
            Some(slot @ Slot::Unseen) => {
                *slot = Slot::Held { waiting, decoding };
                true
            }
            Some(Slot::Held {
                waiting: held_waiting,
                decoding: held_decoding,
            }) => {
                *held_waiting += waiting;
                *held_decoding += decoding;
                false
            }
            None => false,
        };
        if newly_held {
            self.held.push(index);
        }
    }

    pub(crate) fn request_started(&mut self, index: usize) {
        self.move_gauges(index, 1, 0);
    }

    pub(crate) fn first_token(&mut self, index: usize) {
        self.move_gauges(index, -1, 1);
    }

    /// Creates the stats of every held key. `labels` names a key's (backend, model).
    pub(crate) fn define_held<'a>(&mut self, labels: impl Fn(usize) -> (&'a str, &'a str)) {
        for index in std::mem::take(&mut self.held) {
            if let Some(slot) = self.slots.get_mut(index)
                && let Slot::Held { waiting, decoding } = *slot
            {
                let (backend, model) = labels(index);
                let stats = KeyStats::define(backend, model);
                add(stats.waiting, waiting);
                add(stats.decoding, decoding);
                *slot = Slot::Defined(stats);
            }
        }
    }

    /// Accounts a finished request; call [`StatsTable::define_held`] first.
    pub(crate) fn request_finished(
        &mut self,
        index: usize,
        was_decoding: bool,
        record: &RequestRecord,
    ) {
        if let Some(Slot::Defined(stats)) = self.slot(index) {
            stats.request_finished(was_decoding, record);
        }
    }
}

/// Process-level figures about the filter itself.
pub(crate) struct FilterStats {
    pub reports_sent: Option<u32>,
    pub reports_failed: Option<u32>,
    pub reports_dropped: Option<u32>,
    pub requests_uninspected: Option<u32>,
    pub shared_data_conflicts: Option<u32>,
}

// === impl FilterStats ===

impl FilterStats {
    pub(crate) fn define() -> FilterStats {
        let counter = |name: &str| define(MetricType::Counter, &format!("{PREFIX}.{name}"));
        FilterStats {
            reports_sent: counter("reports_sent_total"),
            reports_failed: counter("reports_failed_total"),
            reports_dropped: counter("reports_dropped_total"),
            requests_uninspected: counter("requests_uninspected_total"),
            shared_data_conflicts: counter("shared_data_conflicts_total"),
        }
    }

    pub(crate) fn count(id: Option<u32>) {
        add(id, 1);
    }
}
