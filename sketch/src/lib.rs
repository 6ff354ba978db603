//! Mergeable log-bucketed histograms (DDSketch's logarithmic mapping, dense buckets).
//!
//! The filter records latencies into a [`Sketch`] per (backend, model) key, the control service
//! merges the sketches of every gateway into its windows (each report's as a [`SparseSketch`],
//! its occupied buckets alone, checked as a [`Sketch`] would be), and the simulators use the same
//! type, so a quantile means the same thing everywhere. Bucket `i` holds values `v` with
//! `gamma^(i-1) < v <= gamma^i`, `gamma = (1 + a) / (1 - a)`: a bucket's representative value
//! `2 gamma^i / (gamma + 1)` is within relative error `a` ([`RELATIVE_ACCURACY`], 2%) of every value
//! in it, and two sketches merge exactly by adding their bucket counts.
//!
//! Why not the `sketches-ddsketch` crate: flyball needs the bucket layout itself on the wire
//! (`flyball.v1.Sketch`: offset + contiguous counts, or the occupied buckets alone when they are
//! few and far apart, [`sparse_from_dense`]) and a hard bound on memory for any input, and
//! that crate keeps both private. This one is small, has no dependencies and builds for wasm32.
//!
//! Values are unit-free `f64`s; flyball records microseconds. Values below [`MIN_VALUE`] count as
//! zero, values above [`MAX_VALUE`] (and NaN or infinities) count as [`MAX_VALUE`] (the last
//! bucket, and the sketch's max), so memory stays below [`MAX_BUCKETS`] counters whatever is
//! recorded and every sketch recorded survives the wire. Nothing here panics on input.
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::OnceLock;

/// The relative error bound of every quantile and bucket value: 2%.
pub const RELATIVE_ACCURACY: f64 = 0.02;

/// Smallest value with a bucket of its own; smaller ones count as zero (1 us when recording us).
pub const MIN_VALUE: f64 = 1.0;

/// Largest value kept exactly; larger ones land in the last bucket (1e12 us is 11.6 days).
pub const MAX_VALUE: f64 = 1.0e12;

/// Number of buckets between [`MIN_VALUE`] and [`MAX_VALUE`]: the memory bound of one sketch.
pub const MAX_BUCKETS: usize = (MAX_INDEX + 1) as usize;

const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);
// ceil(ln(MAX_VALUE) / ln(GAMMA)) for the 2% mapping; `max_index_matches_mapping` pins it.
const MAX_INDEX: i32 = 691;

