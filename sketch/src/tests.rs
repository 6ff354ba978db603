#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;

/// The nearest-rank percentile: the smallest value that at least `q` of `sorted` are at or
/// below, found by counting rather than by the formula under test.
fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len() as f64;
    sorted
        .iter()
        .enumerate()
        .find(|&(at, _)| (at + 1) as f64 >= q * n * (1.0 - 4.0 * f64::EPSILON))
        .map_or(f64::NAN, |(_, &v)| v)
}

fn within_accuracy(estimate: f64, truth: f64) -> bool {
    if truth < MIN_VALUE {
        return estimate <= MIN_VALUE;
    }
    (estimate - truth).abs() <= RELATIVE_ACCURACY * truth * (1.0 + 1e-9)
}

#[test]
fn max_index_matches_mapping() {
    let computed = (MAX_VALUE.ln() / GAMMA.ln()).ceil() as i32;
    assert_eq!(computed, MAX_INDEX);
}

#[test]
fn every_bucket_value_is_within_accuracy_of_its_members() {
    for index in 1..=MAX_INDEX {
        let low = GAMMA.powi(index - 1) * (1.0 + 1e-12);
        let high = GAMMA.powi(index);
        let value = Sketch::bucket_value(index);
        assert!(within_accuracy(value, low), "bucket {index} low");
        assert!(within_accuracy(value, high), "bucket {index} high");
        assert_eq!(Sketch::bucket_index(high * (1.0 - 1e-12)), Some(index));
    }
}

/// A percentile is read against an objective: "p99 <= target" must mean that 99% of the
/// requests met it, however few they were.
#[test]
fn a_high_percentile_of_few_values_is_their_largest() {
    let mut sketch = Sketch::new();
    for ms in [100.0, 200.0, 900.0] {
        sketch.record(ms * 1000.0);
    }
    assert!(within_accuracy(sketch.quantile(0.99).unwrap(), 900_000.0));
    assert!(within_accuracy(sketch.quantile(0.95).unwrap(), 900_000.0));
    // Two of three are at or below the second, so it is every quantile up to 2/3.
    assert!(within_accuracy(sketch.quantile(0.5).unwrap(), 200_000.0));
    assert!(within_accuracy(
        sketch.quantile(2.0 / 3.0).unwrap(),
        200_000.0
    ));
    assert!(within_accuracy(sketch.quantile(0.0).unwrap(), 100_000.0));
    // 95 of 100 at or below 10 ms: p95 is 10 ms, not the next value up; the 5 slow ones show
    // from p96.
    let mut hundred = Sketch::new();
    for at in 0..100 {
        hundred.record(if at < 95 { 10_000.0 } else { 1_000_000.0 });
    }
    assert!(within_accuracy(hundred.quantile(0.95).unwrap(), 10_000.0));
    assert!(within_accuracy(
        hundred.quantile(0.96).unwrap(),
        1_000_000.0
    ));
    // q * count rounds to just over a whole number here (0.07 * 100 = 7.000000000000001).
    let mut ranks = Sketch::new();
    for at in 1..=100 {
        ranks.record(f64::from(at) * 1000.0);
    }
    assert!(within_accuracy(ranks.quantile(0.07).unwrap(), 7000.0));
    // A percentile configured as 99.9 is 0.9990000000000001 as a quantile: over 10^8 values,
    // 99,900,000 of them fast, p99.9 is fast.
    let (fast, slow) = (Sketch::bucket_index(1_000.0), Sketch::bucket_index(1e6));
    let (fast, slow) = (fast.unwrap(), slow.unwrap());
    let mut counts = vec![0; (slow - fast + 1) as usize];
    counts[0] = 99_900_000;
    counts[(slow - fast) as usize] = 100_000;
    let many = Sketch::from_parts(SketchParts {
        relative_accuracy: RELATIVE_ACCURACY,
        offset: fast,
        counts: &counts,
        zero_count: 0,
        sum: 99_900_000.0 * 1_000.0 + 100_000.0 * 1e6,
        min: 1_000.0,
        max: 1e6,
    })
    .unwrap();
    assert!(within_accuracy(
        many.quantile(99.9 / 100.0).unwrap(),
        1_000.0
    ));
}

