//! A test receiver for the filter's reports: a real tonic `TelemetryService` on loopback that
//! records every report, and can be taken down and brought back on the same port.

use flyball_proto::codec::ReceivedReport;
use flyball_proto::grpc::telemetry_service_server::{TelemetryService, TelemetryServiceServer};
use flyball_proto::v1::{KeyTelemetry, ReportRequest, ReportResponse};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone, Default)]
struct Recorder {
    reports: Arc<Mutex<Vec<ReportRequest>>>,
    /// How many reports came on a `ReportStream`, and how many streams were opened.
    streamed: Arc<AtomicU64>,
    streams: Arc<AtomicU64>,
    /// The first report naming this model is refused `INVALID_ARGUMENT`, as the control service
    /// refuses an invalid report, and kept in `refused`; later ones are taken (a report can carry
    /// the key again for its in-flight gauge alone, or for requests that finished later).
    refuse_model: Option<String>,
    refused: Arc<Mutex<Vec<ReportRequest>>>,
    /// How long each acknowledgement on a stream waits after its report is recorded: a control
    /// service slower than the filter's `reportTimeoutMs`.
    ack_delay: Duration,
}

impl Recorder {
    fn record(&self, report: ReportRequest) -> Result<ReportResponse, tonic::Status> {
        let sequence = report.sequence;
        let refuse = self
            .refuse_model
            .as_ref()
            .is_some_and(|model| report.keys.iter().any(|k| &k.model == model))
            && self.refused.lock().is_ok_and(|r| r.is_empty());
        let kept = if refuse { &self.refused } else { &self.reports };
        if let Ok(mut reports) = kept.lock() {
            reports.push(report);
        }
        if refuse {
            return Err(tonic::Status::invalid_argument(format!(
                "report {sequence}: refused by the test"
            )));
        }
        Ok(ReportResponse {
            acknowledged_sequence: sequence,
        })
    }
}

/// One run of the server: the recorder, and whether streams are answered at all.
#[derive(Clone)]
struct RecorderService {
    recorder: Recorder,
    /// An older control service: no `ReportStream`.
    unary_only: bool,
    /// Turns true when the receiver stops: open streams end, as the control service's do.
    stopping: watch::Receiver<bool>,
}

type AckStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<ReportResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl TelemetryService for RecorderService {
    async fn report(
        &self,
        request: tonic::Request<ReceivedReport>,
    ) -> Result<tonic::Response<ReportResponse>, tonic::Status> {
        self.recorder
            .record(decoded(request.into_inner())?)
            .map(tonic::Response::new)
    }

    type ReportStreamStream = AckStream;

    async fn report_stream(
        &self,
        request: tonic::Request<tonic::Streaming<ReceivedReport>>,
    ) -> Result<tonic::Response<AckStream>, tonic::Status> {
        if self.unary_only {
            return Err(tonic::Status::unimplemented("no ReportStream here"));
        }
        self.recorder.streams.fetch_add(1, Ordering::Relaxed);
        let state = (request.into_inner(), Some(self.clone()));
        let acks = futures::stream::unfold(state, |(mut reports, service)| async move {
            let mut service = service?;
            let received = tokio::select! {
                received = reports.message() => received,
                _ = service.stopping.wait_for(|stop| *stop) => {
                    Err(tonic::Status::unavailable("receiver stopping"))
                }
            };
            match received {
                Ok(Some(report)) => {
                    service.recorder.streamed.fetch_add(1, Ordering::Relaxed);
                    // A refusal ends the stream, as the control service's does.
                    match decoded(report).and_then(|report| service.recorder.record(report)) {
                        Ok(ack) => {
                            tokio::time::sleep(service.recorder.ack_delay).await;
                            Some((Ok(ack), (reports, Some(service))))
                        }
                        Err(status) => Some((Err(status), (reports, None))),
                    }
                }
                Ok(None) => None,
                Err(status) => Some((Err(status), (reports, None))),
            }
        });
        Ok(tonic::Response::new(Box::pin(acks)))
    }
}

/// A report as prost decodes it, every field at hand for the tests.
fn decoded(received: ReceivedReport) -> Result<ReportRequest, tonic::Status> {
    prost::Message::decode(received.encoded.0)
        .map_err(|error| tonic::Status::internal(error.to_string()))
}