/// Why a sketch received from elsewhere was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SketchError {
    #[error(
        "relative_accuracy = {0}: must be {RELATIVE_ACCURACY} (sketches of other accuracies do not merge)"
    )]
    Accuracy(f64),
    #[error("occupied buckets {first}..={last}: must lie within 0..={MAX_INDEX}")]
    BucketRange { first: i64, last: i64 },
    #[error("counts add up to more than 2^64")]
    CountOverflow,
    #[error("sparse_gaps has {gaps} entries and sparse_counts {counts}: one gap per count")]
    SparseLengths { gaps: usize, counts: usize },
    #[error("sparse_gaps[{index}] = 0: each occupied bucket lies past the one before")]
    SparseGapZero { index: usize },
    #[error("counts and sparse_counts are both set: a sketch is sent in one form or the other")]
    DenseAndSparse,
    #[error("{field} = {value}: must be a finite number")]
    NotFinite { field: &'static str, value: f64 },
    #[error("{field} = {value}: must lie within 0..={MAX_VALUE}, as every recorded value does")]
    OutOfRange { field: &'static str, value: f64 },
    #[error("min = {min} is above max = {max}")]
    MinAboveMax { min: f64, max: f64 },
    #[error("{field} = {value}: its buckets put the {field} near {buckets_say}")]
    SummaryOutsideBuckets {
        field: &'static str,
        value: f64,
        /// The value of the bucket that holds the sketch's `field` (0 for the zero bucket).
        buckets_say: f64,
    },
}

/// A mergeable histogram with a 2% relative error bound. See the crate docs.
#[derive(Clone, Default, PartialEq)]
pub struct Sketch {
    /// Bucket index of `counts[0]`; meaningless while `counts` is empty.
    offset: i32,
    counts: Vec<u64>,
    zero_count: u64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

/// A sketch received and checked, kept as its occupied buckets: what the control service merges
/// each report's sketches into its windows from. A report's sketch spans a wide range of buckets
/// with few of them occupied; built dense, each would be a few KiB zeroed and added bucket by
/// bucket into every window it joins. Made by [`SparseSketch::from_buckets`] (so it holds what
/// a [`Sketch`] may) or from a [`Sketch`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseSketch {
    /// (index, count), each count non-zero and each index within `0..=MAX_INDEX`.
    buckets: Vec<(i64, u64)>,
    /// The lowest and highest index in `buckets`; meaningless while it is empty.
    lowest: i32,
    highest: i32,
    zero_count: u64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

/// The occupied buckets of `counts` (contiguous buckets from some offset), sparsely: each as its
/// distance from the previous occupied bucket (the first from the offset) and its count.
pub fn sparse_from_dense(counts: &[u64]) -> impl Iterator<Item = (u32, u64)> + '_ {
    let mut previous = None;
    counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(move |(at, &n)| {
            let gap = at - previous.unwrap_or(0);
            previous = Some(at);
            // Within a sketch, bucket positions are below MAX_BUCKETS.
            (u32::try_from(gap).unwrap_or(u32::MAX), n)
        })
}

/// The occupied buckets of contiguous `counts` from bucket `offset` on, as (index, count) pairs
/// for [`SparseSketch::from_buckets`].
pub fn dense_buckets(
    offset: i32,
    counts: impl IntoIterator<Item = u64>,
) -> impl Iterator<Item = (i64, u64)> {
    let offset = i64::from(offset);
    (counts.into_iter().enumerate())
        .filter(|&(_, n)| n > 0)
        .map(move |(at, n)| (offset + at as i64, n))
}

/// Appends the buckets of a sketch given sparsely (see [`sparse_from_dense`]) to `buckets`, as
/// (index, count) pairs for [`SparseSketch::from_buckets`]: bucket `offset + gaps[0]` holds
/// `counts[0]`, and each next one lies `gaps[i]` past the one before. Refuses gaps and counts of
/// different lengths and a zero gap past the first; where the buckets land is
/// [`SparseSketch::from_buckets`]'s to check.
pub fn sparse_buckets(
    offset: i32,
    gaps: impl ExactSizeIterator<Item = u32>,
    counts: impl ExactSizeIterator<Item = u64>,
    buckets: &mut Vec<(i64, u64)>,
) -> Result<(), SketchError> {
    if gaps.len() != counts.len() {
        return Err(SketchError::SparseLengths {
            gaps: gaps.len(),
            counts: counts.len(),
        });
    }
    let mut index = i64::from(offset);
    for (at, (gap, n)) in gaps.zip(counts).enumerate() {
        if gap == 0 && at > 0 {
            return Err(SketchError::SparseGapZero { index: at });
        }
        index += i64::from(gap);
        buckets.push((index, n));
    }
    Ok(())
}

/// The raw parts of a sketch, as they travel in `flyball.v1.Sketch`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SketchParts<'a> {
    pub relative_accuracy: f64,
    pub offset: i32,
    pub counts: &'a [u64],
    pub zero_count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

// === impl Sketch ===

impl Sketch {
    pub const fn new() -> Self {
        Sketch {
            offset: 0,
            counts: Vec::new(),
            zero_count: 0,
            count: 0,
            sum: 0.0,
            min: 0.0,
            max: 0.0,
        }
    }

    /// The bucket index of `value`, or `None` for values that count as zero.
    pub fn bucket_index(value: f64) -> Option<i32> {
        if value.is_nan() {
            return Some(MAX_INDEX);
        }
        if value < MIN_VALUE {
            return None;
        }
        if value >= MAX_VALUE {
            return Some(MAX_INDEX);
        }
        // `as` saturates, and the clamp keeps float error at the edges inside the range.
        let index = (value.ln() / GAMMA.ln()).ceil() as i32;
        Some(index.clamp(0, MAX_INDEX))
    }

    /// The value every member of bucket `index` is reported as.
    pub fn bucket_value(index: i32) -> f64 {
        2.0 * GAMMA.powi(index) / (GAMMA + 1.0)
    }

    pub fn record(&mut self, value: f64) {
        self.record_n(value, 1);
    }

    pub fn record_n(&mut self, value: f64, n: u64) {
        if n == 0 {
            return;
        }
        // Clamped into 0..=MAX_VALUE, min, max and sum too: the wire refuses a sketch whose max
        // lies beyond (as a forged one would), so an unclamped 23-day stream would make the
        // sketch unreadable and lose every sample merged with it.
        let finite = if value.is_finite() {
            value.clamp(0.0, MAX_VALUE)
        } else {
            MAX_VALUE
        };
        match Self::bucket_index(finite) {
            None => self.zero_count = self.zero_count.saturating_add(n),
            Some(index) => self.add_to_bucket(index, n),
        }
        self.note_summary(finite, finite, n, finite * n as f64);
    }

    /// Adds every value of `other` to `self`. Exact: the result is the sketch of both inputs.
    pub fn merge(&mut self, other: &Sketch) {
        if other.count == 0 {
            return;
        }
        // Control merges every report's sketches into two windows: widen once to cover
        // `other`'s buckets, then add slice to slice, instead of a bounds check per bucket.
        if let (Some(first), Some(last)) = (
            other.counts.iter().position(|&n| n > 0),
            other.counts.iter().rposition(|&n| n > 0),
        ) {
            let (lo, hi) = (other.offset + first as i32, other.offset + last as i32);
            self.cover(lo, hi);
            let at = (lo - self.offset) as usize;
            let added = &other.counts[first..=last];
            for (mine, &n) in self.counts[at..at + added.len()].iter_mut().zip(added) {
                *mine = mine.saturating_add(n);
            }
        }
        self.zero_count = self.zero_count.saturating_add(other.zero_count);
        self.note_summary(other.min, other.max, other.count, other.sum);
    }

    /// The value at quantile `q` (0..=1), within [`RELATIVE_ACCURACY`] of the nearest-rank
    /// percentile: the smallest recorded value that at least `q` of the values are at or below
    /// (the `ceil(q * count)`-th smallest), or `None` when the sketch is empty.
    ///
    /// Nearest rank because flyball reads quantiles against objectives: "p95 of TTFT <= 500 ms"
    /// then says that 95% of the requests met 500 ms (within the 2%). DDSketch's rank,
    /// `q * (count - 1)` rounded down, reads low when values are few: the p99 of three requests
    /// was the middle one, so one of three could miss an objective that read as met.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = nearest_rank(q, self.count);
        if rank < self.zero_count {
            return Some(self.min.min(MIN_VALUE));
        }
        let mut seen = self.zero_count;
        for (i, &n) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(n);
            if seen > rank {
                let value = Self::bucket_value(self.offset + i as i32);
                // Not `clamp`: it panics should `min > max` ever reach here.
                return Some(value.max(self.min).min(self.max));
            }
        }
        Some(self.max)
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Empties the sketch but keeps its bucket storage, so a reused sketch does not allocate
    /// again (wasm linear memory never shrinks).
    pub fn clear(&mut self) {
        self.counts.clear();
        *self = Sketch {
            counts: std::mem::take(&mut self.counts),
            ..Sketch::new()
        };
    }

    /// The raw parts, for the wire.
    pub fn parts(&self) -> SketchParts<'_> {
        SketchParts {
            relative_accuracy: RELATIVE_ACCURACY,
            offset: self.offset,
            counts: &self.counts,
            zero_count: self.zero_count,
            sum: self.sum,
            min: self.min,
            max: self.max,
        }
    }

    /// Rebuilds a sketch from its raw parts, refusing anything that would break the accuracy or
    /// the memory bound. Leading and trailing empty buckets are trimmed.
    pub fn from_parts(parts: SketchParts<'_>) -> Result<Sketch, SketchError> {
        let buckets = dense_buckets(parts.offset, parts.counts.iter().copied()).collect();
        let sparse = SparseSketch::from_buckets(parts, buckets)?;
        Ok(Sketch::from(&sparse))
    }

    /// Adds every value of `other` to `self`, as [`Sketch::merge`] does.
    pub fn merge_sparse(&mut self, other: &SparseSketch) {
        if other.count == 0 {
            return;
        }
        if !other.buckets.is_empty() {
            self.cover(other.lowest, other.highest);
            for &(index, n) in &other.buckets {
                if let Some(bucket) = self
                    .counts
                    .get_mut((index - i64::from(self.offset)) as usize)
                {
                    *bucket = bucket.saturating_add(n);
                }
            }
        }
        self.zero_count = self.zero_count.saturating_add(other.zero_count);
        self.note_summary(other.min, other.max, other.count, other.sum);
    }

    /// Widens `counts` so that buckets `lo..=hi` exist (`lo <= hi`).
    fn cover(&mut self, lo: i32, hi: i32) {
        if self.counts.is_empty() {
            self.offset = lo;
            self.counts.resize((hi - lo) as usize + 1, 0);
            return;
        }
        if lo < self.offset {
            let grow = (self.offset - lo) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = lo;
        }
        let end = (hi - self.offset) as usize + 1;
        if end > self.counts.len() {
            self.counts.resize(end, 0);
        }
    }

    fn add_to_bucket(&mut self, index: i32, n: u64) {
        if self.counts.is_empty() {
            self.offset = index;
            self.counts.push(n);
            return;
        }
        if index < self.offset {
            let grow = (self.offset - index) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = index;
        }
        let at = (index - self.offset) as usize;
        if at >= self.counts.len() {
            self.counts.resize(at + 1, 0);
        }
        self.counts[at] = self.counts[at].saturating_add(n);
    }

    fn note_summary(&mut self, min: f64, max: f64, n: u64, sum: f64) {
        if self.count == 0 {
            self.min = min;
            self.max = max;
        } else {
            self.min = self.min.min(min);
            self.max = self.max.max(max);
        }
        self.count = self.count.saturating_add(n);
        self.sum += sum;
    }
}

