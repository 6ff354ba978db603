//! Sliding windows over merged gateway telemetry, per (backend, model) key and per pool.
//!
//! A [`Window`] is a ring of fixed-width time buckets (1 s by default) covering the stable window
//! (60 s); the short window (10 s) is its newest buckets. Each bucket holds request outcomes, token
//! sums and one merged [`Sketch`] per latency, so memory is bounded by keys x buckets x
//! [`flyball_sketch::MAX_BUCKETS`] whatever the gateways send, and never grows with the number of
//! gateways. [`Windows`] keeps one window per key and one per pool, the totals since start, and the
//! in-flight sums that ingest maintains from each live gateway's latest gauge. Those sums are also
//! integrated over time into the buckets ([`InFlightTime`]), so a window knows how many requests
//! were in flight on average over its span, not only at its end.
//!
//! Everything here is pure: `now` is a parameter and nothing reads a clock.

use std::collections::HashMap;
use std::time::Duration;

use flyball_proto::v1::{RequestOutcomes, TokenUsage};
use flyball_sketch::{Sketch, SparseSketch};
use tokio::time::Instant;

/// The ring may not hold more buckets than this: one hour of 1 s buckets.
const MAX_SLOTS: u128 = 3600;

/// Bucket width and the two window lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    bucket: Duration,
    short: Duration,
    stable: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowConfigError {
    #[error("--bucket = {0:?}: must be at least 10ms")]
    Bucket(Duration),
    #[error("--short-window = {short:?}: must be at least one --bucket ({bucket:?})")]
    Short { short: Duration, bucket: Duration },
    #[error("--stable-window = {stable:?}: must be at least --short-window ({short:?})")]
    Stable { stable: Duration, short: Duration },
    #[error("--stable-window = {stable:?}: at most {MAX_SLOTS} buckets of --bucket ({bucket:?})")]
    TooManyBuckets { stable: Duration, bucket: Duration },
}

/// The latency sketches of one bucket or a window, in microseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latencies {
    pub ttft_us: Sketch,
    pub tpot_us: Sketch,
    pub itl_us: Sketch,
    pub e2e_us: Sketch,
}

/// The latency sketches of one key's report, in microseconds, as checked on arrival: merged into
/// every window the key feeds from their occupied buckets alone ([`SparseSketch`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportedLatencies {
    pub ttft_us: SparseSketch,
    pub tpot_us: SparseSketch,
    pub itl_us: SparseSketch,
    pub e2e_us: SparseSketch,
}

/// One key's deltas from one report, already validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub requests: RequestOutcomes,
    pub tokens: TokenUsage,
    pub latency: ReportedLatencies,
}

/// Requests in flight, summed over live gateways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    pub waiting_first_token: u64,
    pub decoding: u64,
}

/// Requests in flight integrated over time, in request-microseconds: the in-flight sums as the
/// control service saw them, each gateway's gauges held from one of its reports to the next (a
/// gateway gone quiet: until it is given up on, as for the sums). Divided by the time spanned
/// (which starts no earlier than the first report the service heard), the mean number in
/// flight over a window, which is what a latency measured over the same window answers to; the
/// sum at the window's end is one moment of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlightTime {
    pub waiting_first_token_us: u64,
    pub decoding_us: u64,
}

/// Counts since the service started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A ring of time buckets. See the module docs.
#[derive(Debug, Clone)]
pub struct Window {
    width: Duration,
    /// `width` in nanoseconds: every report finds its buckets, and u64 division is several
    /// times cheaper than the u128 of `Duration::as_nanos`.
    width_ns: u64,
    epoch: Instant,
    slots: Vec<Slot>,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    /// Absolute bucket number since the epoch; `None` while never written.
    index: Option<u64>,
    requests: RequestOutcomes,
    tokens: TokenUsage,
    latency: Latencies,
    in_flight: InFlightTime,
}

