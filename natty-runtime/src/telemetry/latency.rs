//! A latency histogram that records with three relaxed atomic adds and no lock, exported to
//! Prometheus like prometheus-client's own (whose `observe` takes a mutex per call: once per
//! delivered message here), and readable bucket by bucket, so the console can tell the p50
//! and p99 of the last minute from two snapshots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds: 0.5 ms doubling to ~16 s (handlers and stores span that range), then +Inf.
const FIRST_BOUND_NANOS: u64 = 500_000;
/// Finite buckets.
const FINITE: usize = 16;
/// Buckets with the implicit +Inf one.
pub(crate) const BUCKETS: usize = FINITE + 1;

/// The upper bound of bucket `i`, in seconds (+Inf for the last).
pub(crate) fn bound_seconds(i: usize) -> f64 {
    if i >= FINITE {
        f64::INFINITY
    } else {
        (FIRST_BOUND_NANOS << i) as f64 / 1e9
    }
}

/// The bucket a duration of `nanos` falls in: the first whose bound is at least it.
fn bucket_of(nanos: u64) -> usize {
    if nanos <= FIRST_BOUND_NANOS {
        return 0;
    }
    // ceil(nanos / first) rounded up to a power of two: its exponent is the bucket.
    let ratio = nanos.div_ceil(FIRST_BOUND_NANOS);
    let exponent = (u64::BITS - (ratio - 1).leading_zeros()) as usize;
    exponent.min(FINITE)
}

#[derive(Debug, Default)]
struct Inner {
    /// Counts per bucket, not cumulative (cumulated when encoded).
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

/// A latency histogram; clones share their counts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Latency(Arc<Inner>);

impl Latency {
    /// Records one duration.
    pub(crate) fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.0.buckets[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The counts per bucket as of now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot(std::array::from_fn(|i| self.0.buckets[i].load(Ordering::Relaxed)))
    }
}

/// Counts per bucket at one moment (not cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Snapshot(pub(crate) [u64; BUCKETS]);

impl Snapshot {
    /// Adds `other`'s counts (several consumers of one handler).
    pub(crate) fn add(&mut self, other: &Snapshot) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    /// What was recorded since `earlier`.
    pub(crate) fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot(std::array::from_fn(|i| self.0[i].saturating_sub(earlier.0[i])))
    }

    /// Observations counted.
    pub(crate) fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile (0..=1) in milliseconds, interpolated within its bucket as Prometheus'
    /// `histogram_quantile` does; `None` with no observations. Past the last finite bound it
    /// is that bound.
    pub(crate) fn quantile_ms(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * count as f64;
        let mut below = 0u64;
        for (i, &n) in self.0.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                if i >= FINITE {
                    return Some(bound_seconds(FINITE - 1) * 1e3);
                }
                let low = if i == 0 { 0.0 } else { bound_seconds(i - 1) };
                let high = bound_seconds(i);
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some((low + (high - low) * within) * 1e3);
            }
            below += n;
        }
        Some(bound_seconds(FINITE - 1) * 1e3)
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.snapshot();
        // Per bucket: the encoder cumulates them.
        let buckets: Vec<(f64, u64)> = counts
            .0
            .iter()
            .enumerate()
            .map(|(i, n)| (bound_seconds(i), *n))
            .collect();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_falls_in_the_first_bucket_whose_bound_is_at_least_it() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(500_000), 0);
        assert_eq!(bucket_of(500_001), 1);
        assert_eq!(bucket_of(1_000_000), 1);
        assert_eq!(bucket_of(1_000_001), 2);
        assert_eq!(bucket_of(2_000_000), 2);
        for i in 0..FINITE {
            let bound = (bound_seconds(i) * 1e9).round() as u64;
            assert_eq!(bucket_of(bound), i, "bound {i}");
            assert_eq!(bucket_of(bound + 1), i + 1, "past bound {i}");
        }
        assert_eq!(bucket_of(u64::MAX), FINITE);
    }

    #[test]
    fn quantiles_come_from_the_counts_recorded_since_a_snapshot() {
        let latency = Latency::default();
        for _ in 0..1000 {
            latency.observe(Duration::from_millis(100));
        }
        let before = latency.snapshot();
        for _ in 0..98 {
            latency.observe(Duration::from_micros(300));
        }
        for _ in 0..2 {
            latency.observe(Duration::from_millis(3));
        }
        let recent = latency.snapshot().since(&before);
        assert_eq!(recent.count(), 100);
        let p50 = recent.quantile_ms(0.5).unwrap();
        assert!(p50 <= 0.5, "{p50}");
        let p99 = recent.quantile_ms(0.99).unwrap();
        assert!((2.0..=4.0).contains(&p99), "{p99}");
        assert_eq!(Snapshot::default().quantile_ms(0.5), None);
    }

    #[test]
    fn it_encodes_as_a_cumulative_prometheus_histogram() {
        let mut registry = prometheus_client::registry::Registry::default();
        let latency = Latency::default();
        registry.register("took", "time", latency.clone());
        latency.observe(Duration::from_millis(1));
        latency.observe(Duration::from_secs(100));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("took_bucket{le=\"0.001\"} 1"), "{text}");
        assert!(text.contains("took_bucket{le=\"16.384\"} 1"), "{text}");
        assert!(text.contains("took_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("took_count 2"), "{text}");
        assert!(text.contains("took_sum 100.001"), "{text}");
    }
}