// === impl SparseSketch ===

impl SparseSketch {
    /// A sketch from its raw parts with the buckets given as (index, count) pairs, in any order,
    /// instead of `parts`' offset and counts (which are ignored): as they travel sparsely
    /// ([`sparse_buckets`]) or as a report's packed counts are read. Refuses anything
    /// [`Sketch::from_parts`] refuses, with the same errors; `buckets` becomes the sketch's own,
    /// its empty ones dropped, so nothing is allocated for buckets out of range.
    pub fn from_buckets(
        parts: SketchParts<'_>,
        mut buckets: Vec<(i64, u64)>,
    ) -> Result<SparseSketch, SketchError> {
        if parts.relative_accuracy != RELATIVE_ACCURACY {
            return Err(SketchError::Accuracy(parts.relative_accuracy));
        }
        for (field, value) in [("sum", parts.sum), ("min", parts.min), ("max", parts.max)] {
            if !value.is_finite() {
                return Err(SketchError::NotFinite { field, value });
            }
        }
        buckets.retain(|&(_, n)| n > 0);
        let mut count = parts.zero_count;
        let (mut first, mut last) = (i64::MAX, i64::MIN);
        for &(index, n) in &buckets {
            count = count.checked_add(n).ok_or(SketchError::CountOverflow)?;
            (first, last) = (first.min(index), last.max(index));
        }
        let occupied = (!buckets.is_empty()).then_some((first, last));
        if occupied.is_some() && (first < 0 || last > i64::from(MAX_INDEX)) {
            return Err(SketchError::BucketRange { first, last });
        }
        // Within 0..=MAX_INDEX when there are buckets: both fit an i32.
        let occupied = occupied.map(|(first, last)| (first as i32, last as i32));
        let mut sketch = SparseSketch {
            buckets,
            lowest: occupied.map_or(0, |(lo, _)| lo),
            highest: occupied.map_or(0, |(_, hi)| hi),
            zero_count: parts.zero_count,
            count,
            ..SparseSketch::default()
        };
        if count > 0 {
            // A summary no recording can produce would corrupt every quantile it merges into.
            for (field, value) in [("min", parts.min), ("max", parts.max)] {
                if !(0.0..=MAX_VALUE).contains(&value) {
                    return Err(SketchError::OutOfRange { field, value });
                }
            }
            if parts.sum < 0.0 {
                return Err(SketchError::OutOfRange {
                    field: "sum",
                    value: parts.sum,
                });
            }
            if parts.min > parts.max {
                return Err(SketchError::MinAboveMax {
                    min: parts.min,
                    max: parts.max,
                });
            }
            // Quantiles are clamped into min..=max, so a min or max its buckets contradict would
            // move every quantile of every window it merges into (one forged report could ask
            // for the pool's maximum). The lowest occupied bucket holds min, the highest max.
            let lowest = if parts.zero_count > 0 {
                None
            } else {
                occupied.map(|(lo, _)| lo)
            };
            check_summary("min", parts.min, lowest)?;
            check_summary("max", parts.max, occupied.map(|(_, hi)| hi))?;
            sketch.sum = parts.sum;
            sketch.min = parts.min;
            sketch.max = parts.max;
        }
        Ok(sketch)
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

impl From<&SparseSketch> for Sketch {
    fn from(sparse: &SparseSketch) -> Self {
        let mut sketch = Sketch::new();
        sketch.merge_sparse(sparse);
        sketch
    }
}

impl From<&Sketch> for SparseSketch {
    fn from(sketch: &Sketch) -> Self {
        let buckets: Vec<(i64, u64)> =
            dense_buckets(sketch.offset, sketch.counts.iter().copied()).collect();
        let lowest = buckets.first().map_or(0, |&(index, _)| index as i32);
        let highest = buckets.last().map_or(0, |&(index, _)| index as i32);
        SparseSketch {
            buckets,
            lowest,
            highest,
            zero_count: sketch.zero_count,
            count: sketch.count,
            sum: sketch.sum,
            min: sketch.min,
            max: sketch.max,
        }
    }
}

/// The 0-based rank of the nearest-rank `q`-quantile of `count` values: `ceil(q * count) - 1`,
/// at least 0. The product is nudged down by a few units of its last place first, so that one
/// a float's rounding lifts just past a whole number does not take the next value up:
/// `0.07 * 100` is 7.000000000000001, and `99.9 / 100` (a percentile as configured) is
/// 0.9990000000000001, which times 10^8 values lands 10^-8 past 99,900,000.
fn nearest_rank(q: f64, count: u64) -> u64 {
    let at_or_below = (q * count as f64 * (1.0 - 4.0 * f64::EPSILON)).ceil();
    (at_or_below as u64).clamp(1, count) - 1
}

impl fmt::Debug for Sketch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sketch")
            .field("count", &self.count)
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .field("min", &self.min())
            .field("max", &self.max())
            .finish()
    }
}