/// What a window held over a span ending at `now`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowSummary {
    /// The time the figures cover: the span, or less just after the epoch; never under one bucket.
    pub covered: Duration,
    /// The oldest bucket's start, or the first report the service heard if later, to now; not
    /// padded to a bucket as `covered` is: the time `in_flight` was integrated over.
    pub spanned: Duration,
    pub requests: RequestOutcomes,
    pub tokens: TokenUsage,
    pub latency: Latencies,
    pub in_flight: InFlightTime,
}

/// Selects the keys that feed a pool: a backend, a model, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub backend: Option<String>,
    pub model: Option<String>,
}

/// Index of a (backend, model) key in [`Windows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(u32);

/// Index of a pool in [`Windows`], in the order the pools were given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(pub usize);

/// Windows per key and per pool. See the module docs.
#[derive(Debug)]
pub struct Windows {
    config: WindowConfig,
    epoch: Instant,
    max_keys: usize,
    /// backend -> model -> key, nested so lookups borrow the report's strings.
    index: HashMap<Box<str>, HashMap<Box<str>, KeyId>>,
    /// Indexed by [`KeyId`]; `None` for evicted keys, whose ids wait in `free` for reuse.
    keys: Vec<Option<KeyState>>,
    free: Vec<KeyId>,
    /// Indexed by [`PoolId`]; `None` for ids no pool holds (any more). Ids are never reused, so
    /// a reader holding an older configuration never sees another pool's figures.
    pools: Vec<Option<PoolState>>,
    /// When the first report arrived. Requests in flight are known from then on (a key absent
    /// from a report has none in flight at its gateway); before it nothing says how many there
    /// were, and counted as none they pulled the means down for a whole window after the
    /// service started (a gateway first heard 0.9 s after the start read as a tenth of its load
    /// at 1 s).
    heard_since: Option<Instant>,
}

#[derive(Debug)]
struct KeyState {
    backend: Box<str>,
    model: Box<str>,
    window: Window,
    totals: Totals,
    in_flight: InFlight,
    /// Since when `in_flight` has held: integrated into the windows up to here.
    in_flight_since: Option<Instant>,
    pools: Vec<PoolId>,
    last_update: Option<Instant>,
}

#[derive(Debug, Clone)]
struct PoolState {
    selector: Selector,
    window: Window,
    totals: Totals,
    keys: Vec<KeyId>,
    last_update: Option<Instant>,
}

/// A pool's (or a key's) figures at `now`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub short: WindowSummary,
    pub stable: WindowSummary,
    pub totals: Totals,
    pub in_flight: InFlight,
    /// When telemetry for this pool last arrived, if ever.
    pub last_update: Option<Instant>,
}

impl View {
    /// Counts `key`'s requests in flight now, and in the windows for the time since they were
    /// last integrated into its buckets.
    fn hold_in_flight(&mut self, key: &KeyState, now: Instant) {
        self.in_flight.add(key.in_flight);
        self.short
            .accrue_open(key.in_flight, key.in_flight_since, now);
        self.stable
            .accrue_open(key.in_flight, key.in_flight_since, now);
    }

    /// Requests in flight, or seen in the short window: KEDA's activation.
    pub fn has_load(&self) -> bool {
        self.in_flight.total() > 0 || self.short.requests.total() > 0
    }
}

/// A key's name and figures, for metrics.
#[derive(Debug, Clone)]
pub struct KeyView {
    pub backend: String,
    pub model: String,
    pub view: View,
}

// === impl WindowConfig ===

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            bucket: Duration::from_secs(1),
            short: Duration::from_secs(10),
            stable: Duration::from_secs(60),
        }
    }
}