#[test]
fn empty_sketch_has_no_quantile() {
    let sketch = Sketch::new();
    assert_eq!(sketch.quantile(0.5), None);
    assert_eq!(sketch.min(), None);
    assert!(sketch.is_empty());
}

#[test]
fn garbage_values_stay_within_the_memory_bound() {
    let mut sketch = Sketch::new();
    for value in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -5.0,
        0.0,
        1e300,
        1e-300,
    ] {
        sketch.record(value);
    }
    assert_eq!(sketch.count(), 7);
    assert!(sketch.parts().counts.len() <= MAX_BUCKETS);
    assert!(sketch.sum().is_finite());
}

#[test]
fn clear_keeps_storage_and_forgets_values() {
    let mut sketch = Sketch::new();
    sketch.record(10.0);
    sketch.record(1e6);
    sketch.clear();
    assert!(sketch.is_empty());
    assert_eq!(sketch, Sketch::new());
    sketch.record(42.0);
    assert_eq!(sketch.count(), 1);
    assert!(within_accuracy(sketch.quantile(0.5).unwrap_or(0.0), 42.0));
}

#[test]
fn from_parts_refuses_other_accuracies_and_out_of_range_buckets() {
    let mut sketch = Sketch::new();
    sketch.record(100.0);
    let mut parts = sketch.parts();
    parts.relative_accuracy = 0.01;
    assert_eq!(Sketch::from_parts(parts), Err(SketchError::Accuracy(0.01)));
    let counts = [1u64];
    let parts = SketchParts {
        offset: MAX_INDEX + 1,
        counts: &counts,
        ..sketch.parts()
    };
    assert!(matches!(
        Sketch::from_parts(parts),
        Err(SketchError::BucketRange { .. })
    ));
    let parts = SketchParts {
        offset: -1,
        counts: &counts,
        ..sketch.parts()
    };
    assert!(matches!(
        Sketch::from_parts(parts),
        Err(SketchError::BucketRange { .. })
    ));
    let parts = SketchParts {
        sum: f64::NAN,
        ..sketch.parts()
    };
    assert!(matches!(
        Sketch::from_parts(parts),
        Err(SketchError::NotFinite { field: "sum", .. })
    ));
    let big = [u64::MAX, 1];
    let parts = SketchParts {
        offset: 3,
        counts: &big,
        ..sketch.parts()
    };
    assert_eq!(Sketch::from_parts(parts), Err(SketchError::CountOverflow));
}

#[test]
fn a_value_beyond_max_value_is_recorded_as_max_value_and_survives_the_wire() {
    // 2e12 us: a stream open 23 days. Kept unclamped in max and sum, the sketch was one the wire
    // refuses, and every sample merged with it was lost.
    let mut sketch = Sketch::new();
    sketch.record(5_000.0);
    sketch.record(2.0e12);
    assert_eq!(sketch.max(), Some(MAX_VALUE));
    assert_eq!(Sketch::from_parts(sketch.parts()), Ok(sketch));
}

#[test]
fn from_parts_refuses_a_summary_no_recording_produces() {
    let mut sketch = Sketch::new();
    sketch.record(100.0);
    let swapped = SketchParts {
        min: 1000.0,
        max: 10.0,
        ..sketch.parts()
    };
    assert_eq!(
        Sketch::from_parts(swapped),
        Err(SketchError::MinAboveMax {
            min: 1000.0,
            max: 10.0
        })
    );
    let huge = SketchParts {
        min: 1e300,
        max: 1e300,
        ..sketch.parts()
    };
    assert_eq!(
        Sketch::from_parts(huge),
        Err(SketchError::OutOfRange {
            field: "min",
            value: 1e300
        })
    );
    let negative = SketchParts {
        sum: -1.0,
        ..sketch.parts()
    };
    assert_eq!(
        Sketch::from_parts(negative).map_err(|e| e.to_string()),
        Err(format!(
            "sum = -1: must lie within 0..={MAX_VALUE}, as every recorded value does"
        ))
    );
    // An empty sketch's summary means nothing, so it is not judged.
    let empty = Sketch::new();
    let ignored = SketchParts {
        min: 5.0,
        max: 1.0,
        ..empty.parts()
    };
    assert_eq!(Sketch::from_parts(ignored), Ok(Sketch::new()));
}