/// Checks that a sketch's `field` (min or max) lies in `bucket`, the one its buckets say holds
/// it (`None`: the zero bucket). One bucket of slack: the filter computes indices in wasm, whose
/// `ln` may round a value on a bucket's edge the other way.
fn check_summary(field: &'static str, value: f64, bucket: Option<i32>) -> Result<(), SketchError> {
    let agrees = surely_within_one_bucket(value, bucket)
        || match (Sketch::bucket_index(value), bucket) {
            (None, None) => true,
            (Some(index), Some(bucket)) => (index - bucket).abs() <= 1,
            _ => false,
        };
    if agrees {
        Ok(())
    } else {
        Err(SketchError::SummaryOutsideBuckets {
            field,
            value,
            buckets_say: bucket.map_or(0.0, Sketch::bucket_value),
        })
    }
}

/// Whether `value` lies inside buckets `bucket - 1 ..= bucket + 1` by a margin far beyond float
/// error, found without [`Sketch::bucket_index`]'s logarithm (two per sketch merged were ~2% of
/// the control service's CPU); false when unsure, for the logarithm to decide.
fn surely_within_one_bucket(value: f64, bucket: Option<i32>) -> bool {
    const MARGIN: f64 = 1e-9;
    let Some(bucket) = bucket.and_then(|b| usize::try_from(b).ok()) else {
        return false;
    };
    if !(MIN_VALUE..MAX_VALUE).contains(&value) {
        return false;
    }
    let ends = bucket_ends();
    let above = bucket.checked_sub(2).is_none_or(|below| {
        ends.get(below)
            .is_some_and(|&end| value > end * (1.0 + MARGIN))
    });
    let under = ends
        .get(bucket + 1)
        .is_some_and(|&end| value <= end * (1.0 - MARGIN));
    above && under
}

/// Where each bucket ends: bucket `i` holds the values in `(GAMMA^(i-1), GAMMA^i]`, as
/// [`Sketch::bucket_index`] computes by logarithm; one more past the last.
fn bucket_ends() -> &'static [f64; MAX_BUCKETS + 1] {
    static ENDS: OnceLock<[f64; MAX_BUCKETS + 1]> = OnceLock::new();
    ENDS.get_or_init(|| std::array::from_fn(|i| GAMMA.powi(i as i32)))
}

#[cfg(test)]
mod tests;