impl WindowConfig {
    pub fn try_new(
        bucket: Duration,
        short: Duration,
        stable: Duration,
    ) -> Result<Self, WindowConfigError> {
        if bucket < Duration::from_millis(10) {
            return Err(WindowConfigError::Bucket(bucket));
        }
        if short < bucket {
            return Err(WindowConfigError::Short { short, bucket });
        }
        if stable < short {
            return Err(WindowConfigError::Stable { stable, short });
        }
        if stable.as_nanos().div_ceil(bucket.as_nanos()) > MAX_SLOTS {
            return Err(WindowConfigError::TooManyBuckets { stable, bucket });
        }
        Ok(WindowConfig {
            bucket,
            short,
            stable,
        })
    }

    pub fn bucket(&self) -> Duration {
        self.bucket
    }

    pub fn short(&self) -> Duration {
        self.short
    }

    pub fn stable(&self) -> Duration {
        self.stable
    }

    fn slots(&self) -> usize {
        // Bounded by MAX_SLOTS in try_new.
        self.stable.as_nanos().div_ceil(self.bucket.as_nanos()) as usize
    }
}

// === impl Latencies ===

impl Latencies {
    pub fn merge(&mut self, other: &Latencies) {
        self.ttft_us.merge(&other.ttft_us);
        self.tpot_us.merge(&other.tpot_us);
        self.itl_us.merge(&other.itl_us);
        self.e2e_us.merge(&other.e2e_us);
    }

    fn add(&mut self, reported: &ReportedLatencies) {
        self.ttft_us.merge_sparse(&reported.ttft_us);
        self.tpot_us.merge_sparse(&reported.tpot_us);
        self.itl_us.merge_sparse(&reported.itl_us);
        self.e2e_us.merge_sparse(&reported.e2e_us);
    }

    fn clear(&mut self) {
        self.ttft_us.clear();
        self.tpot_us.clear();
        self.itl_us.clear();
        self.e2e_us.clear();
    }
}

// === impl InFlight ===

impl InFlight {
    pub fn total(&self) -> u64 {
        self.waiting_first_token.saturating_add(self.decoding)
    }

    fn add(&mut self, other: InFlight) {
        self.waiting_first_token = self
            .waiting_first_token
            .saturating_add(other.waiting_first_token);
        self.decoding = self.decoding.saturating_add(other.decoding);
    }

    fn sub(&mut self, other: InFlight) {
        self.waiting_first_token = self
            .waiting_first_token
            .saturating_sub(other.waiting_first_token);
        self.decoding = self.decoding.saturating_sub(other.decoding);
    }
}

// === impl InFlightTime ===

impl InFlightTime {
    fn add(&mut self, other: InFlightTime) {
        self.waiting_first_token_us = self
            .waiting_first_token_us
            .saturating_add(other.waiting_first_token_us);
        self.decoding_us = self.decoding_us.saturating_add(other.decoding_us);
    }

    /// `in_flight` held for `span`.
    fn held(in_flight: InFlight, span: Duration) -> Self {
        let us = u64::try_from(span.as_micros()).unwrap_or(u64::MAX);
        InFlightTime {
            waiting_first_token_us: in_flight.waiting_first_token.saturating_mul(us),
            decoding_us: in_flight.decoding.saturating_mul(us),
        }
    }
}

// === impl Totals ===

impl Totals {
    fn merge(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
    }

    fn add(&mut self, delta: &Delta) {
        self.requests = self.requests.saturating_add(delta.requests.total());
        self.errors = self.errors.saturating_add(delta.requests.errors());
        self.input_tokens = self.input_tokens.saturating_add(delta.tokens.input);
        self.output_tokens = self.output_tokens.saturating_add(delta.tokens.output);
    }
}

// === impl Window ===

impl Window {
    pub fn new(config: &WindowConfig, epoch: Instant) -> Self {
        Window {
            width: config.bucket,
            width_ns: u64::try_from(config.bucket.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            epoch,
            slots: vec![Slot::default(); config.slots()],
        }
    }

    fn bucket_of(&self, now: Instant) -> u64 {
        // u64 nanoseconds reach 584 years past the epoch.
        let since = now.saturating_duration_since(self.epoch);
        let since_ns = since
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(since.subsec_nanos()));
        since_ns / self.width_ns
    }

