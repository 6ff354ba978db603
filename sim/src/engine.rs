//! A pure model of a continuously batching engine (vLLM V1's scheduler, reduced to its timing).
//!
//! The engine runs in steps, and each step schedules at most `max_tokens_per_step` tokens (vLLM's
//! `--max-num-batched-tokens`), as vLLM V1 does with chunked prefill, always on:
//!
//! 1. every running sequence that is decoding takes one token of the budget (running requests
//!    come first in vLLM's scheduler, so a long prompt never stalls them);
//! 2. sequences whose prompt is partly prefilled take the next chunk, `min(prompt left, budget
//!    left)`;
//! 3. waiting sequences are admitted in FIFO order while a slot is free (`max_running_sequences`)
//!    and budget is left, each taking its first chunk the same way.
//!
//! A sequence emits its first token at the end of the step that completes its prefill, as
//! vLLM's does, and one token in each step after that. A step lasts
//!
//! ```text
//! step_base + step_per_sequence * scheduled_sequences + prefill_tokens / prefill_tokens_per_s
//! ```
//!
//! over the sequences it scheduled and the prompt tokens it prefilled. So a request that finds
//! the engine idle sees one step per `max_tokens_per_step` chunk of its prompt before its first
//! token ([`EngineModel::unloaded_ttft`]), a queued one adds the steps it waited, and everyone's
//! inter-token gap grows with the batch and with the prefill chunks sharing its steps.
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
    /// Prompt tokens prefilled per second; a step pays for the prompt chunks it prefills.
    pub prefill_tokens_per_s: f64,
    /// Fixed cost of one step (scheduling, kernel launches, sampling), whatever the batch size.
    pub step_base: Duration,
    /// Extra cost of each sequence in the batch (its attention over the KV cache).
    pub step_per_sequence: Duration,
    /// Most sequences running at once (vLLM's `--max-num-seqs`); later arrivals wait in FIFO order.
    pub max_running_sequences: usize,
    /// Most tokens one step schedules, decode tokens and prefill chunks together (vLLM's
    /// `--max-num-batched-tokens`): a longer prompt is prefilled over several steps.
    pub max_tokens_per_step: u64,
}

/// Names a sequence inside the engine; the caller picks the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

/// What one engine step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// How long the step takes; its tokens exist at its end.
    pub duration: Duration,
    /// Sequences the step scheduled: those decoding, plus those it prefilled a chunk of.
    pub batch_sequences: usize,
    /// Prompt tokens prefilled in this step.
    pub prefill_tokens: u64,
    /// Sequences whose prefill this step completed, with their prompt lengths.
    pub prefilled: Vec<(SequenceId, u64)>,
    /// Sequences that produced one token at the end of this step.
    pub emitted: Vec<SequenceId>,
    /// Sequences done at the end of this step: their last token (if any) is in `emitted`.
    pub finished: Vec<SequenceId>,
}

/// The scheduler state: who waits and who runs.
#[derive(Debug, Clone)]
pub struct Engine {
    model: EngineModel,
    /// Not scheduled yet, in arrival order.
    waiting: VecDeque<Sequence>,
    /// Scheduled at least once: prefilling in chunks, or decoding. Holds a slot.
    running: Vec<Sequence>,
}

#[derive(Debug, Clone)]
struct Sequence {
    id: SequenceId,
    prompt_tokens: u64,
    output_tokens: u64,
    prefilled_tokens: u64,
    /// Set by the step that prefills its last prompt token (a step must run even for an empty
    /// prompt: the first token comes out of one).
    prefill_done: bool,
    generated_tokens: u64,
}

// === impl EngineModel ===

