//! When tokens exist: either scripted by the request's timing knobs, or produced by the shared
//! engine model, stepped in real time by one driver task. Both count what they produce in
//! [`EngineStats`] as it comes to exist, whoever reads it and whenever.
//!
//! handler -> Pacer::{scripted, engine} -> wait(gate) ... ; engine: submit -> driver steps -> token ticks

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::engine::{Engine, EngineModel, SequenceId};
use crate::metrics::EngineStats;
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

/// A scripted request's timing: its tokens at `start + ttft + i * itl` for i in 0..output_tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub start: Instant,
    pub ttft: Duration,
    pub itl: Duration,
    /// Counted as prefilled when the first token is due (or would be, with no output).
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug)]
pub(crate) struct Scripted {
    gauges: Arc<LoadGauges>,
    ledger: Arc<ScriptedLedger>,
    /// Counts the schedule's tokens as their times pass; stopped when the request ends.
    counting: JoinHandle<()>,
}

/// What of a scripted request's schedule has been counted in the stats, so that the counting
/// task and the request's end (whichever comes first) count each token once.
#[derive(Debug)]
struct ScriptedLedger {
    schedule: Schedule,
    counted: Mutex<Counted>,
    stats: Arc<EngineStats>,
}

#[derive(Debug, Default)]
struct Counted {
    prefill: bool,
    tokens: u64,
    finished: bool,
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
        arrival: Instant,
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
    /// Sequences someone still waits for; an aborted one is forgotten at once.
    sequences: HashMap<SequenceId, Tracked>,
    gauges: Arc<LoadGauges>,
    stats: Arc<EngineStats>,
}

/// The driver's side of one sequence.
struct Tracked {
    ticks: mpsc::UnboundedSender<Tick>,
    /// When the handler got the request: latencies count from here, as vLLM's from arrival.
    arrival: Instant,
    first_token_seen: bool,
}

// === impl Pacer ===