    /// The slot of `bucket`, recycled if it holds an older bucket; `None` if it holds a newer one.
    fn slot_for(&mut self, bucket: u64) -> Option<&mut Slot> {
        let len = self.slots.len() as u64;
        let slot = self.slots.get_mut((bucket % len) as usize)?;
        if slot.index != Some(bucket) {
            if slot.index.is_some_and(|old| old > bucket) {
                // A late writer racing a newer one: the bucket it belongs to is already gone.
                return None;
            }
            slot.reset(bucket);
        }
        Some(slot)
    }

    /// When `bucket` starts.
    fn start_of(&self, bucket: u64) -> Instant {
        self.epoch + Duration::from_nanos(self.width_ns.saturating_mul(bucket))
    }

    /// Adds a delta to the bucket holding `now`.
    pub fn record(&mut self, now: Instant, delta: &Delta) {
        let Some(slot) = self.slot_for(self.bucket_of(now)) else {
            return;
        };
        slot.requests.add(&delta.requests);
        slot.tokens.add(&delta.tokens);
        slot.latency.add(&delta.latency);
    }

    /// Adds `in_flight`, held from `from` to `to`, to the buckets that span overlaps (those
    /// still kept), each its part.
    pub fn accrue_in_flight(&mut self, from: Instant, to: Instant, in_flight: InFlight) {
        if in_flight.total() == 0 || to <= from {
            return;
        }
        let last = self.bucket_of(to);
        let from_bucket = self.bucket_of(from);
        if from_bucket == last {
            // Gateways report more often than buckets turn: most spans fall in one.
            if let Some(slot) = self.slot_for(last) {
                slot.in_flight.add(InFlightTime::held(in_flight, to - from));
            }
            return;
        }
        let kept = self.slots.len() as u64;
        let first = from_bucket.max(last.saturating_sub(kept - 1));
        for bucket in first..=last {
            let start = self.start_of(bucket).max(from);
            let end = self.start_of(bucket.saturating_add(1)).min(to);
            let span = end.saturating_duration_since(start);
            if span.is_zero() {
                continue;
            }
            if let Some(slot) = self.slot_for(bucket) {
                slot.in_flight.add(InFlightTime::held(in_flight, span));
            }
        }
    }

    /// Adds a delta that accumulated since `since` (a reporter's backlog after a silence): its
    /// counts are shared out over the buckets from `since` (or the oldest kept) to `now`, so
    /// the short window sees the rate they came at, not one burst; its latencies, samples rather
    /// than rates, go to the bucket holding `now`. The shares add up to the delta exactly.
    pub fn record_over(&mut self, since: Instant, now: Instant, delta: &Delta) {
        let last = self.bucket_of(now);
        let kept = self.slots.len() as u64;
        let first = self.bucket_of(since).max(last.saturating_sub(kept - 1));
        let parts = last - first.min(last) + 1;
        if parts == 1 {
            return self.record(now, delta);
        }
        for (i, bucket) in (first..=last).enumerate() {
            let share = |total: u64| share(total, parts, i as u64);
            let part = Delta {
                requests: split_outcomes(&delta.requests, share),
                tokens: split_tokens(&delta.tokens, share),
                latency: ReportedLatencies::default(),
            };
            if bucket == last {
                let part = Delta {
                    latency: delta.latency.clone(),
                    ..part
                };
                self.record(now, &part);
            } else {
                self.record(self.start_of(bucket), &part);
            }
        }
    }

