//! A pure model of a continuously batching engine (vLLM's scheduler, reduced to its timing).
//!
//! The engine runs in steps. At the start of a step it admits waiting sequences (FIFO) while
//! fewer than `max_running_sequences` run; the step then prefills every newly admitted prompt and
//! decodes one token for every running sequence, and lasts
//!
//! ```text
//! step_base + step_per_sequence * batch_sequences + prefill_tokens / prefill_tokens_per_s
//! ```
//!
//! A prefill step also yields the sequence's first token, as vLLM's does. So a request that finds
//! the engine idle sees `TTFT = step_base + step_per_sequence + prompt_tokens / prefill_tokens_per_s`,
//! a queued one adds the steps it waited, and everyone's inter-token gap grows with the batch.
//!
//! No clock, no I/O: [`Engine::step`] returns how long the step takes and who got a token, and the
//! caller (the server's driver task, or a test) decides what time means. KV-cache capacity and
//! preemption belong here when they arrive.

use std::collections::VecDeque;
use std::time::Duration;

use crate::SimError;

/// Timing parameters of the simulated engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineModel {
    /// Prompt tokens prefilled per second; a step that admits sequences pays for their prompts.
    pub prefill_tokens_per_s: f64,
    /// Fixed cost of one step (scheduling, kernel launches, sampling), whatever the batch size.
    pub step_base: Duration,
    /// Extra cost of each sequence in the batch (its attention over the KV cache).
    pub step_per_sequence: Duration,
    /// Most sequences running at once (vLLM's `--max-num-seqs`); later arrivals wait in FIFO order.
    pub max_running_sequences: usize,
}

/// Names a sequence inside the engine; the caller picks the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

/// What one engine step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// How long the step takes; its tokens exist at its end.
    pub duration: Duration,
    /// Sequences in the batch (decoding, plus those prefilled in this step).
    pub batch_sequences: usize,
    /// Prompt tokens prefilled in this step.
    pub prefill_tokens: u64,
    /// Sequences that produced one token at the end of this step.
    pub emitted: Vec<SequenceId>,
    /// Sequences done at the end of this step: their last token (if any) is in `emitted`.
    pub finished: Vec<SequenceId>,
}

/// The scheduler state: who waits and who runs.
#[derive(Debug, Clone)]
pub struct Engine {
    model: EngineModel,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

#[derive(Debug, Clone)]
struct Sequence {
    id: SequenceId,
    prompt_tokens: u64,
    output_tokens: u64,
    generated_tokens: u64,
    prefilled: bool,
}

// === impl EngineModel ===

impl Default for EngineModel {
    /// Roughly a Llama-3-8B on one A100: ~10k prefill tokens/s, ~10 ms decode steps at batch 1,
    /// ~23 ms at 64. Fast enough for tests that leave timing to the engine.
    fn default() -> Self {
        Self {
            prefill_tokens_per_s: 10_000.0,
            step_base: Duration::from_millis(10),
            step_per_sequence: Duration::from_micros(200),
            max_running_sequences: 64,
        }
    }
}

impl EngineModel {
    /// Checks the invariants the timing formulas rely on.
    pub fn validate(&self) -> Result<(), SimError> {
        if !(self.prefill_tokens_per_s.is_finite() && self.prefill_tokens_per_s > 0.0) {
            return Err(SimError::InvalidConfig {
                field: "engine.prefill_tokens_per_s",
                value: self.prefill_tokens_per_s.to_string(),
                rule: "must be a finite number > 0",
            });
        }
        if self.max_running_sequences == 0 {
            return Err(SimError::InvalidConfig {
                field: "engine.max_running_sequences",
                value: "0".to_owned(),
                rule: "must be >= 1",
            });
        }
        Ok(())
    }

    /// Time to prefill `prompt_tokens`, saturating rather than overflowing on absurd inputs.
    pub fn prefill_time(&self, prompt_tokens: u64) -> Duration {
        Duration::try_from_secs_f64(prompt_tokens as f64 / self.prefill_tokens_per_s)
            .unwrap_or(Duration::MAX)
    }

