//! `/metrics`: ingest counters, decision counters, and per-pool figures computed at scrape time.
//!
//! Counters are prometheus-client counters updated where things happen. Per-pool gauges are read
//! from the windows and the controller's status on each scrape (a [`Collector`]), so a quantile
//! without samples is absent rather than stuck at its last value.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::config::LiveConfig;
use crate::connection::ConnectionCounters;
use crate::controller::Status;
use crate::forward::ForwardCounters;
use crate::ingest::Telemetry;
use crate::replication::ReplicationCounters;
use crate::tls::TlsCounters;

/// The registry behind `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

#[derive(Debug)]
struct PoolCollector {
    config: Arc<LiveConfig>,
    telemetry: Arc<Telemetry>,
    status: Arc<Status>,
}

const QUANTILES: [(f64, &str); 3] = [(0.5, "0.5"), (0.95, "0.95"), (0.99, "0.99")];

// === impl Metrics ===

impl Metrics {
    pub fn new(
        config: Arc<LiveConfig>,
        telemetry: Arc<Telemetry>,
        status: Arc<Status>,
        forward: &ForwardCounters,
        replication: &ReplicationCounters,
        connections: &ConnectionCounters,
        tls: Option<&TlsCounters>,
    ) -> Self {
        let mut registry = Registry::default();
        let c = telemetry.counters();
        let counters = [
            (
                "flyball_ingest_reports",
                "Reports merged (duplicates excluded)",
                &c.reports,
            ),
            (
                "flyball_ingest_duplicates",
                "Reports acknowledged and ignored: a sequence already merged",
                &c.duplicates,
            ),
            (
                "flyball_ingest_gaps",
                "Sequence jumps: reports lost between a reporter and ingest",
                &c.gaps,
            ),
            (
                "flyball_ingest_missing_reports",
                "Sequence numbers skipped over all gaps (late ones included)",
                &c.missing_reports,
            ),
            (
                "flyball_ingest_late_reports",
                "Reports merged after a newer one of their reporter (a forwarded report overtaken); \
                 missing_reports counted them first unless that one was the first seen",
                &c.late_reports,
            ),
            (
                "flyball_ingest_restarts",
                "New processes of gateways already known",
                &c.restarts,
            ),
            (
                "flyball_ingest_revived",
                "Stale reporters that reported again",
                &c.revived,
            ),
            (
                "flyball_ingest_departed",
                "Reporters that went quiet after their report streams closed (Envoy exited): gone, not held for",
                &c.departed,
            ),
            (
                "flyball_ingest_forgotten",
                "Gateway processes forgotten after --forget-after of silence",
                &c.forgotten,
            ),
            (
                "flyball_ingest_reporter_dropped_reports",
                "Reports gateways say they gave up on",
                &c.reporter_dropped_reports,
            ),
            (
                "flyball_ingest_keys_over_limit",
                "Key entries dropped because the key limit was reached",
                &c.keys_over_limit,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "flyball_ingest_refused",
            "Reports refused, by reason",
            c.refused.clone(),
        );
        registry.register(
            "flyball_decisions",
            "Policy evaluations, by pool, action and the rule that settled them",
            status.decisions.clone(),
        );
        registry.register(
            "flyball_actuator_errors",
            "Failed reads or writes of replica counts, by pool and kind",
            status.actuator_errors.clone(),
        );
        registry.register(
            "flyball_forward_reports",
            "Reports this replica forwarded to the leader while following",
            forward.forwarded.clone(),
        );
        registry.register(
            "flyball_forward_dropped",
            "Reports a follower could not forward to the leader, by reason",
            forward.dropped.clone(),
        );
        registry.register(
            "flyball_replication_followers",
            "Followers following this replica's reports (while it leads)",
            replication.followers.clone(),
        );
        registry.register(
            "flyball_replication_lagged",
            "Reports a follower missed because it fell too far behind the leader",
            replication.lagged.clone(),
        );
        registry.register(
            "flyball_replication_followed",
            "Reports merged from the leader's stream while following (duplicates excluded)",
            replication.followed.clone(),
        );
        registry.register(
            "flyball_grpc_connections_closed",
            "gRPC connections closed, by how: ended (the peer or this side closed it), lost (the \
             kernel gave up on the peer: a node lost, a partition)",
            connections.closed.clone(),
        );
        if let Some(tls) = tls {
            registry.register(
                "flyball_grpc_tls_reloads",
                "Changes of the --grpc-tls-* files, by result (failed: the previous files stay in use)",
                tls.reloads.clone(),
            );
            registry.register(
                "flyball_grpc_tls_handshake_failures",
                "gRPC connections refused in the TLS handshake, by reason",
                tls.handshake_failures.clone(),
            );
            registry.register(
                "flyball_grpc_tls_certificate_expiration_timestamp_seconds",
                "When the --grpc-tls-* certificates in use expire (Unix seconds), by file: cert, or the soonest of ca",
                tls.expiry.clone(),
            );
        }
        registry.register_collector(Box::new(PoolCollector {
            config,
            telemetry,
            status,
        }));
        Metrics { registry }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

// === impl PoolCollector ===

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        let reporters = self.telemetry.reporters(now);
        {
            let mut metric = encoder.encode_descriptor(
                "flyball_reporters",
                "Gateway processes known to ingest, by state: live, or stale (quiet past --stale-after, until forgotten); processes gone with their connections closed are in neither",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in [("live", reporters.live), ("stale", reporters.stale)] {
                let labels = [("state", state)];
                ConstGauge::new(n as i64).encode(metric.encode_family(&labels)?)?;
            }
        }

        let config = self.config.current();
        let mut rows = Vec::new();
        for pool in config.pools() {
            let view = self.telemetry.pool(pool.id, now).unwrap_or_default();
            let status = self.status.get(pool.id).unwrap_or_default();
            rows.push((pool, view, status));
        }
        let labels = |pool: &crate::config::PoolDef| {
            [
                ("autoscaler", pool.autoscaler_name.clone()),
                ("namespace", pool.target.namespace.clone()),
                ("pool", pool.name.clone()),
                ("role", pool.role.as_str().to_owned()),
            ]
        };

        type Pick = fn(&crate::window::Latencies) -> &flyball_sketch::Sketch;
        let latencies: [(&str, &str, Pick); 4] = [
            (
                "flyball_pool_ttft_seconds",
                "Time to first token over the short window, by quantile",
                |l| &l.ttft_us,
            ),
            (
                "flyball_pool_tpot_seconds",
                "Time per output token over the short window, by quantile",
                |l| &l.tpot_us,
            ),
            (
                "flyball_pool_itl_seconds",
                "Inter-token latency (between streamed chunks) over the short window, by quantile",
                |l| &l.itl_us,
            ),
            (
                "flyball_pool_e2e_seconds",
                "End-to-end request latency over the short window, by quantile",
                |l| &l.e2e_us,
            ),
        ];
        for (name, help, pick) in latencies {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (pool, view, _) in &rows {
                let sketch = pick(&view.short.latency);
                for (q, label) in QUANTILES {
                    if let Some(us) = sketch.quantile(q) {
                        let [a, ns, p, r] = labels(pool);
                        let set = [a, ns, p, r, ("quantile", label.to_owned())];
                        ConstGauge::new(us / 1e6).encode(metric.encode_family(&set)?)?;
                    }
                }
            }
        }

        {
            let mut metric = encoder.encode_descriptor(
                "flyball_pool_silent_reporters",
                "Gateway processes that fed the pool within the stable window and have gone quiet: \
                 while above zero the pool does not scale down (silent_reporter_hold)",
                None,
                MetricType::Gauge,
            )?;
            for (pool, _, _) in &rows {
                let set = labels(pool);
                let n = i64::from(self.telemetry.silent_feeders(pool.id));
                ConstGauge::new(n).encode(metric.encode_family(&set)?)?;
            }
        }

        type Rate = fn(&crate::window::WindowSummary) -> f64;
        let rates: [(&str, &str, Rate); 4] = [
            (
                "flyball_pool_requests_per_second",
                "Completed requests per second over the short window",
                |s| s.requests_per_s(),
            ),
            (
                "flyball_pool_errors_per_second",
                "Failed requests per second over the short window",
                |s| s.errors_per_s(),
            ),
            (
                "flyball_pool_input_tokens_per_second",
                "Input tokens per second over the short window",
                |s| s.input_tokens_per_s(),
            ),
            (
                "flyball_pool_output_tokens_per_second",
                "Output tokens per second over the short window",
                |s| s.output_tokens_per_s(),
            ),
        ];
        for (name, help, rate) in rates {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (pool, view, _) in &rows {
                let set = labels(pool);
                ConstGauge::new(rate(&view.short)).encode(metric.encode_family(&set)?)?;
            }
        }

        {
            let mut metric = encoder.encode_descriptor(
                "flyball_pool_in_flight",
                "Requests in flight at live gateways, by state",
                None,
                MetricType::Gauge,
            )?;
            for (pool, view, _) in &rows {
                for (state, n) in [
                    ("waiting_first_token", view.in_flight.waiting_first_token),
                    ("decoding", view.in_flight.decoding),
                ] {
                    let [a, ns, p, r] = labels(pool);
                    let set = [a, ns, p, r, ("state", state.to_owned())];
                    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                        .encode(metric.encode_family(&set)?)?;
                }
            }
        }

        {
            let mut metric = encoder.encode_descriptor(
                "flyball_pool_replicas",
                "Replicas of the pool's scale target (current, ready) and the last decision's \
                 count (desired)",
                None,
                MetricType::Gauge,
            )?;
            for (pool, _, status) in &rows {
                let values = [
                    ("current", status.replicas.map(|r| r.current)),
                    ("ready", status.replicas.map(|r| r.ready)),
                    ("desired", status.desired),
                ];
                for (state, n) in values {
                    if let Some(n) = n {
                        let [a, ns, p, r] = labels(pool);
                        let set = [a, ns, p, r, ("state", state.to_owned())];
                        ConstGauge::new(i64::from(n)).encode(metric.encode_family(&set)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}