proptest! {
    #[test]
    fn quantiles_are_within_the_stated_error(
        values in prop::collection::vec(0.0f64..1.0e9, 1..400),
        q in 0.0f64..=1.0,
    ) {
        let mut sketch = Sketch::new();
        for &v in &values { sketch.record(v); }
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let truth = exact_quantile(&sorted, q);
        let estimate = sketch.quantile(q).unwrap_or(f64::NAN);
        prop_assert!(within_accuracy(estimate, truth), "q={q} estimate={estimate} truth={truth}");
    }

    /// What an objective reads: at least `q` of the values lie at or below the quantile, and
    /// fewer than `q` below it, both within the sketch's error.
    #[test]
    fn the_quantile_splits_the_values_at_q(
        values in prop::collection::vec(1.0f64..1.0e9, 1..400),
        q in 0.0f64..=1.0,
    ) {
        let mut sketch = Sketch::new();
        for &v in &values { sketch.record(v); }
        let estimate = sketch.quantile(q).unwrap_or(f64::NAN);
        // The estimate is within RELATIVE_ACCURACY of the true value t: t <= e / (1 - a) and
        // t >= e / (1 + a).
        let (high, low) = (
            estimate / (1.0 - RELATIVE_ACCURACY) * (1.0 + 1e-9),
            estimate / (1.0 + RELATIVE_ACCURACY) * (1.0 - 1e-9),
        );
        let n = values.len() as f64;
        let at_or_below = values.iter().filter(|&&v| v <= high).count() as f64;
        let below = values.iter().filter(|&&v| v < low).count() as f64;
        prop_assert!(at_or_below >= q * n - 1e-9, "q={q}: {at_or_below} of {n} at or below {estimate}");
        prop_assert!(below < q * n.max(1.0) || q == 0.0 && below == 0.0,
            "q={q}: {below} of {n} below {estimate}");
    }

    #[test]
    fn merge_is_exact(
        a in prop::collection::vec(0.0f64..1.0e10, 0..200),
        b in prop::collection::vec(0.0f64..1.0e10, 0..200),
    ) {
        let mut left = Sketch::new();
        let mut right = Sketch::new();
        let mut both = Sketch::new();
        for &v in &a { left.record(v); both.record(v); }
        for &v in &b { right.record(v); both.record(v); }
        left.merge(&right);
        prop_assert_eq!(left.parts().counts, both.parts().counts);
        prop_assert_eq!(left.parts().offset, both.parts().offset);
        prop_assert_eq!(left.count(), both.count());
        prop_assert_eq!(left.min(), both.min());
        prop_assert_eq!(left.max(), both.max());
        prop_assert!((left.sum() - both.sum()).abs() <= 1e-6 * both.sum().max(1.0));
    }

    /// Merged from its occupied buckets, a sketch adds exactly what merging it whole adds, and
    /// its buckets may come in any order.
    #[test]
    fn a_sparse_sketch_merges_as_the_sketch_it_came_from(
        a in prop::collection::vec(0.0f64..1.0e10, 0..200),
        b in prop::collection::vec(0.0f64..1.0e10, 0..200),
        reversed in any::<bool>(),
    ) {
        let (mut left, mut right) = (Sketch::new(), Sketch::new());
        for &v in &a { left.record(v); }
        for &v in &b { right.record(v); }
        let parts = right.parts();
        let offset = i64::from(parts.offset);
        let mut buckets: Vec<(i64, u64)> =
            (parts.counts.iter().enumerate()).map(|(at, &n)| (offset + at as i64, n)).collect();
        if reversed {
            buckets.reverse();
        }
        let sparse = SparseSketch::from_buckets(parts, buckets).unwrap();
        if !reversed {
            prop_assert_eq!(&sparse, &SparseSketch::from(&right));
        }
        prop_assert_eq!(Sketch::from(&sparse), right.clone());
        let mut whole = left.clone();
        whole.merge(&right);
        left.merge_sparse(&sparse);
        prop_assert_eq!(left, whole);
    }

    #[test]
    fn parts_round_trip(values in prop::collection::vec(0.0f64..1.0e9, 0..100)) {
        let mut sketch = Sketch::new();
        for &v in &values { sketch.record(v); }
        let back = Sketch::from_parts(sketch.parts());
        prop_assert_eq!(back, Ok(sketch));
    }
}

