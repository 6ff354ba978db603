#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::aggregate::{Accumulator, KeyId, WorkerDelta};
use crate::config::FilterConfig;
use crate::response::{Outcome, Phase, RequestRecord};
use crate::shared::{ACCUM_KEY, decode_accumulation, merge_worker_delta, take_report_keys};
use proptest::prelude::*;
use std::collections::{HashMap, VecDeque};

const INTERVAL: u64 = 100;
const TIMEOUT: u64 = 50;
/// The worker whose ticks the single-worker tests plan.
const WORKER: u64 = 1;

fn reporter() -> v1::Reporter {
    v1::Reporter {
        gateway: "gw".into(),
        process_start_unix_ms: 1,
        filter_version: FILTER_VERSION.into(),
    }
}

#[test]
fn the_first_tick_builds_sequence_one_and_claims_the_call() {
    let state = ReporterState::decode_or_new(None, 1_000);
    assert_eq!(state.process_start_ms, 1_000);
    let TickPlan::BuildNew { state, sequence } =
        plan_tick(&state, 1_000, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected BuildNew");
    };
    assert_eq!(sequence, 1);
    assert_eq!(state.next_sequence, 2);
    // Another worker ticking now sees the call in flight.
    assert_eq!(
        plan_tick(&state, 1_010, INTERVAL, TIMEOUT, WORKER),
        TickPlan::Wait
    );
}

#[test]
fn a_refused_report_is_dropped_and_counted_not_resent() {
    let state = ReporterState::decode_or_new(None, 0);
    let TickPlan::BuildNew { state, sequence } = plan_tick(&state, 0, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected BuildNew");
    };
    let state = record_pending(&state, sequence, b"report-1".to_vec(), 3, 0);
    let (state, dropped) = on_refusal(&state, sequence);
    assert!(dropped);
    assert!(state.pending.is_none());
    assert_eq!((state.dropped_reports, state.dropped_requests), (1, 3));
    // The next due tick builds a new report, which says what was dropped.
    let TickPlan::BuildNew { state, sequence } = plan_tick(&state, 100, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected BuildNew, not a resend of the refused report");
    };
    assert_eq!(sequence, 2);
    assert_eq!(state.dropped(0).requests, 3);
    // A refusal of a call this state no longer tracks drops nothing.
    let state = record_pending(&state, sequence, b"report-2".to_vec(), 1, 100);
    let (state, dropped) = on_refusal(&state, 1);
    assert!(!dropped);
    assert_eq!(state.pending_sequence, 2);
}

#[test]
fn an_unacknowledged_report_is_resent_unchanged_with_its_sequence() {
    let state = ReporterState::decode_or_new(None, 0);
    let TickPlan::BuildNew { state, sequence } = plan_tick(&state, 0, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected BuildNew");
    };
    let state = record_pending(&state, sequence, b"report-1".to_vec(), 3, 0);
    let state = on_response(&state, sequence, false);
    // Not due yet.
    assert_eq!(
        plan_tick(&state, 50, INTERVAL, TIMEOUT, WORKER),
        TickPlan::Wait
    );
    let TickPlan::Resend {
        state,
        report,
        sequence: again,
    } = plan_tick(&state, 100, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected Resend");
    };
    assert_eq!((report.as_slice(), again), (b"report-1".as_slice(), 1));
    let state = on_response(&state, again, true);
    assert!(state.pending.is_none());
    let TickPlan::BuildNew { sequence, .. } = plan_tick(&state, 200, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected BuildNew");
    };
    assert_eq!(sequence, 2);
}

/// `state` waits until `at` exactly, then builds report 2.
fn assert_report_2_due_at(state: &ReporterState, at: u64) {
    assert_eq!(
        plan_tick(state, at - 1, INTERVAL, TIMEOUT, WORKER),
        TickPlan::Wait
    );
    assert!(matches!(
        plan_tick(state, at, INTERVAL, TIMEOUT, WORKER),
        TickPlan::BuildNew { sequence: 2, .. }
    ));
}

#[test]
fn the_senders_tick_a_little_early_by_the_clock_is_on_time() {
    let state = ReporterState::decode_or_new(None, 0);
    let state = sent_by(&state, 1_000, WORKER, true);
    // The timer fired, but the clock reads up to half a tick short of due: send, not skip a
    // tick.
    let early = 1_000 + INTERVAL - early_tick_ms(INTERVAL);
    assert_report_2_due_at(&state, early);
    // Half an interval is not a little early.
    assert_eq!(
        plan_tick(&state, 1_050, INTERVAL, TIMEOUT, WORKER),
        TickPlan::Wait
    );
}

#[test]
fn reports_keep_to_their_interval_on_ticks_that_never_land_on_it() {
    // One worker ticking every 28 ms (a quarter interval, plus what Envoy takes to re-arm),
    // each report acknowledged at once; then stalled for a second.
    let mut state = ReporterState::decode_or_new(None, 0);
    let mut sent = Vec::new();
    let ticks = (0..360u64)
        .map(|i| i * 28)
        .chain((0..100).map(|i| 11_100 + i * 28));
    for now in ticks {
        if !matches!(
            plan_tick(&state, now, INTERVAL, TIMEOUT, WORKER),
            TickPlan::Wait
        ) {
            state = sent_by(&state, now, WORKER, true);
            sent.push(now);
        }
    }
    let before_stall = sent.iter().filter(|&&at| at < 10_080).count();
    // 10 s at 100 ms: 101 reports, not 90 (every 112 ms, when each was timed from the last).
    assert_eq!(before_stall, 101, "{sent:?}");
    let gaps: Vec<u64> = sent.windows(2).map(|w| w[1] - w[0]).collect();
    // After the stall: no burst to catch up.
    assert!(gaps.iter().all(|&g| g >= INTERVAL / 2), "{gaps:?}");
}

