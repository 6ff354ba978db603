//! When tokens exist: either scripted by the request's timing knobs, or produced by the shared
//! engine model, stepped in real time by one driver task.
//!
//! handler -> Pacer::{scripted, engine} -> wait(gate) ... ; engine: submit -> driver steps -> token ticks

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::{Engine, EngineModel, SequenceId};
use crate::plan::Gate;

/// Gauges the metrics endpoint reads.
#[derive(Debug, Default)]
pub(crate) struct LoadGauges {
    pub engine_running: AtomicU64,
    pub engine_waiting: AtomicU64,
    /// Requests with scripted timing; they count as running but stay out of the engine's batch.
    pub scripted_running: AtomicU64,
}

/// Token timing for one request.
#[derive(Debug)]
pub(crate) enum Pacer {
    Scripted(Scripted),
    Engine(EngineSequence),
}

#[derive(Debug)]
pub(crate) struct Scripted {
    start: Instant,
    ttft: Duration,
    itl: Duration,
    total: u64,
    gauges: Arc<LoadGauges>,
}

#[derive(Debug)]
pub(crate) struct EngineSequence {
    id: SequenceId,
    ticks: mpsc::UnboundedReceiver<Tick>,
    commands: mpsc::UnboundedSender<Command>,
    generated: u64,
    finished: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tick {
    Token,
    Finished,
}

#[derive(Debug)]
enum Command {
    Submit {
        id: SequenceId,
        prompt_tokens: u64,
        output_tokens: u64,
        ticks: mpsc::UnboundedSender<Tick>,
    },
    Abort(SequenceId),
}

/// The handlers' side of the engine driver.
#[derive(Debug)]
pub(crate) struct EngineHandle {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
}

/// The engine driver, to be spawned once per server.
pub(crate) struct EngineDriver {
    engine: Engine,
    commands: mpsc::UnboundedReceiver<Command>,
    ticks: HashMap<SequenceId, mpsc::UnboundedSender<Tick>>,
    gauges: Arc<LoadGauges>,
}

// === impl Pacer ===

impl Pacer {
    /// Tokens at `start + ttft + i * itl` for i in 0..total.
    pub(crate) fn scripted(
        start: Instant,
        ttft: Duration,
        itl: Duration,
        total: u64,
        gauges: Arc<LoadGauges>,
    ) -> Self {
        gauges.scripted_running.fetch_add(1, Ordering::Relaxed);
        Pacer::Scripted(Scripted {
            start,
            ttft,
            itl,
            total,
            gauges,
        })
    }

    /// Waits until `gate` opens.
    pub(crate) async fn wait(&mut self, gate: Gate) {
        match self {
            Pacer::Scripted(s) => s.wait(gate).await,
            Pacer::Engine(e) => e.wait(gate).await,
        }
    }
}

// === impl Scripted ===

impl Scripted {
    /// When token `n` (1-based) exists; token 0 (nothing) at the start.
    fn token_deadline(&self, n: u64) -> Instant {
        if n == 0 {
            return self.start;
        }
        let gaps = u32::try_from(n - 1).unwrap_or(u32::MAX);
        let offset = self
            .ttft
            .saturating_add(self.itl.checked_mul(gaps).unwrap_or(Duration::MAX));
        self.start
            .checked_add(offset)
            .unwrap_or_else(|| self.start + Duration::from_secs(86_400 * 365))
    }