impl Pacer {
    /// Tokens as `schedule` says, counted in `stats` as their times pass.
    pub(crate) fn scripted(
        schedule: Schedule,
        gauges: Arc<LoadGauges>,
        stats: Arc<EngineStats>,
    ) -> Self {
        gauges.scripted_running.fetch_add(1, Ordering::Relaxed);
        let ledger = Arc::new(ScriptedLedger {
            schedule,
            counted: Mutex::new(Counted::default()),
            stats,
        });
        let counting = tokio::spawn(ledger.clone().count_as_scheduled());
        Pacer::Scripted(Scripted {
            gauges,
            ledger,
            counting,
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

// === impl Schedule ===

impl Schedule {
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

    /// When the prompt counts as prefilled: when the first token is due, also with no output.
    fn prefill_deadline(&self) -> Instant {
        self.token_deadline(1)
    }

    /// When the request is finished: its last token, or its prefill when it has none.
    fn end(&self) -> Instant {
        self.token_deadline(self.output_tokens.max(1))
    }

    /// Tokens that exist at `now`: the last `n` whose deadline has passed (deadlines only grow,
    /// so a binary search; a long answer at `itl = 0` is settled at once).
    fn tokens_by(&self, now: Instant) -> u64 {
        let (mut low, mut high) = (0, self.output_tokens);
        while low < high {
            let mid = low + (high - low).div_ceil(2);
            if self.token_deadline(mid) <= now {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        low
    }
}

// === impl ScriptedLedger ===

impl ScriptedLedger {
    /// Counts whatever of the schedule exists at `now` and was not counted yet.
    fn settle(&self, now: Instant) {
        let mut counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        if !counted.prefill && self.schedule.prefill_deadline() <= now {
            counted.prefill = true;
            self.stats.prefill_completed(self.schedule.prompt_tokens);
        }
        let tokens = self.schedule.tokens_by(now);
        if tokens > counted.tokens {
            if counted.tokens == 0 {
                self.stats.first_token(self.schedule.ttft);
            }
            self.stats.tokens_generated(tokens - counted.tokens);
            counted.tokens = tokens;
        }
        let end = self.schedule.end();
        if !counted.finished && end <= now {
            counted.finished = true;
            self.stats
                .request_finished(end.saturating_duration_since(self.schedule.start));
        }
    }

    /// The next time something of the schedule comes to exist, if anything is left.
    fn next_due(&self) -> Option<Instant> {
        let counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        if !counted.prefill {
            Some(self.schedule.prefill_deadline())
        } else if counted.tokens < self.schedule.output_tokens {
            Some(self.schedule.token_deadline(counted.tokens + 1))
        } else if !counted.finished {
            Some(self.schedule.end())
        } else {
            None
        }
    }

    async fn count_as_scheduled(self: Arc<Self>) {
        while let Some(due) = self.next_due() {
            tokio::time::sleep_until(due).await;
            self.settle(Instant::now());
        }
    }
}

// === impl Scripted ===

impl Scripted {
    async fn wait(&mut self, gate: Gate) {
        let schedule = &self.ledger.schedule;
        let deadline = match gate {
            Gate::Now => return,
            Gate::Tokens(n) => schedule.token_deadline(n.min(schedule.output_tokens).max(1)),
            Gate::Finished => schedule.end(),
        };
        // Skipping a sleep that is already due keeps back-to-back events in one poll, which
        // the fragmenter relies on to split across event boundaries.
        if deadline > Instant::now() {
            tokio::time::sleep_until(deadline).await;
        }
        // Counted before the gate's bytes go out, so a client that scrapes /metrics after
        // reading them finds them, whichever of this and the counting task wakes first.
        self.ledger.settle(deadline);
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.gauges.scripted_running.fetch_sub(1, Ordering::Relaxed);
        // The request is over, answered or abandoned: what its schedule produced by now counts
        // (as vLLM counts an aborted request's tokens), nothing after.
        self.counting.abort();
        self.ledger.settle(Instant::now());
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
    pub(crate) fn new(
        model: EngineModel,
        gauges: Arc<LoadGauges>,
        stats: Arc<EngineStats>,
    ) -> (Self, EngineDriver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                commands: tx,
                next_id: AtomicU64::new(1),
            },
            EngineDriver {
                engine: Engine::new(model),
                commands: rx,
                sequences: HashMap::new(),
                gauges,
                stats,
            },
        )
    }

    /// Queues a sequence in the engine for a request that arrived at `arrival`; its tokens come
    /// as the driver steps.
    pub(crate) fn submit(&self, arrival: Instant, prompt_tokens: u64, output_tokens: u64) -> Pacer {
        let id = SequenceId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.commands.send(Command::Submit {
            id,
            arrival,
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
            // The step's work exists now, at its end: counted whether or not anyone still
            // waits for it.
            for (_, prompt_tokens) in &step.prefilled {
                self.stats.prefill_completed(*prompt_tokens);
            }
            self.stats.tokens_generated(step.emitted.len() as u64);
            let now = Instant::now();
            for id in step.emitted {
                if let Some(seq) = self.sequences.get_mut(&id) {
                    if !seq.first_token_seen {
                        seq.first_token_seen = true;
                        self.stats
                            .first_token(now.saturating_duration_since(seq.arrival));
                    }
                    let _ = seq.ticks.send(Tick::Token);
                }
            }
            for id in step.finished {
                if let Some(seq) = self.sequences.remove(&id) {
                    self.stats
                        .request_finished(now.saturating_duration_since(seq.arrival));
                    let _ = seq.ticks.send(Tick::Finished);
                }
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Submit {
                id,
                arrival,
                prompt_tokens,
                output_tokens,
                ticks,
            } => {
                self.engine.submit(id, prompt_tokens, output_tokens);
                let tracked = Tracked {
                    ticks,
                    arrival,
                    first_token_seen: false,
                };
                self.sequences.insert(id, tracked);
            }
            Command::Abort(id) => {
                self.engine.abort(id);
                self.sequences.remove(&id);
            }
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
        let (handle, driver) = EngineHandle::new(model(), gauges.clone(), Arc::default());
        let driver = tokio::spawn(driver.run());
        let start = Instant::now();
        let mut first = handle.submit(Instant::now(), 100, 3);
        let mut second = handle.submit(Instant::now(), 100, 1);

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
        let (handle, driver) = EngineHandle::new(model(), gauges.clone(), Arc::default());
        let driver = tokio::spawn(driver.run());
        let start = Instant::now();
        let mut hog = handle.submit(Instant::now(), 0, 1_000_000);
        let mut next = handle.submit(Instant::now(), 0, 1);
        hog.wait(Gate::Tokens(1)).await;
        assert_eq!(gauges.engine_waiting.load(Ordering::Relaxed), 1);
        drop(hog);
        next.wait(Gate::Finished).await;
        // hog's prefill step (11 ms), at most one more hog step (11 ms), then next's prefill.
        assert!(start.elapsed() <= Duration::from_millis(33));
        driver.abort();
    }

    fn schedule(start: Instant, prompt_tokens: u64, output_tokens: u64) -> Schedule {
        Schedule {
            start,
            ttft: Duration::from_millis(100),
            itl: Duration::from_millis(10),
            prompt_tokens,
            output_tokens,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_pacing_puts_tokens_at_ttft_plus_gaps() {
        let gauges = Arc::new(LoadGauges::default());
        let start = Instant::now();
        let mut pacer = Pacer::scripted(schedule(start, 7, 5), gauges.clone(), Arc::default());
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

    #[tokio::test(start_paused = true)]
    async fn the_engine_counts_a_prompt_when_its_prefill_completes_and_tokens_as_it_steps() {
        let stats = Arc::new(EngineStats::default());
        let (handle, driver) = EngineHandle::new(model(), Arc::default(), stats.clone());
        let driver = tokio::spawn(driver.run());
        let start = Instant::now();
        let mut first = handle.submit(Instant::now(), 100, 3);
        let mut queued = handle.submit(Instant::now(), 50, 1);
        // Prefill step of the first (111 ms) and one decode step: 2 tokens, one prompt.
        tokio::time::sleep_until(start + Duration::from_millis(111 + 11 + 1)).await;
        assert_eq!(stats.counts(), (100, 2));
        first.wait(Gate::Finished).await;
        queued.wait(Gate::Finished).await;
        assert_eq!(stats.counts(), (150, 4));
        driver.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_tokens_count_as_their_times_pass_and_stop_when_the_client_leaves() {
        let stats = Arc::new(EngineStats::default());
        let start = Instant::now();
        let pacer = Pacer::scripted(schedule(start, 7, 5), Arc::default(), stats.clone());
        tokio::time::sleep_until(start + Duration::from_millis(99)).await;
        assert_eq!(stats.counts(), (0, 0));
        // Nobody waits on the pacer (a non-streaming body waits for the end), yet tokens count.
        tokio::time::sleep_until(start + Duration::from_millis(115)).await;
        assert_eq!(stats.counts(), (7, 2));
        // The client leaves before the third token: two existed, two stay counted; its first
        // token was timed, its end never comes.
        drop(pacer);
        tokio::time::sleep_until(start + Duration::from_millis(1_000)).await;
        assert_eq!(stats.counts(), (7, 2));
        assert_eq!(stats.latency_counts(), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_scripted_request_that_ends_counts_its_whole_schedule_once() {
        let stats = Arc::new(EngineStats::default());
        let start = Instant::now();
        let mut pacer = Pacer::scripted(schedule(start, 7, 5), Arc::default(), stats.clone());
        pacer.wait(Gate::Finished).await;
        drop(pacer);
        tokio::time::sleep_until(start + Duration::from_millis(1_000)).await;
        assert_eq!(stats.counts(), (7, 5));
        assert_eq!(stats.latency_counts(), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_engine_times_first_tokens_and_finished_requests_but_no_end_for_an_aborted_one() {
        let stats = Arc::new(EngineStats::default());
        let (handle, driver) = EngineHandle::new(model(), Arc::default(), stats.clone());
        let driver = tokio::spawn(driver.run());
        let mut done = handle.submit(Instant::now(), 10, 2);
        done.wait(Gate::Finished).await;
        assert_eq!(stats.latency_counts(), (1, 1));
        let mut left = handle.submit(Instant::now(), 10, 1_000);
        left.wait(Gate::Tokens(1)).await;
        drop(left);
        let mut never_started = handle.submit(Instant::now(), 10, 1_000);
        never_started.wait(Gate::Now).await;
        drop(never_started);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(stats.latency_counts(), (2, 1));
        driver.abort();
    }
}
