//! A test receiver for the filter's reports: a real tonic `TelemetryService` on loopback that
//! records every report, and can be taken down and brought back on the same port.

use flyball_proto::grpc::telemetry_service_server::{TelemetryService, TelemetryServiceServer};
use flyball_proto::v1::{KeyTelemetry, ReportRequest, ReportResponse};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

#[derive(Clone, Default)]
struct Recorder {
    reports: Arc<Mutex<Vec<ReportRequest>>>,
}

#[tonic::async_trait]
impl TelemetryService for Recorder {
    async fn report(
        &self,
        request: tonic::Request<ReportRequest>,
    ) -> Result<tonic::Response<ReportResponse>, tonic::Status> {
        let report = request.into_inner();
        let sequence = report.sequence;
        if let Ok(mut reports) = self.reports.lock() {
            reports.push(report);
        }
        Ok(tonic::Response::new(ReportResponse {
            acknowledged_sequence: sequence,
        }))
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    recorder: Recorder,
    stop: Option<oneshot::Sender<()>>,
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
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), Recorder::default()).await
    }

    async fn start_on(addr: SocketAddr, recorder: Recorder) -> anyhow::Result<Receiver> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(128)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TelemetryServiceServer::new(recorder.clone());
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Receiver {
            addr,
            recorder,
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
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Brings the receiver back on the same port, keeping what it recorded.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let again = Self::start_on(self.addr, self.recorder.clone()).await?;
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

    pub fn totals(&self) -> ReceivedTotals {
        totals(&self.reports())
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