#[test]
fn a_report_later_than_a_tick_starts_the_schedule_again() {
    // The sender's tick delayed to 95 ms past due: the next report is an interval later, not
    // at its next tick (25 ms, as the schedule would have it).
    let state = ReporterState::decode_or_new(None, 0);
    let state = sent_by(&state, 1_000, 1, true);
    let state = sent_by(&state, 1_195, 1, true);
    assert_eq!(state.next_due_ms, 1_295);
    assert_eq!(
        plan_tick(&state, 1_220, INTERVAL, TIMEOUT, 1),
        TickPlan::Wait
    );
    // A takeover at a one-minute interval: worker 2 sends 44 s past due, then again a minute
    // later, not 15 s later (the control service would have called the gateway stale).
    let minute = 60_000;
    let state = sent_by_every(minute, &ReporterState::decode_or_new(None, 0), 0, 1, true);
    let state = sent_by_every(minute, &state, 104_000, 2, true);
    assert_eq!(
        plan_tick(&state, 119_000, minute, TIMEOUT, 2),
        TickPlan::Wait
    );
    assert_eq!(state.next_due_ms, 164_000);
}

#[test]
fn a_report_sent_a_little_early_does_not_look_like_the_clock_going_back() {
    let state = ReporterState::decode_or_new(None, 0);
    let state = sent_by(&state, 1_000, 1, true);
    // Worker 1 sends its next report half a tick early; the one after is due at 1,200.
    let state = sent_by(&state, 1_100 - early_tick_ms(INTERVAL), 1, true);
    assert_eq!(state.next_due_ms, 1_200);
    // Worker 2 ticks just after: not its turn (it sent two reports 4 ms apart in real Envoy).
    assert_eq!(
        plan_tick(
            &state,
            1_100 - early_tick_ms(INTERVAL) + 4,
            INTERVAL,
            TIMEOUT,
            2
        ),
        TickPlan::Wait
    );
}

#[test]
fn a_late_answer_for_an_older_call_does_not_clear_a_newer_report() {
    let state = ReporterState::decode_or_new(None, 0);
    let state = record_pending(&state, 7, b"seven".to_vec(), 1, 0);
    let state = on_response(&state, 6, true);
    assert_eq!(state.pending.as_deref(), Some(b"seven".as_slice()));
}

#[test]
fn a_call_that_never_answers_stops_blocking_after_its_expiry() {
    let state = ReporterState::decode_or_new(None, 0);
    let TickPlan::BuildNew { state, .. } = plan_tick(&state, 1000, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected BuildNew");
    };
    let expiry = 1000 + in_flight_expiry_ms(TIMEOUT);
    assert_report_2_due_at(&state, expiry);
}

#[test]
fn a_clock_stepping_back_does_not_stall_reporting() {
    let state = ReporterState::decode_or_new(None, 0);
    let TickPlan::BuildNew { state, sequence } =
        plan_tick(&state, 1_000_000, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected BuildNew");
    };
    let state = on_response(&state, sequence, true);
    assert!(matches!(
        plan_tick(&state, 5_000, INTERVAL, TIMEOUT, WORKER),
        TickPlan::BuildNew { .. }
    ));
}

#[test]
fn a_report_past_retention_is_dropped_counted_and_the_sequence_moves_on() {
    let state = ReporterState::decode_or_new(None, 0);
    let TickPlan::BuildNew { state, sequence } = plan_tick(&state, 0, INTERVAL, TIMEOUT, WORKER)
    else {
        panic!("expected BuildNew");
    };
    let mut state = on_response(
        &record_pending(&state, sequence, b"r1".to_vec(), 42, 0),
        sequence,
        false,
    );
    let mut now = 0;
    loop {
        now += INTERVAL;
        match plan_tick(&state, now, INTERVAL, TIMEOUT, WORKER) {
            TickPlan::Resend {
                state: s, sequence, ..
            } => state = on_response(&s, sequence, false),
            TickPlan::BuildNew { state: s, sequence } => {
                assert_eq!(sequence, 2);
                assert!(now >= retention_ms(INTERVAL));
                assert_eq!((s.dropped_reports, s.dropped_requests), (1, 42));
                assert_eq!(
                    s.dropped(8),
                    v1::DroppedTelemetry {
                        reports: 1,
                        requests: 50
                    }
                );
                break;
            }
            // Put back after failures in a row ([`backoff_ms`]), and only then.
            TickPlan::Wait => assert!(state.failures_in_a_row >= 3, "due: must act"),
        }
    }
}

#[test]
fn a_report_carries_its_reporter_sequence_and_drops() {
    let report = build_report(
        vec![v1::KeyTelemetry::default()],
        &reporter(),
        9,
        1234,
        v1::DroppedTelemetry {
            reports: 1,
            requests: 2,
        },
        true,
    );
    assert_eq!(report.sequence, 9);
    assert_eq!(report.sent_at_unix_ms, 1234);
    assert_eq!(report.reporter.map(|r| r.gateway), Some("gw".to_string()));
    assert_eq!(report.keys.len(), 1);
}

// === simulation: workers, shared data with CAS, reporter, control service ===

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Envoy shared data: values with a CAS that changes on every write.
#[derive(Default)]
struct Store {
    map: HashMap<&'static str, (Vec<u8>, u32)>,
    conflicts: u64,
}

impl Store {
    fn get(&self, key: &'static str) -> (Option<Vec<u8>>, u32) {
        match self.map.get(key) {
            Some((bytes, cas)) => (Some(bytes.clone()), *cas),
            None => (None, 0),
        }
    }
    fn set(&mut self, key: &'static str, bytes: Vec<u8>, cas: u32) -> bool {
        let current = self.map.get(key).map_or(0, |v| v.1);
        if current != cas {
            self.conflicts += 1;
            return false;
        }
        self.map.insert(key, (bytes, current + 1));
        true
    }
}