    /// The figures of the buckets overlapping the `span` before `now`.
    pub fn summary(&self, now: Instant, span: Duration) -> WindowSummary {
        let current = self.bucket_of(now);
        let wanted = span.as_nanos().div_ceil(self.width.as_nanos()).max(1);
        let n = u64::try_from(wanted)
            .unwrap_or(u64::MAX)
            .min(self.slots.len() as u64);
        let oldest = current.saturating_sub(n - 1);
        let mut summary = WindowSummary::default();
        for slot in &self.slots {
            if let Some(index) = slot.index
                && (oldest..=current).contains(&index)
            {
                summary.requests.add(&slot.requests);
                summary.tokens.add(&slot.tokens);
                summary.latency.merge(&slot.latency);
                summary.in_flight.add(slot.in_flight);
            }
        }
        // The oldest bucket's start to now: the time the summed deltas arrived in.
        let since_ns = now.saturating_duration_since(self.epoch).as_nanos();
        let covered_ns = since_ns.saturating_sub(u128::from(oldest) * self.width.as_nanos());
        let covered = Duration::from_nanos(u64::try_from(covered_ns).unwrap_or(u64::MAX));
        summary.spanned = covered;
        summary.covered = covered.max(self.width);
        summary
    }

    /// Adds `other`'s buckets to this window's. Both must share the epoch and configuration
    /// (all windows of one [`Windows`] do), so a bucket sits at the same slot in both.
    fn merge(&mut self, other: &Window) {
        for (mine, theirs) in self.slots.iter_mut().zip(&other.slots) {
            let Some(index) = theirs.index else {
                continue;
            };
            if mine.index != Some(index) {
                if mine.index.is_some_and(|old| old > index) {
                    continue;
                }
                mine.reset(index);
            }
            mine.requests.add(&theirs.requests);
            mine.tokens.add(&theirs.tokens);
            mine.latency.merge(&theirs.latency);
            mine.in_flight.add(theirs.in_flight);
        }
    }
}

impl Slot {
    fn reset(&mut self, index: u64) {
        self.index = Some(index);
        self.requests = RequestOutcomes::default();
        self.tokens = TokenUsage::default();
        self.latency.clear();
        self.in_flight = InFlightTime::default();
    }
}

// === impl WindowSummary ===

impl WindowSummary {
    fn per_s(&self, n: u64) -> f64 {
        n as f64 / self.covered.as_secs_f64()
    }

    pub fn requests_per_s(&self) -> f64 {
        self.per_s(self.requests.total())
    }

    pub fn errors_per_s(&self) -> f64 {
        self.per_s(self.requests.errors())
    }

    pub fn input_tokens_per_s(&self) -> f64 {
        self.per_s(self.tokens.input)
    }

    pub fn output_tokens_per_s(&self) -> f64 {
        self.per_s(self.tokens.output)
    }

    /// Requests waiting for their first token, on average over the time spanned.
    pub fn mean_waiting(&self) -> f64 {
        self.in_flight.waiting_first_token_us as f64 / self.spanned.as_micros().max(1) as f64
    }

    /// Requests decoding, on average over the time spanned.
    pub fn mean_decoding(&self) -> f64 {
        self.in_flight.decoding_us as f64 / self.spanned.as_micros().max(1) as f64
    }

    /// Adds `in_flight`, held since `since` and not yet in the buckets, for the part of the
    /// spanned time ending at `now` it overlaps.
    fn accrue_open(&mut self, in_flight: InFlight, since: Option<Instant>, now: Instant) {
        let Some(since) = since else { return };
        let start = now
            .checked_sub(self.spanned)
            .map_or(since, |s| s.max(since));
        self.in_flight.add(InFlightTime::held(
            in_flight,
            now.saturating_duration_since(start),
        ));
    }
}

// === impl Selector ===

impl Selector {
    pub fn matches(&self, backend: &str, model: &str) -> bool {
        self.backend.as_deref().is_none_or(|b| b == backend)
            && self.model.as_deref().is_none_or(|m| m == model)
    }
}

// === impl Windows ===

impl Windows {
    /// `epoch` is when the service started: rates just after it cover the time since.
    pub fn new(config: WindowConfig, epoch: Instant, max_keys: usize) -> Self {
        Windows {
            config,
            epoch,
            max_keys,
            index: HashMap::new(),
            keys: Vec::new(),
            free: Vec::new(),
            pools: Vec::new(),
            heard_since: None,
        }
    }