impl Default for EngineModel {
    /// Roughly a Llama-3-8B on one A100: ~10k prefill tokens/s, ~10 ms decode steps at batch 1,
    /// ~23 ms at 64. Fast enough for tests that leave timing to the engine. The token budget is
    /// what vLLM's `EngineArgs` picks for the OpenAI server on an A100 (2048; 8192 on an H100).
    fn default() -> Self {
        Self {
            prefill_tokens_per_s: 10_000.0,
            step_base: Duration::from_millis(10),
            step_per_sequence: Duration::from_micros(200),
            max_running_sequences: 64,
            max_tokens_per_step: 2048,
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
        // Every running sequence takes one token of a step's budget: with fewer tokens than
        // sequences, those past the budget hold a slot and starve. vLLM refuses it at start
        // (SchedulerConfig._verify_args).
        if self.max_tokens_per_step < self.max_running_sequences as u64 {
            return Err(SimError::InvalidConfig {
                field: "engine.max_tokens_per_step",
                value: self.max_tokens_per_step.to_string(),
                rule: "must be >= engine.max_running_sequences (each running sequence takes a token of every step)",
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

    /// TTFT of a request that finds the engine idle: its prompt prefilled alone, one step per
    /// `max_tokens_per_step` chunk, the first token at the end of the last one.
    pub fn unloaded_ttft(&self, prompt_tokens: u64) -> Duration {
        let budget = self.max_tokens_per_step.max(1);
        let full_chunks = prompt_tokens / budget;
        let last_chunk = prompt_tokens % budget;
        let full_steps = self
            .step_time(1, budget)
            .checked_mul(u32::try_from(full_chunks).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        if last_chunk == 0 && full_chunks > 0 {
            full_steps
        } else {
            full_steps.saturating_add(self.step_time(1, last_chunk))
        }
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

    /// Queues a sequence; it is first scheduled in a step with a free slot and budget left.
    pub fn submit(&mut self, id: SequenceId, prompt_tokens: u64, output_tokens: u64) {
        self.waiting.push_back(Sequence {
            id,
            prompt_tokens,
            output_tokens,
            prefilled_tokens: 0,
            prefill_done: false,
            generated_tokens: 0,
        });
    }

    /// Removes a sequence wherever it is (the client went away). Returns whether it was known.
    pub fn abort(&mut self, id: SequenceId) -> bool {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|s| s.id != id);
        self.running.retain(|s| s.id != id);
        before != self.waiting.len() + self.running.len()
    }

    /// Sequences holding a slot: decoding, or part way through a chunked prefill (vLLM counts
    /// both as running).
    pub fn running_sequences(&self) -> usize {
        self.running.len()
    }

    /// Sequences not scheduled yet.
    pub fn waiting_sequences(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Runs one step. `None` when there is nothing to run.
    pub fn step(&mut self) -> Option<Step> {
        let mut budget = self.model.max_tokens_per_step;
        // Indices into `running` of the sequences this step schedules, with the prompt tokens
        // each prefills (0 for a decode).
        let mut scheduled: Vec<(usize, u64)> = Vec::new();

        // Decodes first: one token each.
        for (index, seq) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if seq.prefill_done {
                scheduled.push((index, 0));
                budget -= 1;
            }
        }
        // Then the next chunk of every prompt already part way through its prefill.
        for (index, seq) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if !seq.prefill_done {
                let chunk = seq.prompt_left().min(budget);
                scheduled.push((index, chunk));
                budget -= chunk;
            }
        }
        // Then new arrivals, first come first served, while a slot is free and budget is left.
        while budget > 0 && self.running.len() < self.model.max_running_sequences {
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            let chunk = seq.prompt_left().min(budget);
            scheduled.push((self.running.len(), chunk));
            budget -= chunk;
            self.running.push(seq);
        }
        if scheduled.is_empty() {
            return None;
        }

        let prefill_tokens = scheduled
            .iter()
            .map(|(_, chunk)| *chunk)
            .fold(0u64, u64::saturating_add);
        let batch_sequences = scheduled.len();
        let duration = self.model.step_time(batch_sequences, prefill_tokens);

        // In running order, so that sequences that started earlier are reported first.
        scheduled.sort_unstable_by_key(|(index, _)| *index);
        let mut prefilled = Vec::new();
        let mut emitted = Vec::new();
        let mut finished = Vec::new();
        for (index, chunk) in scheduled {
            let Some(seq) = self.running.get_mut(index) else {
                continue;
            };
            if !seq.prefill_done {
                seq.prefilled_tokens = seq.prefilled_tokens.saturating_add(chunk);
                if seq.prefilled_tokens < seq.prompt_tokens {
                    // Still prefilling: no token from this step.
                    continue;
                }
                seq.prefill_done = true;
                prefilled.push((seq.id, seq.prompt_tokens));
            }
            if seq.generated_tokens < seq.output_tokens {
                seq.generated_tokens += 1;
                emitted.push(seq.id);
            }
            if seq.generated_tokens >= seq.output_tokens {
                finished.push(seq.id);
            }
        }
        self.running
            .retain(|s| !(s.prefill_done && s.generated_tokens >= s.output_tokens));

        Some(Step {
            duration,
            batch_sequences,
            prefill_tokens,
            prefilled,
            emitted,
            finished,
        })
    }
}

// === impl Sequence ===

impl Sequence {
    fn prompt_left(&self) -> u64 {
        self.prompt_tokens.saturating_sub(self.prefilled_tokens)
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
            // Above every prompt these tests send but the chunking ones, which set their own.
            max_tokens_per_step: 2048,
        }
    }

    fn budgeted(max_running_sequences: usize, max_tokens_per_step: u64) -> EngineModel {
        EngineModel {
            max_tokens_per_step,
            ..model(max_running_sequences)
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
    fn unloaded_ttft_of_a_prompt_over_the_budget_counts_one_step_per_chunk() {
        for prompt_tokens in [0, 1, 99, 100, 101, 250, 300] {
            let m = budgeted(8, 100);
            let mut engine = Engine::new(m.clone());
            engine.submit(SequenceId(1), prompt_tokens, 2);
            let first = run_until_idle(&mut engine)[&SequenceId(1)][0];
            assert_eq!(m.unloaded_ttft(prompt_tokens), first, "{prompt_tokens}");
        }
        // 250 tokens: chunks of 100, 100 and 50, each step 10 + 1 ms plus its chunk.
        assert_eq!(
            budgeted(8, 100).unloaded_ttft(250),
            Duration::from_millis(3 * 11 + 250)
        );
    }

    #[test]
    fn a_prompt_over_the_budget_is_prefilled_in_chunks_and_emits_after_the_last() {
        let mut engine = Engine::new(budgeted(4, 100));
        engine.submit(SequenceId(1), 250, 3);
        let chunks: Vec<(u64, Vec<SequenceId>)> = std::iter::from_fn(|| engine.step())
            .map(|step| (step.prefill_tokens, step.emitted))
            .collect();
        assert_eq!(
            chunks,
            [
                (100, vec![]),
                (100, vec![]),
                (50, vec![SequenceId(1)]),
                (0, vec![SequenceId(1)]),
                (0, vec![SequenceId(1)]),
            ]
        );
    }

    #[test]
    fn decodes_take_the_budget_first_then_partial_prefills_then_arrivals_in_order() {
        let mut engine = Engine::new(budgeted(4, 100));
        engine.submit(SequenceId(1), 10, 100);
        engine.submit(SequenceId(2), 10, 100);
        let _ = engine.step();
        // Two decodes take 2 tokens; sequence 3 gets the other 98, sequence 4 waits for budget.
        engine.submit(SequenceId(3), 150, 5);
        engine.submit(SequenceId(4), 30, 5);
        let step = engine.step();
        assert_eq!(step.as_ref().map(|s| s.prefill_tokens), Some(98));
        assert_eq!(step.as_ref().map(|s| s.batch_sequences), Some(3));
        assert_eq!(engine.running_sequences(), 3);
        assert_eq!(engine.waiting_sequences(), 1);
        // Sequence 3's last 52 tokens come before sequence 4's 30, after the two decodes.
        let step = engine.step();
        assert_eq!(step.as_ref().map(|s| s.prefill_tokens), Some(52 + 30));
        assert_eq!(
            step.map(|s| (s.prefilled, s.emitted)),
            Some((
                vec![(SequenceId(3), 150), (SequenceId(4), 30)],
                vec![SequenceId(1), SequenceId(2), SequenceId(3), SequenceId(4)]
            ))
        );
        assert_eq!(engine.waiting_sequences(), 0);
    }

    #[test]
    fn a_step_lasts_for_what_it_scheduled_only() {
        // A budget of 1 token: sequence 1's decode takes it, so the arrival waits although a
        // slot is free, and the step costs a one-sequence decode.
        let mut engine = Engine::new(budgeted(4, 1));
        engine.submit(SequenceId(1), 1, 3);
        let _ = engine.step();
        engine.submit(SequenceId(2), 1_000, 3);
        let step = engine.step();
        assert_eq!(
            step.map(|s| (s.duration, s.batch_sequences, s.prefill_tokens)),
            Some((Duration::from_millis(11), 1, 0))
        );
        assert_eq!(engine.waiting_sequences(), 1);
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
                prefilled: vec![(SequenceId(1), 500)],
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

    /// vLLM refuses a token budget below its sequence limit at start-up (`SchedulerConfig.
    /// _verify_args` in `vllm/config/scheduler.py`: "max_num_batched_tokens (..) must be greater
    /// than or equal to max_num_seqs (..)"), since every running sequence needs one token of the
    /// budget per step. The simulator takes such a model (`flyball sim --max-num-batched-tokens 16`
    /// with the default 64 sequences), and then running sequences past the budget hold a slot
    /// but get no token, step after step, until those ahead of them finish.
    #[test]
    fn a_token_budget_below_the_sequence_limit_is_refused_as_vllm_refuses_it() {
        let m = budgeted(4, 2);
        // What that model does: four short prompts, all admitted in the first step; from then on
        // the first two take the whole budget and the last two wait for them to finish.
        let mut engine = Engine::new(m.clone());
        for id in 1..=4 {
            engine.submit(SequenceId(id), 0, 20);
        }
        let _ = engine.step();
        let mut starved_steps = 0;
        while let Some(step) = engine.step() {
            if !step.emitted.contains(&SequenceId(4)) {
                starved_steps += 1;
            } else {
                break;
            }
        }
        let err = m.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.starts_with("engine.max_tokens_per_step = 2: ")),
            "accepted ({err:?}), and under it a running sequence went {starved_steps} steps \
             without a token"
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
        let err = budgeted(1, 0).validate().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "engine.max_tokens_per_step = 0: must be >= engine.max_running_sequences (each \
                 running sequence takes a token of every step)"
            )
        );
        assert!(model(1).validate().is_ok());
        assert!(EngineModel::default().validate().is_ok());
    }
}