type Read = Option<(Option<Vec<u8>>, u32)>;

enum Job {
    Merge { delta: WorkerDelta, read: Read },
    Tick { stage: TickStage },
    Answer { sequence: u64, ok: bool, read: Read },
}

enum TickStage {
    Plan,
    Claim {
        plan: TickPlan,
        cas: u32,
    },
    Take {
        state: ReporterState,
        sequence: u64,
        read: Read,
    },
    Record {
        sequence: u64,
        report: Vec<u8>,
        requests: u64,
        /// How many worker merges the report's keys include.
        merges: u64,
        read: Read,
    },
}

struct Call {
    worker: usize,
    sequence: u64,
    report: Vec<u8>,
    sent_at: u64,
    merges: u64,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct Truth {
    ok: u64,
    server_error: u64,
    client_cancel: u64,
    input: u64,
    output: u64,
    e2e_count: u64,
}

struct Worker {
    acc: Accumulator,
    jobs: VecDeque<Job>,
    open: Vec<(KeyId, Phase)>,
}

struct Sim {
    rng: Rng,
    now: u64,
    store: Store,
    workers: Vec<Worker>,
    calls: Vec<Call>,
    truth: HashMap<String, Truth>,
    in_flight_truth: HashMap<String, (u64, u64)>,
    server: HashMap<String, Truth>,
    server_in_flight: HashMap<String, (u64, u64)>,
    server_last_sequence: u64,
    /// Worker merges applied to shared data, and how many of them the service has seen.
    merges_applied: u64,
    merges_by_sequence: HashMap<u64, u64>,
    server_merges_seen: u64,
    server_failure_percent: u64,
    dispatches: u64,
    resends: u64,
    duplicates: u64,
}

const MODELS: [&str; 3] = ["a", "b", "c"];

impl Sim {
    fn new(seed: u64, workers: usize) -> Sim {
        let config = FilterConfig::default();
        Sim {
            rng: Rng(seed | 1),
            now: 10_000,
            store: Store::default(),
            workers: (0..workers)
                .map(|_| Worker {
                    acc: Accumulator::new(&config),
                    jobs: VecDeque::new(),
                    open: Vec::new(),
                })
                .collect(),
            calls: Vec::new(),
            truth: HashMap::new(),
            in_flight_truth: HashMap::new(),
            server: HashMap::new(),
            server_in_flight: HashMap::new(),
            server_last_sequence: 0,
            merges_applied: 0,
            merges_by_sequence: HashMap::new(),
            server_merges_seen: 0,
            server_failure_percent: 30,
            dispatches: 0,
            resends: 0,
            duplicates: 0,
        }
    }

    fn act(&mut self, w: usize) {
        match self.rng.below(100) {
            0..30 => self.start(w),
            30..45 => self.first_token(w),
            45..70 => self.finish(w),
            70..85 => self.flush(w),
            _ => self.workers[w].jobs.push_back(Job::Tick {
                stage: TickStage::Plan,
            }),
        }
    }

    fn start(&mut self, w: usize) {
        let model = MODELS[self.rng.below(3) as usize];
        let worker = &mut self.workers[w];
        let (key, _) = worker.acc.key("pool", Some(model));
        worker.acc.request_started(key);
        worker.open.push((key, Phase::WaitingFirstToken));
        self.in_flight_truth.entry(model.into()).or_default().0 += 1;
    }

    fn first_token(&mut self, w: usize) {
        let worker = &mut self.workers[w];
        if let Some(i) = worker
            .open
            .iter()
            .position(|(_, p)| *p == Phase::WaitingFirstToken)
        {
            let key = worker.open[i].0;
            worker.acc.first_token(key);
            worker.acc.record_itl(key, 1_000_000);
            worker.open[i].1 = Phase::Decoding;
            let g = self
                .in_flight_truth
                .entry(worker.acc.labels(key).1.into())
                .or_default();
            g.0 -= 1;
            g.1 += 1;
        }
    }

    fn finish(&mut self, w: usize) {
        if self.workers[w].open.is_empty() {
            return;
        }
        let i = self.rng.below(self.workers[w].open.len() as u64) as usize;
        let (key, phase) = self.workers[w].open.swap_remove(i);
        let outcome =
            [Outcome::Ok, Outcome::ServerError, Outcome::ClientCancel][self.rng.below(3) as usize];
        let record = RequestRecord {
            outcome,
            input_tokens: self.rng.below(1000),
            output_tokens: self.rng.below(500),
            input_estimated: false,
            output_estimated: false,
            unmeasured: false,
            ttft: (phase == Phase::Decoding).then_some(5_000_000),
            tpot: None,
            e2e: 9_000_000,
        };
        let worker = &mut self.workers[w];
        worker.acc.request_finished(key, phase, &record);
        let label = worker.acc.labels(key).1.to_string();
        let g = self.in_flight_truth.entry(label.clone()).or_default();
        match phase {
            Phase::WaitingFirstToken => g.0 -= 1,
            Phase::Decoding => g.1 -= 1,
        }
        let t = self.truth.entry(label).or_default();
        match outcome {
            Outcome::Ok => t.ok += 1,
            Outcome::ServerError => t.server_error += 1,
            _ => t.client_cancel += 1,
        }
        t.input += record.input_tokens;
        t.output += record.output_tokens;
        t.e2e_count += 1;
    }

    fn flush(&mut self, w: usize) {
        if let Some(delta) = self.workers[w].acc.take_delta() {
            self.workers[w]
                .jobs
                .push_back(Job::Merge { delta, read: None });
        }
    }