pub struct Receiver {
    pub addr: SocketAddr,
    recorder: Recorder,
    unary_only: bool,
    stop: Option<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Everything the receiver got, with resends (same reporter and sequence) counted once.
#[derive(Debug, Default, Clone)]
pub struct ReceivedTotals {
    pub reports: usize,
    pub duplicates: usize,
    /// Sequence numbers missing between the first and last report of a reporter.
    pub gaps: u64,
    /// Deltas per (backend, model), summed.
    pub keys: BTreeMap<(String, String), KeyTelemetry>,
    /// The last report's in-flight figures per key (absolute, not summed).
    pub last_in_flight: BTreeMap<(String, String), (u64, u64)>,
}

// === impl Receiver ===

impl Receiver {
    pub async fn start() -> anyhow::Result<Receiver> {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(any_port, Recorder::default(), false).await
    }

    /// A receiver that refuses (`INVALID_ARGUMENT`) the first report naming `model`.
    pub async fn start_refusing(model: &str) -> anyhow::Result<Receiver> {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let recorder = Recorder {
            refuse_model: Some(model.to_owned()),
            ..Recorder::default()
        };
        Self::start_on(any_port, recorder, false).await
    }

    /// A receiver that records each streamed report at once and acknowledges it `ack_delay`
    /// later.
    pub async fn start_slow(ack_delay: Duration) -> anyhow::Result<Receiver> {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let recorder = Recorder {
            ack_delay,
            ..Recorder::default()
        };
        Self::start_on(any_port, recorder, false).await
    }

    /// A receiver like an older control service, without `ReportStream` (UNIMPLEMENTED).
    pub async fn start_unary_only() -> anyhow::Result<Receiver> {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(any_port, Recorder::default(), true).await
    }

    async fn start_on(
        addr: SocketAddr,
        recorder: Recorder,
        unary_only: bool,
    ) -> anyhow::Result<Receiver> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(128)?;
        let addr = listener.local_addr()?;
        let (stop, stopping) = watch::channel(false);
        let service = TelemetryServiceServer::new(RecorderService {
            recorder: recorder.clone(),
            unary_only,
            stopping: stopping.clone(),
        });
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let mut stopping = stopping;
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                })
                .await;
        });
        Ok(Receiver {
            addr,
            recorder,
            unary_only,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Takes the receiver down (connections refused) until [`Receiver::restart`].
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Brings the receiver back on the same port, keeping what it recorded.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let again = Self::start_on(self.addr, self.recorder.clone(), self.unary_only).await?;
        *self = again;
        Ok(())
    }

    pub fn reports(&self) -> Vec<ReportRequest> {
        self.recorder
            .reports
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Reports refused (see [`Receiver::start_refusing`]), each time one came.
    pub fn refused(&self) -> Vec<ReportRequest> {
        self.recorder
            .refused
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub fn totals(&self) -> ReceivedTotals {
        totals(&self.reports())
    }

    /// Reports that came as messages on a `ReportStream` (the rest were unary calls).
    pub fn streamed_reports(&self) -> u64 {
        self.recorder.streamed.load(Ordering::Relaxed)
    }

    /// `ReportStream`s opened.
    pub fn streams_opened(&self) -> u64 {
        self.recorder.streams.load(Ordering::Relaxed)
    }
}

/// Sums reports, counting each (reporter, sequence) once.
pub fn totals(reports: &[ReportRequest]) -> ReceivedTotals {
    let mut out = ReceivedTotals::default();
    let mut seen: BTreeMap<(String, u64), std::collections::BTreeSet<u64>> = BTreeMap::new();
    let mut latest: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for report in reports {
        let reporter = report.reporter.clone().unwrap_or_default();
        let id = (reporter.gateway.clone(), reporter.process_start_unix_ms);
        if !seen.entry(id.clone()).or_default().insert(report.sequence) {
            out.duplicates += 1;
            continue;
        }
        out.reports += 1;
        for key in &report.keys {
            let name = (key.backend.clone(), key.model.clone());
            let sum = out.keys.entry(name).or_default();
            sum.backend.clone_from(&key.backend);
            sum.model.clone_from(&key.model);
            sum.add_figures(key);
        }
        let newest = latest.entry(id).or_default();
        if report.sequence >= *newest {
            *newest = report.sequence;
            out.last_in_flight = report
                .keys
                .iter()
                .map(|k| {
                    let f = k.in_flight.unwrap_or_default();
                    (
                        (k.backend.clone(), k.model.clone()),
                        (f.waiting_first_token, f.decoding),
                    )
                })
                .collect();
        }
    }
    for sequences in seen.values() {
        if let (Some(first), Some(last)) = (sequences.first(), sequences.last()) {
            out.gaps += (last - first + 1) - sequences.len() as u64;
        }
    }
    out
}