/// Quantiles are clamped into min..=max: a min or max the buckets contradict would move them
/// all, so it is refused, naming the field; one bucket of slack is allowed for `ln` rounding.
#[test]
fn from_parts_refuses_a_min_or_max_its_buckets_contradict() {
    let mut sketch = Sketch::new();
    for value in [100.0, 120.0, 150.0] {
        sketch.record(value);
    }
    let forged_min = SketchParts {
        min: 1e6,
        max: 1e6,
        ..sketch.parts()
    };
    assert!(matches!(
        Sketch::from_parts(forged_min),
        Err(SketchError::SummaryOutsideBuckets { field: "min", .. })
    ));
    let forged_max = SketchParts {
        max: 5e6,
        ..sketch.parts()
    };
    assert!(matches!(
        Sketch::from_parts(forged_max),
        Err(SketchError::SummaryOutsideBuckets { field: "max", .. })
    ));
    // A min in the zero bucket when nothing counts as zero, and the other way round.
    let zero_min = SketchParts {
        min: 0.5,
        ..sketch.parts()
    };
    assert!(matches!(
        Sketch::from_parts(zero_min),
        Err(SketchError::SummaryOutsideBuckets { field: "min", .. })
    ));
    let mut with_zero = sketch.clone();
    with_zero.record(0.25);
    let min_above_zero = SketchParts {
        min: 100.0,
        ..with_zero.parts()
    };
    assert!(matches!(
        Sketch::from_parts(min_above_zero),
        Err(SketchError::SummaryOutsideBuckets { field: "min", .. })
    ));
    assert_eq!(Sketch::from_parts(with_zero.parts()), Ok(with_zero));
    // One bucket off (a value on an edge rounded the other way) still merges.
    let edge = SketchParts {
        min: 100.0 / (1.0 + RELATIVE_ACCURACY) / (1.0 + RELATIVE_ACCURACY),
        ..sketch.parts()
    };
    assert!(Sketch::from_parts(edge).is_ok());
    let message = Sketch::from_parts(forged_min).map_or_else(|e| e.to_string(), |_| String::new());
    assert!(
        message.starts_with("min = 1000000: its buckets put the min near 101.5"),
        "{message}"
    );
}

proptest! {
    /// The summary check's shortcut accepts only what the logarithm accepts, and takes every
    /// value well inside its own bucket.
    #[test]
    fn the_summary_shortcut_agrees_with_the_logarithm(
        anywhere in prop_oneof![0.0..10.0f64, 1.0..2.0e12f64],
        bucket in 0i32..=MAX_INDEX,
        // Values on the edges of the band the shortcut may accept: bucket - 2's end, bucket + 1's.
        edge in prop_oneof![Just(None), (-3i32..=2).prop_map(Some)],
        nudge in -4i32..=4,
    ) {
        let value = edge.map_or(anywhere, |edge| GAMMA.powi(bucket + edge))
            * (1.0 + f64::from(nudge) * f64::EPSILON);
        if surely_within_one_bucket(value, Some(bucket)) {
            let index = Sketch::bucket_index(value);
            prop_assert!(
                index.is_some_and(|i| (i - bucket).abs() <= 1),
                "{value} in bucket {index:?}, said within one of {bucket}"
            );
        }
        if let Some(own) =
            Sketch::bucket_index(value).filter(|_| (MIN_VALUE..MAX_VALUE).contains(&value))
        {
            let middle = Sketch::bucket_value(own);
            prop_assert!(surely_within_one_bucket(middle, Some(own)), "{middle} in {own}");
        }
    }
}