    /// Advances worker `w`'s first job by one shared-data read or write.
    fn step(&mut self, w: usize) {
        let Some(job) = self.workers[w].jobs.pop_front() else {
            return;
        };
        let next = match job {
            Job::Merge { delta, read: None } => Some(Job::Merge {
                read: Some(self.store.get(ACCUM_KEY)),
                delta,
            }),
            Job::Merge {
                delta,
                read: Some((bytes, cas)),
            } => {
                let merged = merge_worker_delta(bytes.as_deref(), &delta, usize::MAX);
                if self.store.set(ACCUM_KEY, merged, cas) {
                    self.merges_applied += 1;
                    None
                } else {
                    Some(Job::Merge { delta, read: None })
                }
            }
            Job::Tick { stage } => self.tick(w, stage).map(|stage| Job::Tick { stage }),
            Job::Answer {
                sequence,
                ok,
                read: None,
            } => Some(Job::Answer {
                sequence,
                ok,
                read: Some(self.store.get(REPORTER_KEY)),
            }),
            Job::Answer {
                sequence,
                ok,
                read: Some((bytes, cas)),
            } => {
                let state = ReporterState::decode_or_new(bytes.as_deref(), self.now);
                let next = on_response(&state, sequence, ok);
                if self.store.set(REPORTER_KEY, next.encode_to_vec(), cas) {
                    None
                } else {
                    Some(Job::Answer {
                        sequence,
                        ok,
                        read: None,
                    })
                }
            }
        };
        if let Some(job) = next {
            self.workers[w].jobs.push_front(job);
        }
    }

    fn tick(&mut self, w: usize, stage: TickStage) -> Option<TickStage> {
        match stage {
            TickStage::Plan => {
                let (bytes, cas) = self.store.get(REPORTER_KEY);
                let state = ReporterState::decode_or_new(bytes.as_deref(), self.now);
                match plan_tick(&state, self.now, INTERVAL, TIMEOUT, w as u64 + 1) {
                    TickPlan::Wait => None,
                    plan => Some(TickStage::Claim { plan, cas }),
                }
            }
            TickStage::Claim { plan, cas } => match plan {
                TickPlan::Wait => None,
                TickPlan::Resend {
                    state,
                    report,
                    sequence,
                } => {
                    if self.store.set(REPORTER_KEY, state.encode_to_vec(), cas) {
                        self.resends += 1;
                        let merges = self.merges_by_sequence.get(&sequence).copied().unwrap_or(0);
                        self.dispatch(w, sequence, report, merges);
                    }
                    None
                }
                TickPlan::BuildNew { state, sequence } => self
                    .store
                    .set(REPORTER_KEY, state.encode_to_vec(), cas)
                    .then_some(TickStage::Take {
                        state,
                        sequence,
                        read: None,
                    }),
            },
            TickStage::Take {
                state,
                sequence,
                read: None,
            } => Some(TickStage::Take {
                state,
                sequence,
                read: Some(self.store.get(ACCUM_KEY)),
            }),
            TickStage::Take {
                state,
                sequence,
                read: Some((bytes, cas)),
            } => {
                let (taken, remaining) = take_report_keys(bytes.as_deref().unwrap_or_default());
                if !self.store.set(ACCUM_KEY, remaining, cas) {
                    return Some(TickStage::Take {
                        state,
                        sequence,
                        read: None,
                    });
                }
                let report = build_report(
                    taken.keys,
                    &reporter(),
                    sequence,
                    self.now,
                    state.dropped(taken.dropped_requests),
                    true,
                );
                Some(TickStage::Record {
                    sequence,
                    report: report.encode_to_vec(),
                    requests: taken.requests,
                    merges: self.merges_applied,
                    read: None,
                })
            }
            TickStage::Record {
                sequence,
                report,
                requests,
                merges,
                read: None,
            } => Some(TickStage::Record {
                sequence,
                report,
                requests,
                merges,
                read: Some(self.store.get(REPORTER_KEY)),
            }),
            TickStage::Record {
                sequence,
                report,
                requests,
                merges,
                read: Some((bytes, cas)),
            } => {
                let state = ReporterState::decode_or_new(bytes.as_deref(), self.now);
                let next = record_pending(&state, sequence, report.clone(), requests, self.now);
                if self.store.set(REPORTER_KEY, next.encode_to_vec(), cas) {
                    self.merges_by_sequence.insert(sequence, merges);
                    self.dispatch(w, sequence, report, merges);
                    None
                } else {
                    Some(TickStage::Record {
                        sequence,
                        report,
                        requests,
                        merges,
                        read: None,
                    })
                }
            }
        }
    }

    fn dispatch(&mut self, worker: usize, sequence: u64, report: Vec<u8>, merges: u64) {
        assert!(self.calls.is_empty(), "two report calls in flight at once");
        self.dispatches += 1;
        self.calls.push(Call {
            worker,
            sequence,
            report,
            sent_at: self.now,
            merges,
        });
    }

    /// The control service answers the oldest call: merged unless it is a duplicate; the answer
    /// (or the merge itself) may be lost.
    fn serve(&mut self, force: bool) {
        if self.calls.is_empty() {
            return;
        }
        let overdue = self.calls[0].sent_at + 500 <= self.now;
        if !force && !overdue && !self.rng.chance(40) {
            return;
        }
        let call = self.calls.remove(0);
        let fail_before_merge = self.rng.chance(self.server_failure_percent / 2);
        let fail_after_merge = self.rng.chance(self.server_failure_percent / 2);
        if !fail_before_merge {
            let report = v1::ReportRequest::decode(call.report.as_slice())
                .unwrap_or_else(|e| panic!("undecodable report: {e}"));
            assert_eq!(report.sequence, call.sequence);
            if report.sequence <= self.server_last_sequence {
                self.duplicates += 1;
            } else {
                assert_eq!(
                    report.dropped.unwrap_or_default(),
                    v1::DroppedTelemetry::default(),
                    "nothing may be dropped in this simulation"
                );
                self.server_last_sequence = report.sequence;
                self.server_merges_seen = call.merges;
                self.server_in_flight.clear();
                for key in &report.keys {
                    if let Some(f) = key.in_flight {
                        self.server_in_flight
                            .insert(key.model.clone(), (f.waiting_first_token, f.decoding));
                    }
                    if key.requests.is_none() && key.tokens.is_none() && key.e2e_us.is_none() {
                        continue;
                    }
                    let t = self.server.entry(key.model.clone()).or_default();
                    let r = key.requests.unwrap_or_default();
                    t.ok += r.ok;
                    t.server_error += r.server_error;
                    t.client_cancel += r.client_cancel;
                    let tokens = key.tokens.unwrap_or_default();
                    t.input += tokens.input;
                    t.output += tokens.output;
                    t.e2e_count += key
                        .e2e_us
                        .as_ref()
                        .and_then(|s| flyball_sketch::Sketch::try_from(s).ok())
                        .map_or(0, |s| s.count());
                }
            }
        }
        let ok = !fail_before_merge && !fail_after_merge;
        self.workers[call.worker].jobs.push_back(Job::Answer {
            sequence: call.sequence,
            ok,
            read: None,
        });
    }