    /// Duration of one step over `batch_sequences` sequences that also prefills `prefill_tokens`.
    pub fn step_time(&self, batch_sequences: usize, prefill_tokens: u64) -> Duration {
        let batch = u32::try_from(batch_sequences).unwrap_or(u32::MAX);
        self.step_base
            .saturating_add(
                self.step_per_sequence
                    .checked_mul(batch)
                    .unwrap_or(Duration::MAX),
            )
            .saturating_add(self.prefill_time(prefill_tokens))
    }

    /// Duration of a pure decode step over `batch_sequences` sequences: the inter-token gap.
    pub fn decode_step_time(&self, batch_sequences: usize) -> Duration {
        self.step_time(batch_sequences, 0)
    }

    /// TTFT of a request that finds the engine idle: one step that prefills its prompt alone.
    pub fn unloaded_ttft(&self, prompt_tokens: u64) -> Duration {
        self.step_time(1, prompt_tokens)
    }
}

// === impl Engine ===

impl Engine {
    pub fn new(model: EngineModel) -> Self {
        Self {
            model,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn model(&self) -> &EngineModel {
        &self.model
    }

    /// Queues a sequence; it joins the batch at the start of a step with a free slot.
    pub fn submit(&mut self, id: SequenceId, prompt_tokens: u64, output_tokens: u64) {
        self.waiting.push_back(Sequence {
            id,
            prompt_tokens,
            output_tokens,
            generated_tokens: 0,
            prefilled: false,
        });
    }

    /// Removes a sequence wherever it is (the client went away). Returns whether it was known.
    pub fn abort(&mut self, id: SequenceId) -> bool {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|s| s.id != id);
        self.running.retain(|s| s.id != id);
        before != self.waiting.len() + self.running.len()
    }

    pub fn running_sequences(&self) -> usize {
        self.running.len()
    }

    pub fn waiting_sequences(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Runs one step. `None` when there is nothing to run.
    pub fn step(&mut self) -> Option<Step> {
        while self.running.len() < self.model.max_running_sequences {
            match self.waiting.pop_front() {
                Some(seq) => self.running.push(seq),
                None => break,
            }
        }
        if self.running.is_empty() {
            return None;
        }

        let prefill_tokens = self
            .running
            .iter()
            .filter(|s| !s.prefilled)
            .map(|s| s.prompt_tokens)
            .fold(0u64, u64::saturating_add);
        let batch_sequences = self.running.len();
        let duration = self.model.step_time(batch_sequences, prefill_tokens);

        let mut emitted = Vec::new();
        let mut finished = Vec::new();
        for seq in &mut self.running {
            seq.prefilled = true;
            if seq.generated_tokens < seq.output_tokens {
                seq.generated_tokens += 1;
                emitted.push(seq.id);
            }
            if seq.generated_tokens >= seq.output_tokens {
                finished.push(seq.id);
            }
        }
        self.running
            .retain(|s| s.generated_tokens < s.output_tokens);

        Some(Step {
            duration,
            batch_sequences,
            prefill_tokens,
            emitted,
            finished,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn model(max_running_sequences: usize) -> EngineModel {
        EngineModel {
            prefill_tokens_per_s: 1_000.0,
            step_base: Duration::from_millis(10),
            step_per_sequence: Duration::from_millis(1),
            max_running_sequences,
        }
    }

    /// Runs the engine dry on a virtual clock; returns each sequence's token times.
    fn run_until_idle(engine: &mut Engine) -> HashMap<SequenceId, Vec<Duration>> {
        let mut now = Duration::ZERO;
        let mut tokens: HashMap<SequenceId, Vec<Duration>> = HashMap::new();
        while let Some(step) = engine.step() {
            now += step.duration;
            for id in step.emitted {
                tokens.entry(id).or_default().push(now);
            }
        }
        tokens
    }

    fn ttft_alone(prompt_tokens: u64) -> Duration {
        let mut engine = Engine::new(model(8));
        engine.submit(SequenceId(1), prompt_tokens, 4);
        run_until_idle(&mut engine)[&SequenceId(1)][0]
    }

    #[test]
    fn ttft_grows_with_prompt_length() {
        let short = ttft_alone(100);
        let long = ttft_alone(1_000);
        assert_eq!(short, Duration::from_millis(10 + 1 + 100));
        assert_eq!(long, Duration::from_millis(10 + 1 + 1_000));
    }

    #[test]
    fn unloaded_ttft_matches_a_lone_prefill_step() {
        assert_eq!(model(8).unloaded_ttft(100), ttft_alone(100));
    }

    #[test]
    fn ttft_grows_with_the_queue_ahead() {
        let mut engine = Engine::new(model(1));
        engine.submit(SequenceId(1), 100, 5);
        engine.submit(SequenceId(2), 100, 5);
        engine.submit(SequenceId(3), 100, 5);
        let tokens = run_until_idle(&mut engine);
        let first = tokens[&SequenceId(1)][0];
        let second = tokens[&SequenceId(2)][0];
        let third = tokens[&SequenceId(3)][0];
        // Sequence 2 waits for all of sequence 1 (prefill + 4 decode steps), then prefills.
        assert_eq!(first, Duration::from_millis(111));
        assert_eq!(second, first + Duration::from_millis(4 * 11) + first);
        assert!(third > second);
    }

    #[test]
    fn step_time_grows_with_batch_size() {
        let m = model(64);
        assert!(m.decode_step_time(8) > m.decode_step_time(1));
        assert_eq!(
            m.decode_step_time(8) - m.decode_step_time(1),
            Duration::from_millis(7)
        );
    }

    #[test]
    fn inter_token_gap_grows_when_more_sequences_share_the_batch() {
        let gap = |concurrent: u64| {
            let mut engine = Engine::new(model(64));
            for id in 0..concurrent {
                engine.submit(SequenceId(id), 10, 6);
            }
            let times = &run_until_idle(&mut engine)[&SequenceId(0)];
            times[2] - times[1]
        };
        assert_eq!(gap(1), Duration::from_millis(11));
        assert_eq!(gap(8), Duration::from_millis(18));
    }

    #[test]
    fn each_sequence_emits_exactly_its_output_tokens_then_finishes() {
        let mut engine = Engine::new(model(2));
        let outputs = [(SequenceId(1), 3), (SequenceId(2), 7), (SequenceId(3), 1)];
        for (id, n) in outputs {
            engine.submit(id, 20, n);
        }
        let mut finished = Vec::new();
        let mut counts: HashMap<SequenceId, u64> = HashMap::new();
        while let Some(step) = engine.step() {
            for id in step.emitted {
                assert!(!finished.contains(&id), "{id:?} emitted after finishing");
                *counts.entry(id).or_default() += 1;
            }
            finished.extend(step.finished);
        }
        for (id, n) in outputs {
            assert_eq!(counts[&id], n);
            assert_eq!(finished.iter().filter(|f| **f == id).count(), 1);
        }
        assert!(engine.is_idle());
    }

    #[test]
    fn zero_output_sequence_finishes_after_prefill_without_a_token() {
        let mut engine = Engine::new(model(2));
        engine.submit(SequenceId(1), 500, 0);
        let step = engine.step();
        assert_eq!(
            step,
            Some(Step {
                duration: Duration::from_millis(10 + 1 + 500),
                batch_sequences: 1,
                prefill_tokens: 500,
                emitted: vec![],
                finished: vec![SequenceId(1)],
            })
        );
        assert_eq!(engine.step(), None);
    }

    #[test]
    fn sequences_beyond_capacity_wait_in_fifo_order() {
        let mut engine = Engine::new(model(2));
        for id in 1..=4 {
            engine.submit(SequenceId(id), 10, 2);
        }
        let step = engine.step();
        assert_eq!(
            step.map(|s| s.emitted),
            Some(vec![SequenceId(1), SequenceId(2)])
        );
        assert_eq!(engine.running_sequences(), 2);
        assert_eq!(engine.waiting_sequences(), 2);
        let _ = engine.step();
        let step = engine.step();
        assert_eq!(
            step.map(|s| s.emitted),
            Some(vec![SequenceId(3), SequenceId(4)])
        );
    }

    #[test]
    fn aborting_a_running_sequence_frees_its_slot_for_the_queue() {
        let mut engine = Engine::new(model(1));
        engine.submit(SequenceId(1), 10, 100);
        engine.submit(SequenceId(2), 10, 100);
        let _ = engine.step();
        assert!(engine.abort(SequenceId(1)));
        assert!(!engine.abort(SequenceId(1)));
        let step = engine.step();
        assert_eq!(step.map(|s| s.emitted), Some(vec![SequenceId(2)]));
    }

    /// vLLM's token budget per step on the default model's GPU: V1 always chunks prefills, and
    /// a step schedules at most `max_num_batched_tokens` tokens, decode tokens included
    /// (`vllm/v1/core/sched/scheduler.py`, `Scheduler.schedule`: `token_budget =
    /// self.max_num_scheduled_tokens`, running requests first, then `num_new_tokens =
    /// min(num_new_tokens, token_budget)` for waiting ones). `EngineArgs._set_default_args_v1`
    /// (`vllm/engine/arg_utils.py`) sets it to 2048 for the OpenAI server on an A100, the GPU
    /// [`EngineModel::default`] stands for.
    const VLLM_A100_SERVER_TOKEN_BUDGET: u64 = 2048;

    #[test]
    fn a_long_prompt_is_prefilled_in_budgeted_chunks_while_running_sequences_keep_decoding() {
        let model = EngineModel::default();
        let mut engine = Engine::new(model.clone());
        engine.submit(SequenceId(1), 100, 1_000);
        let _ = engine.step();
        // A 16k-token prompt arrives while sequence 1 decodes. In vLLM it is prefilled in
        // 2048-token chunks, one per step, and sequence 1 gets a token in every one of them.
        engine.submit(SequenceId(2), 16_000, 10);
        let longest_step = model.step_time(2, VLLM_A100_SERVER_TOKEN_BUDGET);
        loop {
            let Some(step) = engine.step() else {
                unreachable!("sequence 1 is still running");
            };
            assert!(
                step.duration <= longest_step,
                "sequence 1 waited {:?} between two tokens while the prompt was prefilled; \
                 with vLLM's chunked prefill a step lasts at most {longest_step:?}",
                step.duration
            );
            // Sequence 1's decode token takes one token of the budget.
            assert!(
                step.prefill_tokens < VLLM_A100_SERVER_TOKEN_BUDGET,
                "one step prefilled {} prompt tokens, over vLLM's budget of {} per step",
                step.prefill_tokens,
                VLLM_A100_SERVER_TOKEN_BUDGET
            );
            assert!(step.emitted.contains(&SequenceId(1)));
            if step.emitted.contains(&SequenceId(2)) {
                break;
            }
        }
    }

    #[test]
    fn a_burst_is_prefilled_first_come_first_served_so_early_arrivals_get_their_first_token_first()
    {
        let model = EngineModel::default();
        let mut engine = Engine::new(model.clone());
        // Eight 2,000-token prompts arrive together at an idle engine with free slots.
        for id in 1..=8 {
            engine.submit(SequenceId(id), 2_000, 4);
        }
        let mut now = Duration::ZERO;
        let mut first_token: HashMap<SequenceId, Duration> = HashMap::new();
        while let Some(step) = engine.step() {
            now += step.duration;
            for id in step.emitted {
                first_token.entry(id).or_insert(now);
            }
        }
        // vLLM fills each step's 2048-token budget in arrival order: the first prompt is done
        // after one step, the eighth after about eight.
        let first = first_token[&SequenceId(1)];
        let last = first_token[&SequenceId(8)];
        let one_budgeted_step = model.step_time(8, VLLM_A100_SERVER_TOKEN_BUDGET);
        assert!(
            first <= one_budgeted_step,
            "the first request of the burst waited {first:?} for its first token (the last one \
             {last:?}); vLLM prefills it in the first step, at most {one_budgeted_step:?}"
        );
        assert!(
            first < last,
            "every request of the burst got its first token at {first:?}"
        );
    }

    #[test]
    fn absurd_inputs_saturate_instead_of_panicking() {
        let m = EngineModel {
            prefill_tokens_per_s: f64::MIN_POSITIVE,
            step_per_sequence: Duration::MAX,
            ..model(1)
        };
        assert_eq!(m.step_time(usize::MAX, u64::MAX), Duration::MAX);
    }

    #[test]
    fn validate_names_the_field_value_and_rule() {
        let bad = EngineModel {
            prefill_tokens_per_s: 0.0,
            ..model(1)
        };
        let err = bad.validate().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("engine.prefill_tokens_per_s = 0: must be a finite number > 0")
        );
        let bad = model(0);
        let err = bad.validate().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("engine.max_running_sequences = 0: must be >= 1")
        );
        assert!(model(1).validate().is_ok());
    }
}