    pub fn config(&self) -> &WindowConfig {
        &self.config
    }

    /// Replaces the pools; pool `i` of the result is `selectors[i]`. See [`Windows::assign_pools`].
    pub fn set_pools(&mut self, selectors: Vec<Selector>) {
        self.assign_pools(
            selectors
                .into_iter()
                .enumerate()
                .map(|(i, selector)| (PoolId(i), selector))
                .collect(),
        );
    }

    /// Replaces the pools with `pools`; ids not listed are dropped. A pool whose id keeps its
    /// selector keeps its windows and totals. A new id on a selector a pool had before (its
    /// autoscaler renamed, its target renamed, split into prefill and decode) takes over that
    /// pool's: rebuilt from its keys, its totals since start would lose every key evicted as
    /// idle. Any other is rebuilt from the windows of the keys it selects (a pool is the sum of
    /// its keys), so an autoscaler added while traffic flows starts with full windows rather
    /// than empty ones that would read as a drop in load; keys evicted before are not in its
    /// totals.
    pub fn assign_pools(&mut self, pools: Vec<(PoolId, Selector)>) {
        let mut old = std::mem::take(&mut self.pools);
        let len = pools.iter().map(|(id, _)| id.0 + 1).max().unwrap_or(0);
        self.pools = (0..len).map(|_| None).collect();
        for (id, selector) in &pools {
            let kept = old
                .get_mut(id.0)
                .and_then(|slot| slot.take_if(|p| p.selector == *selector));
            if let Some(slot) = self.pools.get_mut(id.0) {
                *slot = kept;
            }
        }
        for (id, selector) in pools {
            if self.pools.get(id.0).is_some_and(Option::is_some) {
                continue;
            }
            let before = old
                .iter()
                .chain(&self.pools)
                .flatten()
                .find(|p| p.selector == selector)
                .cloned();
            let pool = before.unwrap_or_else(|| self.rebuild(selector));
            if let Some(slot) = self.pools.get_mut(id.0) {
                *slot = Some(pool);
            }
        }
        for key in self.keys.iter_mut().flatten() {
            key.pools.clear();
        }
        for pool in self.pools.iter_mut().flatten() {
            pool.keys.clear();
        }
        for (k, key) in self.keys.iter_mut().enumerate() {
            let Some(key) = key else { continue };
            for (p, pool) in self.pools.iter_mut().enumerate() {
                if let Some(pool) = pool
                    && pool.selector.matches(&key.backend, &key.model)
                {
                    key.pools.push(PoolId(p));
                    pool.keys.push(KeyId(k as u32));
                }
            }
        }
    }

    /// A pool for `selector` with the history of the keys it selects.
    fn rebuild(&self, selector: Selector) -> PoolState {
        let mut pool = PoolState {
            selector,
            window: Window::new(&self.config, self.epoch),
            totals: Totals::default(),
            keys: Vec::new(),
            last_update: None,
        };
        for key in self.keys.iter().flatten() {
            if pool.selector.matches(&key.backend, &key.model) {
                pool.window.merge(&key.window);
                pool.totals.merge(&key.totals);
                pool.last_update = pool.last_update.max(key.last_update);
            }
        }
        pool
    }

    pub fn pool_count(&self) -> usize {
        self.pools.iter().flatten().count()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len() - self.free.len()
    }