    fn random_step(&mut self) {
        self.now += self.rng.below(4);
        let w = self.rng.below(self.workers.len() as u64) as usize;
        if self.rng.chance(50) && !self.workers[w].jobs.is_empty() {
            self.step(w);
        } else if self.workers[w].jobs.is_empty() {
            self.act(w);
        } else {
            self.serve(false);
        }
    }

    /// Runs every job and every call to completion, with no failures, until a report built
    /// after the last change has been acknowledged.
    fn settle(&mut self) {
        self.server_failure_percent = 0;
        for w in 0..self.workers.len() {
            self.flush(w);
        }
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 10_000, "the simulation does not settle");
            for w in 0..self.workers.len() {
                while !self.workers[w].jobs.is_empty() {
                    self.step(w);
                    self.serve(true);
                }
            }
            self.serve(true);
            let reporter_state =
                ReporterState::decode_or_new(self.store.get(REPORTER_KEY).0.as_deref(), self.now);
            let accum = decode_accumulation(self.store.get(ACCUM_KEY).0.as_deref());
            let drained = accum.buffered_requests == 0
                && accum
                    .keys
                    .iter()
                    .all(|k| k.requests.is_none() && k.itl_us.is_none());
            let quiet = self.calls.is_empty()
                && reporter_state.pending.is_none()
                && self.workers.iter().all(|w| w.jobs.is_empty());
            // The service has merged a report built after every worker merge, so it holds the
            // current gauges too (they travel only in new reports).
            let current = self.server_merges_seen == self.merges_applied;
            if drained
                && quiet
                && current
                && self.server_last_sequence + 1 == reporter_state.next_sequence
            {
                break;
            }
            self.now += INTERVAL;
            self.workers[0].jobs.push_back(Job::Tick {
                stage: TickStage::Plan,
            });
        }
    }

    fn in_flight_truth(&self) -> HashMap<String, (u64, u64)> {
        self.in_flight_truth
            .iter()
            .filter(|(_, g)| **g != (0, 0))
            .map(|(k, g)| (k.clone(), *g))
            .collect()
    }
}

fn run(sim: &mut Sim, steps: usize) -> Result<(), TestCaseError> {
    for _ in 0..steps {
        sim.random_step();
    }
    // Quiescent with requests still open: the service's gauges match what is in flight.
    sim.settle();
    prop_assert_eq!(&sim.server, &sim.truth);
    prop_assert_eq!(&sim.server_in_flight, &sim.in_flight_truth());

    // Everything finishes: gauges go to zero, totals stay exact.
    for w in 0..sim.workers.len() {
        while !sim.workers[w].open.is_empty() {
            sim.finish(w);
        }
    }
    sim.settle();
    prop_assert_eq!(&sim.server, &sim.truth);
    prop_assert!(
        sim.server_in_flight.is_empty(),
        "{:?}",
        sim.server_in_flight
    );
    Ok(())
}

#[test]
fn the_simulation_exercises_conflicts_resends_and_duplicates() -> Result<(), TestCaseError> {
    // Pins that the property below is not vacuous: with this seed every hazard happens.
    let mut sim = Sim::new(7, 4);
    run(&mut sim, 20_000)?;
    assert!(sim.store.conflicts > 0, "no CAS conflict");
    assert!(sim.resends > 0, "no resend");
    assert!(sim.duplicates > 0, "no duplicate reached the service");
    assert!(sim.truth.values().map(|t| t.e2e_count).sum::<u64>() > 100);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn acknowledged_reports_add_up_to_exactly_what_workers_saw(
        seed in any::<u64>(),
        workers in 1usize..5,
        steps in 200usize..3000,
    ) {
        let mut sim = Sim::new(seed, workers);
        run(&mut sim, steps)?;
        prop_assert!(sim.dispatches > 0);
    }
}

#[test]
fn regression_seed_15983811249975411706_one_worker_1487_steps() -> Result<(), TestCaseError> {
    // Found by the property above in a fresh-clone CI run: one request's figures went missing.
    let mut sim = Sim::new(15983811249975411706, 1);
    run(&mut sim, 1487)
}

/// Sends as `worker` at `now` (panics if it may not), and records the outcome.
fn sent_by(state: &ReporterState, now: u64, worker: u64, ok: bool) -> ReporterState {
    sent_by_every(INTERVAL, state, now, worker, ok)
}

/// [`sent_by`] at another report interval.
fn sent_by_every(
    interval: u64,
    state: &ReporterState,
    now: u64,
    worker: u64,
    ok: bool,
) -> ReporterState {
    sent_as(state, now, interval, worker, 0, ok)
}