    async fn wait(&mut self, gate: Gate) {
        let deadline = match gate {
            Gate::Now => return,
            Gate::Tokens(n) => self.token_deadline(n.min(self.total).max(1)),
            Gate::Finished => self.token_deadline(self.total.max(1)),
        };
        // Skipping a sleep that is already due keeps back-to-back events in one poll, which
        // the fragmenter relies on to split across event boundaries.
        if deadline > Instant::now() {
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.gauges.scripted_running.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl EngineSequence ===

impl EngineSequence {
    async fn wait(&mut self, gate: Gate) {
        loop {
            let open = match gate {
                Gate::Now => true,
                Gate::Tokens(n) => self.generated >= n || self.finished,
                Gate::Finished => self.finished,
            };
            if open {
                return;
            }
            match self.ticks.recv().await {
                Some(Tick::Token) => self.generated += 1,
                Some(Tick::Finished) => self.finished = true,
                None => {
                    // Only when the driver is gone (server shutting down): end rather than hang.
                    tracing::debug!(sequence = self.id.0, "engine driver gone");
                    self.finished = true;
                }
            }
        }
    }
}

impl Drop for EngineSequence {
    fn drop(&mut self) {
        if !self.finished {
            // Frees the batch slot, as vLLM aborts a request whose client went away.
            let _ = self.commands.send(Command::Abort(self.id));
        }
    }
}

// === impl EngineHandle ===

impl EngineHandle {
    pub(crate) fn new(model: EngineModel, gauges: Arc<LoadGauges>) -> (Self, EngineDriver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                commands: tx,
                next_id: AtomicU64::new(1),
            },
            EngineDriver {
                engine: Engine::new(model),
                commands: rx,
                ticks: HashMap::new(),
                gauges,
            },
        )
    }

    /// Queues a sequence in the engine; its tokens arrive as the driver steps.
    pub(crate) fn submit(&self, prompt_tokens: u64, output_tokens: u64) -> Pacer {
        let id = SequenceId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.commands.send(Command::Submit {
            id,
            prompt_tokens,
            output_tokens,
            ticks: tx,
        });
        Pacer::Engine(EngineSequence {
            id,
            ticks: rx,
            commands: self.commands.clone(),
            generated: 0,
            finished: false,
        })
    }
}

// === impl EngineDriver ===

impl EngineDriver {
    /// Steps the engine in real time until every handle is gone.
    pub(crate) async fn run(mut self) {
        loop {
            // Arrivals during a step join at the next step boundary, as in vLLM's scheduler.
            while let Ok(command) = self.commands.try_recv() {
                self.apply(command);
            }
            self.publish_gauges();
            let Some(step) = self.engine.step() else {
                match self.commands.recv().await {
                    Some(command) => {
                        self.apply(command);
                        continue;
                    }
                    None => return,
                }
            };
            self.publish_gauges();
            tokio::time::sleep(step.duration).await;
            for id in step.emitted {
                self.tick(id, Tick::Token);
            }
            for id in step.finished {
                self.tick(id, Tick::Finished);
                self.ticks.remove(&id);
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Submit {
                id,
                prompt_tokens,
                output_tokens,
                ticks,
            } => {
                self.engine.submit(id, prompt_tokens, output_tokens);
                self.ticks.insert(id, ticks);
            }
            Command::Abort(id) => {
                self.engine.abort(id);
                self.ticks.remove(&id);
            }
        }
    }

    fn tick(&self, id: SequenceId, tick: Tick) {
        if let Some(tx) = self.ticks.get(&id) {
            let _ = tx.send(tick);
        }
    }

    fn publish_gauges(&self) {
        let running = self.engine.running_sequences() as u64;
        let waiting = self.engine.waiting_sequences() as u64;
        self.gauges.engine_running.store(running, Ordering::Relaxed);
        self.gauges.engine_waiting.store(waiting, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> EngineModel {
        EngineModel {
            prefill_tokens_per_s: 1_000.0,
            step_base: Duration::from_millis(10),
            step_per_sequence: Duration::from_millis(1),
            max_running_sequences: 1,
            max_tokens_per_step: 2048,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn engine_pacing_follows_the_model_in_virtual_time() {
        let gauges = Arc::new(LoadGauges::default());
        let (handle, driver) = EngineHandle::new(model(), gauges.clone());
        let driver = tokio::spawn(driver.run());
        let start = Instant::now();
        let mut first = handle.submit(100, 3);
        let mut second = handle.submit(100, 1);

        first.wait(Gate::Tokens(1)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(111));
        first.wait(Gate::Finished).await;
        assert_eq!(start.elapsed(), Duration::from_millis(111 + 2 * 11));
        // The second sequence waited for the only slot, then prefilled.
        second.wait(Gate::Tokens(1)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(133 + 111));
        second.wait(Gate::Finished).await;
        assert_eq!(start.elapsed(), Duration::from_millis(244));
        driver.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_sequence_gives_its_slot_to_the_next() {
        let gauges = Arc::new(LoadGauges::default());
        let (handle, driver) = EngineHandle::new(model(), gauges.clone());
        let driver = tokio::spawn(driver.run());
        let start = Instant::now();
        let mut hog = handle.submit(0, 1_000_000);
        let mut next = handle.submit(0, 1);
        hog.wait(Gate::Tokens(1)).await;
        assert_eq!(gauges.engine_waiting.load(Ordering::Relaxed), 1);
        drop(hog);
        next.wait(Gate::Finished).await;
        // hog's prefill step (11 ms), at most one more hog step (11 ms), then next's prefill.
        assert!(start.elapsed() <= Duration::from_millis(33));
        driver.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_pacing_puts_tokens_at_ttft_plus_gaps() {
        let gauges = Arc::new(LoadGauges::default());
        let start = Instant::now();
        let mut pacer = Pacer::scripted(
            start,
            Duration::from_millis(100),
            Duration::from_millis(10),
            5,
            gauges.clone(),
        );
        assert_eq!(gauges.scripted_running.load(Ordering::Relaxed), 1);
        pacer.wait(Gate::Now).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        pacer.wait(Gate::Tokens(1)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        pacer.wait(Gate::Tokens(3)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(120));
        pacer.wait(Gate::Finished).await;
        assert_eq!(start.elapsed(), Duration::from_millis(140));
        drop(pacer);
        assert_eq!(gauges.scripted_running.load(Ordering::Relaxed), 0);
    }
}