    /// The key's id, registering it on first sight; `None` once `max_keys` keys exist.
    pub fn key(&mut self, backend: &str, model: &str) -> Option<KeyId> {
        if let Some(id) = self.index.get(backend).and_then(|m| m.get(model)) {
            return Some(*id);
        }
        if self.key_count() >= self.max_keys {
            return None;
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.keys.push(None);
                KeyId(u32::try_from(self.keys.len() - 1).ok()?)
            }
        };
        let mut pools = Vec::new();
        let mut selectors: Vec<&Selector> = Vec::new();
        for (p, pool) in self.pools.iter_mut().enumerate() {
            if let Some(pool) = pool
                && pool.selector.matches(backend, model)
            {
                pools.push(PoolId(p));
                pool.keys.push(id);
                if !selectors.contains(&&pool.selector) {
                    selectors.push(&pool.selector);
                }
            }
        }
        if selectors.len() > 1 {
            // Selectors on different fields ({backend} and {model}) are allowed to meet, as
            // they mostly do not: where they do, each autoscaler sizes for all of this key.
            tracing::warn!(
                backend,
                model,
                selectors = ?selectors,
                "telemetry selected by more than one autoscaler: each sizes its pools for all of it"
            );
        }
        self.keys[id.0 as usize] = Some(KeyState {
            backend: backend.into(),
            model: model.into(),
            window: Window::new(&self.config, self.epoch),
            totals: Totals::default(),
            in_flight: InFlight::default(),
            in_flight_since: None,
            pools,
            last_update: None,
        });
        self.index
            .entry(backend.into())
            .or_default()
            .insert(model.into(), id);
        Some(id)
    }

    /// The pools a key feeds.
    pub fn pools_of(&self, key: KeyId) -> &[PoolId] {
        self.state(key).map_or(&[], |k| k.pools.as_slice())
    }

    /// The pools a key would feed, whether it is registered or not.
    pub fn pools_selecting(&self, backend: &str, model: &str) -> Vec<PoolId> {
        self.pools
            .iter()
            .enumerate()
            .filter(|(_, pool)| {
                pool.as_ref()
                    .is_some_and(|pool| pool.selector.matches(backend, model))
            })
            .map(|(p, _)| PoolId(p))
            .collect()
    }

    /// Evicts the keys with nothing in flight and no delta since `idle_for` before `now`, so
    /// models long gone free their place under `max_keys`; returns their ids, which later keys
    /// reuse (whoever holds one must forget it). The pools keep their windows and totals.
    pub fn evict_idle(&mut self, now: Instant, idle_for: Duration) -> Vec<KeyId> {
        let mut evicted = Vec::new();
        for (k, slot) in self.keys.iter_mut().enumerate() {
            let idle = slot.as_ref().is_some_and(|key| {
                key.in_flight.total() == 0
                    && key
                        .last_update
                        .is_none_or(|at| now.saturating_duration_since(at) >= idle_for)
            });
            if !idle {
                continue;
            }
            let Some(key) = slot.take() else { continue };
            let id = KeyId(k as u32);
            if let Some(models) = self.index.get_mut(&key.backend) {
                models.remove(&key.model);
                if models.is_empty() {
                    self.index.remove(&key.backend);
                }
            }
            for pool in &key.pools {
                if let Some(Some(pool)) = self.pools.get_mut(pool.0) {
                    pool.keys.retain(|k| *k != id);
                }
            }
            evicted.push(id);
        }
        self.free.extend_from_slice(&evicted);
        evicted
    }

    fn state(&self, key: KeyId) -> Option<&KeyState> {
        self.keys.get(key.0 as usize)?.as_ref()
    }

    /// Merges one key's deltas into its window and its pools' windows: at `now`, or shared
    /// out from `since` when they are a backlog ([`Window::record_over`]).
    pub fn record(&mut self, key: KeyId, since: Option<Instant>, now: Instant, delta: &Delta) {
        let Some(state) = self.keys.get_mut(key.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        let record = |window: &mut Window| match since {
            Some(since) => window.record_over(since, now, delta),
            None => window.record(now, delta),
        };
        record(&mut state.window);
        state.totals.add(delta);
        // `now` may be in the past (a report held through a hand-over): never move back.
        state.last_update = state.last_update.max(Some(now));
        for pool in &state.pools {
            if let Some(Some(pool)) = self.pools.get_mut(pool.0) {
                record(&mut pool.window);
                pool.totals.add(delta);
                pool.last_update = pool.last_update.max(Some(now));
            }
        }
    }

    /// Replaces one gateway's contribution to a key's in-flight sum at `now`, first adding the
    /// sum as it held until then to the key's and its pools' windows.
    pub fn replace_in_flight(&mut self, key: KeyId, old: InFlight, new: InFlight, now: Instant) {
        let Some(state) = self.keys.get_mut(key.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        if let Some(since) = state.in_flight_since
            && since < now
            && state.in_flight.total() > 0
        {
            state.window.accrue_in_flight(since, now, state.in_flight);
            for pool in &state.pools {
                if let Some(Some(pool)) = self.pools.get_mut(pool.0) {
                    pool.window.accrue_in_flight(since, now, state.in_flight);
                }
            }
        }
        // Merges and sweeps read the clock before they take the lock, so `now` may be behind the
        // last change: never move back.
        state.in_flight_since = state.in_flight_since.max(Some(now));
        state.in_flight.sub(old);
        state.in_flight.add(new);
    }

    /// A report arrived at `now`: requests in flight are known from the first one on.
    pub fn note_heard(&mut self, now: Instant) {
        self.heard_since = Some(self.heard_since.map_or(now, |since| since.min(now)));
    }

    /// `window`'s figures over `span` before `now`, their time in flight spanning no earlier than
    /// the first report heard.
    fn summary(&self, window: &Window, now: Instant, span: Duration) -> WindowSummary {
        let mut summary = window.summary(now, span);
        if let Some(since) = self.heard_since {
            summary.spanned = summary.spanned.min(now.saturating_duration_since(since));
        }
        summary
    }

    pub fn pool(&self, pool: PoolId, now: Instant) -> Option<View> {
        let state = self.pools.get(pool.0)?.as_ref()?;
        let mut view = View {
            short: self.summary(&state.window, now, self.config.short),
            stable: self.summary(&state.window, now, self.config.stable),
            totals: state.totals,
            in_flight: InFlight::default(),
            last_update: state.last_update,
        };
        for key in &state.keys {
            if let Some(key) = self.state(*key) {
                view.hold_in_flight(key, now);
            }
        }
        Some(view)
    }

    pub fn keys(&self, now: Instant) -> Vec<KeyView> {
        self.keys
            .iter()
            .flatten()
            .map(|key| {
                let mut view = View {
                    short: self.summary(&key.window, now, self.config.short),
                    stable: self.summary(&key.window, now, self.config.stable),
                    totals: key.totals,
                    in_flight: InFlight::default(),
                    last_update: key.last_update,
                };
                view.hold_in_flight(key, now);
                KeyView {
                    backend: key.backend.to_string(),
                    model: key.model.to_string(),
                    view,
                }
            })
            .collect()
    }
}

/// Part `i` of `parts` of `total`: equal parts, the remainder on the newest ones.
fn share(total: u64, parts: u64, i: u64) -> u64 {
    total / parts + u64::from(i >= parts - total % parts)
}

fn split_outcomes(all: &RequestOutcomes, share: impl Fn(u64) -> u64) -> RequestOutcomes {
    RequestOutcomes {
        ok: share(all.ok),
        client_error: share(all.client_error),
        server_error: share(all.server_error),
        upstream_reset: share(all.upstream_reset),
        client_cancel: share(all.client_cancel),
    }
}

fn split_tokens(all: &TokenUsage, share: impl Fn(u64) -> u64) -> TokenUsage {
    TokenUsage {
        input: share(all.input),
        output: share(all.output),
        input_estimated: share(all.input_estimated),
        output_estimated: share(all.output_estimated),
        requests_estimated: share(all.requests_estimated),
        requests_unmeasured: share(all.requests_unmeasured),
    }
}

#[cfg(test)]
mod tests;