/// Sends as `worker` of configuration `generation` at `now` and applies the answer (panics if
/// it may not send).
fn sent_as(
    state: &ReporterState,
    now: u64,
    interval: u64,
    worker: u64,
    generation: u64,
    ok: bool,
) -> ReporterState {
    let (state, sequence) = match plan_tick_for(state, now, interval, TIMEOUT, worker, generation) {
        TickPlan::BuildNew { state, sequence } => (state, sequence),
        TickPlan::Resend {
            state, sequence, ..
        } => (state, sequence),
        TickPlan::Wait => panic!("worker {worker} may not send at {now}"),
    };
    on_response(&state, sequence, ok)
}

#[test]
fn the_worker_that_sent_the_last_report_sends_the_next_others_take_over_half_an_interval_late() {
    let state = ReporterState::decode_or_new(None, 0);
    // Whoever ticks first sends the first report.
    let state = sent_by(&state, 0, 2, true);
    assert_eq!(state.sender, 2);
    // At the due time only worker 2 may send.
    assert_eq!(plan_tick(&state, 100, INTERVAL, TIMEOUT, 1), TickPlan::Wait);
    assert_eq!(plan_tick(&state, 599, INTERVAL, TIMEOUT, 3), TickPlan::Wait);
    let state = sent_by(&state, 100, 2, true);
    // Worker 2 stops ticking: worker 1 takes over 500 ms past due (half of a 100 ms interval
    // would be too short to tell gone from busy), and keeps it.
    assert_eq!(takeover_ms(INTERVAL), 500);
    assert_eq!(plan_tick(&state, 699, INTERVAL, TIMEOUT, 1), TickPlan::Wait);
    let state = sent_by(&state, 700, 1, true);
    assert_eq!(state.sender, 1);
    assert_eq!(plan_tick(&state, 800, INTERVAL, TIMEOUT, 2), TickPlan::Wait);
    sent_by(&state, 800, 1, true);
    // With longer intervals, half of one.
    assert_eq!(takeover_ms(5_000), 2_500);
}

#[test]
fn after_a_failed_report_any_worker_may_send_at_the_due_time() {
    let state = ReporterState::decode_or_new(None, 0);
    let state = sent_by(&state, 0, 2, false);
    assert_eq!(state.sender, 0);
    let state = sent_by(&state, 100, 3, true);
    assert_eq!(state.sender, 3);
    // A late failure of an older report does not unseat the sender.
    assert_eq!(on_response(&state, 1, false).sender, 3);
}

#[test]
fn reports_failing_in_a_row_put_the_next_one_back_until_one_is_answered() {
    const SECOND: u64 = 1_000;
    let due_after = |state: &ReporterState, after: u64| {
        let due = (0..=60_000)
            .map(|t| after + t)
            .find(|&t| plan_tick(state, t, SECOND, TIMEOUT, 1) != TickPlan::Wait);
        due.map(|t| t - after)
    };
    let on_time = SECOND - early_tick_ms(SECOND);
    let state = ReporterState::decode_or_new(None, 0);
    let state = sent_by_every(SECOND, &state, 0, 1, false);
    // One failure, or two (one lost connection can fail two reports): the next report at its due
    // time, so a healthy gateway stays within the control service's stale limit.
    assert_eq!(due_after(&state, 0), Some(on_time));
    let state = sent_by_every(SECOND, &state, 1_000, 1, false);
    assert_eq!(state.failures_in_a_row, 2);
    assert_eq!(due_after(&state, 1_000), Some(on_time));
    // Then 1 and 3 intervals put back.
    let state = sent_by_every(SECOND, &state, 2_000, 1, false);
    assert_eq!(due_after(&state, 2_000), Some(on_time + SECOND));
    let state = sent_by_every(SECOND, &state, 4_000, 1, false);
    assert_eq!(due_after(&state, 4_000), Some(on_time + 3 * SECOND));
    let mut state = sent_by_every(SECOND, &state, 8_000, 1, false);
    let mut at = 8_000;
    for _ in 0..5 {
        // Then 7 intervals and no more.
        let wait = due_after(&state, at).unwrap_or(u64::MAX);
        assert_eq!(wait, on_time + 7 * SECOND);
        at += wait;
        state = sent_by_every(SECOND, &state, at, 1, false);
    }
    // An answer ends it.
    let state = sent_by_every(SECOND, &state, at + 8 * SECOND, 1, true);
    assert_eq!(state.failures_in_a_row, 0);
    assert_eq!(due_after(&state, at + 8 * SECOND), Some(on_time));
    // As does a refusal: the control service answered.
    let mut failed = state;
    for n in 9..12 {
        failed = sent_by_every(SECOND, &failed, at + n * SECOND, 1, false);
    }
    assert_eq!(failed.failures_in_a_row, 3);
    assert_eq!(on_refusal(&failed, 1).0.failures_in_a_row, 0);
    // Not an answer after the timeout (on the stream left half-closed): the report is taken as
    // delivered, but a service that answers that late is still put back.
    let sequence = failed.pending_sequence;
    let (answered, dropped) = on_late_answer(&failed, sequence, false);
    assert_eq!(answered.failures_in_a_row, 3);
    assert!(answered.pending.is_none(), "the report acknowledged late");
    assert!(!dropped);
    // And a new configuration: the failures were the old one's.
    let (renewed, _) = register_configuration(&failed, config_hash(b"{}"), at);
    assert_eq!(renewed.failures_in_a_row, 0);
    // Never more than 8 s, however long the interval.
    assert_eq!(backoff_ms(60_000, 3), MAX_BACKOFF_MS);
    assert_eq!(backoff_ms(100, 9), 700);
}

#[test]
fn an_answer_after_the_timeout_settles_its_report_and_leaves_what_is_in_flight() {
    let state = ReporterState::decode_or_new(None, 0);
    let TickPlan::BuildNew { state, sequence } = plan_tick(&state, 0, INTERVAL, TIMEOUT, 2) else {
        panic!("expected a new report");
    };
    let state = record_pending(&state, sequence, vec![7], 3, 0);
    // Given up on at the timeout, then resent by worker 3.
    let failed = on_response(&state, sequence, false);
    let TickPlan::Resend {
        state: resending, ..
    } = plan_tick(&failed, INTERVAL, INTERVAL, TIMEOUT, 3)
    else {
        panic!("expected a resend");
    };
    // The first call's acknowledgement comes now: delivered, not to go again, and the resend
    // stays in flight (no second call beside it).
    let (late, dropped) = on_late_answer(&resending, sequence, false);
    assert!(late.pending.is_none() && !dropped);
    assert_eq!(late.in_flight_sequence, sequence);
    assert_eq!(late.dispatched_at_ms, resending.dispatched_at_ms);
    assert_eq!(
        plan_tick(&late, 2 * INTERVAL, INTERVAL, TIMEOUT, 4),
        TickPlan::Wait
    );
    // A refusal that comes late drops it, counted once.
    let (refused, dropped) = on_late_answer(&resending, sequence, true);
    assert!(dropped && refused.pending.is_none());
    assert_eq!((refused.dropped_reports, refused.dropped_requests), (1, 3));
    // An answer to an older report leaves a newer pending one alone.
    assert_eq!(
        on_late_answer(&resending, sequence - 1, true),
        (resending, false)
    );
}

#[test]
fn a_report_undelivered_through_no_failure_of_the_service_puts_nothing_back() {
    let state = ReporterState::decode_or_new(None, 0);
    let failed = sent_by(&sent_by(&state, 0, 2, false), 100, 2, false);
    assert_eq!(failed.failures_in_a_row, 2);
    // Cancelled by the filter, not built, or sent where the service has no ReportStream: resent
    // at the next due time by any worker, the failures in a row unchanged.
    let TickPlan::BuildNew { state, sequence } = plan_tick(&failed, 200, INTERVAL, TIMEOUT, 2)
    else {
        panic!("expected a new report");
    };
    let sending = record_pending(&state, sequence, vec![7], 3, 200);
    let undelivered = on_not_delivered(&sending, sequence);
    assert_eq!(undelivered.failures_in_a_row, 2);
    assert_eq!(undelivered.dispatched_at_ms, 0);
    assert_eq!(undelivered.pending_sequence, sequence, "still to be resent");
    // By the same worker at the due time (another only after the takeover delay).
    assert_eq!(undelivered.sender, 2);
    assert_eq!(
        plan_tick(&undelivered, 300, INTERVAL, TIMEOUT, 3),
        TickPlan::Wait
    );
    assert!(matches!(
        plan_tick(&undelivered, 300, INTERVAL, TIMEOUT, 2),
        TickPlan::Resend { .. }
    ));
    // Its worker gone, by any worker at the due time.
    let gone = on_worker_gone(&sending, 2, Some(sequence));
    assert_eq!((gone.failures_in_a_row, gone.sender), (2, 0));
    assert!(matches!(
        plan_tick(&gone, 300, INTERVAL, TIMEOUT, 3),
        TickPlan::Resend { .. }
    ));
}

#[test]
fn a_gone_sender_leaves_the_next_report_to_any_worker_at_its_due_time() {
    let state = ReporterState::decode_or_new(None, 0);
    let state = sent_by(&state, 0, 2, true);
    // Worker 2's configuration is replaced while it has report 2 in flight.
    let TickPlan::BuildNew { state, sequence } = plan_tick(&state, 100, INTERVAL, TIMEOUT, 2)
    else {
        panic!("expected BuildNew");
    };
    let state = record_pending(&state, sequence, vec![7], 3, 100);
    let gone = on_worker_gone(&state, 2, Some(sequence));
    assert_eq!((gone.sender, gone.dispatched_at_ms), (0, 0));
    // Worker 1 resends it, unchanged, at the next due time: no expiry, no takeover delay.
    match plan_tick(&gone, 200, INTERVAL, TIMEOUT, 1) {
        TickPlan::Resend {
            report,
            sequence: s,
            ..
        } => assert_eq!((report, s), (vec![7], sequence)),
        other => panic!("expected a resend, got {other:?}"),
    }
    // A worker that was not the sender, gone with nothing in flight, changes nothing.
    assert_eq!(on_worker_gone(&state, 5, None), state);
    // The sender gone between reports: the next is anyone's at its due time.
    let idle = on_response(&state, sequence, true);
    let gone = on_worker_gone(&idle, 2, None);
    assert_eq!(gone.sender, 0);
    assert!(matches!(
        plan_tick(&gone, 200, INTERVAL, TIMEOUT, 1),
        TickPlan::BuildNew { .. }
    ));
}

/// Sends as `worker` of `generation` at `now` (panics if it may not).
fn sent_by_generation(
    state: &ReporterState,
    now: u64,
    worker: u64,
    generation: u64,
) -> ReporterState {
    sent_as(state, now, INTERVAL, worker, generation, true)
}

#[test]
fn a_new_configuration_takes_reporting_over_at_the_next_due_time() {
    let a = config_hash(b"{\"reportIntervalMs\":100}");
    let b = config_hash(b"{\"reportIntervalMs\":200}");
    assert_ne!(a, b);
    let state = ReporterState::decode_or_new(None, 0);
    // Both workers' root contexts (and the main thread's) of one configuration share a
    // generation.
    let (state, old) = register_configuration(&state, a, 0);
    let (state, again) = register_configuration(&state, a, 0);
    assert_eq!((old, again), (1, 1));
    let state = sent_by_generation(&state, 0, 1, old);
    let state = sent_by_generation(&state, 100, 1, old);
    // The configuration is replaced; worker 1's old root context goes on ticking while its
    // connections drain.
    let (state, new) = register_configuration(&state, b, 150);
    assert_eq!(new, 2);
    assert_eq!(
        plan_tick_for(&state, 200, INTERVAL, TIMEOUT, 1, old),
        TickPlan::Wait
    );
    let state = sent_by_generation(&state, 200, 7, new);
    assert_eq!((state.sender, state.sender_generation), (7, 2));
    // From then on the old one is one of the others: it takes over only when the new sender
    // is gone.
    assert_eq!(
        plan_tick_for(&state, 300, INTERVAL, TIMEOUT, 1, old),
        TickPlan::Wait
    );
    let state = sent_by_generation(&state, 300, 7, new);
    assert_eq!(
        plan_tick_for(&state, 899, INTERVAL, TIMEOUT, 1, old),
        TickPlan::Wait
    );
    let state = sent_by_generation(&state, 900, 1, old);
    // Still the newest's signs of life are 600 ms old: the old generation goes on as sender.
    let state = sent_by_generation(&state, 1_000, 1, old);
    // Going back to the first configuration is a newer generation still.
    let (_, newest) = register_configuration(&state, a, 1_050);
    assert_eq!(newest, 3);
}

#[test]
fn a_sibling_of_the_senders_generation_does_not_jump_the_queue() {
    let state = ReporterState::decode_or_new(None, 0);
    let (state, generation) = register_configuration(&state, 42, 0);
    let state = sent_by_generation(&state, 0, 1, generation);
    assert_eq!(
        plan_tick_for(&state, 100, INTERVAL, TIMEOUT, 2, generation),
        TickPlan::Wait
    );
    sent_by_generation(&state, 100, 1, generation);
}

#[test]
fn a_due_time_set_at_a_longer_interval_is_not_the_clock_going_back() {
    // A 200 ms sender scheduled the next report; a 100 ms worker of an older configuration
    // (still draining) must not read that as the clock stepping back and send at once.
    let state = ReporterState::decode_or_new(None, 0);
    let (state, old) = register_configuration(&state, 1, 0);
    let (state, new) = register_configuration(&state, 2, 0);
    let TickPlan::BuildNew { state, sequence } = plan_tick_for(&state, 0, 200, TIMEOUT, 7, new)
    else {
        panic!("the newest configuration may send first");
    };
    let state = on_response(&state, sequence, true);
    assert_eq!(
        plan_tick_for(&state, 10, INTERVAL, TIMEOUT, 1, old),
        TickPlan::Wait
    );
    // The other way round: an older 200 ms sender scheduled it; a 100 ms worker of the newer
    // configuration sends when it is due, not at once.
    let state = ReporterState {
        sender: 1,
        sender_generation: old,
        ..state
    };
    assert_eq!(state.next_due_ms, 200);
    assert_eq!(
        plan_tick_for(&state, 10, INTERVAL, TIMEOUT, 7, new),
        TickPlan::Wait
    );
    assert!(matches!(
        plan_tick_for(&state, 190, INTERVAL, TIMEOUT, 7, new),
        TickPlan::BuildNew { .. }
    ));
}

#[test]
fn after_a_failed_report_an_older_configuration_does_not_hold_the_newest_back() {
    // A configuration reporting every 60 s is replaced by one reporting every 100 ms; the old
    // root contexts tick on (every 15 s) while their connections drain.
    const OLD_INTERVAL: u64 = 60_000;
    const OLD_WORKER: u64 = 1;
    const NEW_WORKER: u64 = 7;
    let state = ReporterState::decode_or_new(None, 0);
    let (state, old) = register_configuration(&state, 1, 0);
    let (state, new) = register_configuration(&state, 2, 900);
    // The new configuration's worker sends; that one report fails (a connection reset, say).
    let TickPlan::BuildNew { state, sequence } =
        plan_tick_for(&state, 1_000, INTERVAL, TIMEOUT, NEW_WORKER, new)
    else {
        panic!("expected BuildNew");
    };
    let state = record_pending(&state, sequence, vec![1], 1, 1_000);
    let state = on_response(&state, sequence, false);
    // An old root context ticks before the new worker's next one. After a failure the report
    // is anyone's at its due time, but the newest configuration's first: the old one resending
    // (to the old control cluster) would schedule the next report at its own 60 s interval.
    assert_eq!(
        plan_tick_for(&state, 1_010, OLD_INTERVAL, TIMEOUT, OLD_WORKER, old),
        TickPlan::Wait
    );
    // The newest configuration must report again well within the control service's stale
    // limit (3 intervals, at least 3 s), ticking every 25 ms.
    let mut now = 1_025;
    let sent_at = loop {
        if now > 1_010 + 70_000 {
            break None;
        }
        if plan_tick_for(&state, now, INTERVAL, TIMEOUT, NEW_WORKER, new) != TickPlan::Wait {
            break Some(now);
        }
        now += tick_period_ms(INTERVAL);
    };
    assert!(
        sent_at.is_some_and(|t| t <= 1_010 + 3_000),
        "the newest configuration's next report waits until {sent_at:?} (next due {} set at the old 60 s interval; sender generation {})",
        state.next_due_ms,
        state.sender_generation
    );
}

#[test]
fn sketches_go_sparse_when_smaller_unless_turned_off() {
    let mut sketch = flyball_sketch::Sketch::new();
    for ttft_us in [55_000.0, 700_000.0, 1_800_000.0] {
        sketch.record(ttft_us);
    }
    let key = v1::KeyTelemetry {
        ttft_us: Some(v1::Sketch::from(&sketch)),
        ..v1::KeyTelemetry::default()
    };
    let build = |sparse| {
        build_report(
            vec![key.clone()],
            &reporter(),
            1,
            0,
            v1::DroppedTelemetry::default(),
            sparse,
        )
    };
    let sparse = build(true).keys[0].ttft_us.clone().unwrap();
    assert!(sparse.counts.is_empty());
    assert_eq!(sparse.sparse_counts, vec![1, 1, 1]);
    assert_eq!(flyball_sketch::Sketch::try_from(&sparse), Ok(sketch));
    assert_eq!(build(false).keys[0].ttft_us, key.ttft_us);
}
