//! Cluster-wide metrics: workers ship counter deltas and HdrHistogram deltas (V2
//! encoding); the coordinator merges them per (metric, plugin). Percentiles are
//! computed only from merged histograms: averaging per-worker percentiles would be
//! wrong.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;

use rollout_core::protocol::MetricDeltas;

/// Largest encoded histogram accepted from a worker.
pub const HISTOGRAM_BYTES_MAX: usize = 64 * 1024;
/// Most distinct (metric, plugin) series kept; deltas for new series beyond it are dropped.
pub const SERIES_MAX: usize = 4096;

/// Percentiles of one merged latency histogram, in microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySummary {
    /// The metric's name.
    pub metric: String,
    /// The plugin.
    pub plugin: String,
    /// Samples merged.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

/// Merged counters and histograms.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    counters: BTreeMap<(String, String), u64>,
    histograms: BTreeMap<(String, String), Histogram<u64>>,
    rejected_deltas: u64,
}

impl ClusterMetrics {
    /// Merges one worker's deltas. Malformed or oversized histograms are counted in
    /// [`ClusterMetrics::rejected_deltas`] and otherwise ignored: metrics never fail a beat.
    pub fn merge(&mut self, deltas: &MetricDeltas) {
        for (name, plugin, delta) in &deltas.counters {
            let key = (name.clone(), plugin.clone());
            if self.counters.len() >= SERIES_MAX && !self.counters.contains_key(&key) {
                self.rejected_deltas += 1;
                continue;
            }
            let c = self.counters.entry(key).or_default();
            *c = c.saturating_add(*delta);
        }
        for (name, plugin, bytes) in &deltas.histograms {
            let key = (name.clone(), plugin.clone());
            let decoded = (bytes.len() <= HISTOGRAM_BYTES_MAX)
                .then(|| Deserializer::new().deserialize::<u64, _>(&mut bytes.as_slice()).ok())
                .flatten();
            let Some(delta) = decoded else {
                self.rejected_deltas += 1;
                continue;
            };
            if self.histograms.len() >= SERIES_MAX && !self.histograms.contains_key(&key) {
                self.rejected_deltas += 1;
                continue;
            }
            // A decoded histogram has a fixed range; the merged one must grow to fit any worker's.
            let merged = self.histograms.entry(key).or_insert_with(|| {
                let mut h = Histogram::new(3).expect("3 significant figures is a valid precision");
                h.auto(true);
                h
            });
            if merged.add(&delta).is_err() {
                self.rejected_deltas += 1;
            }
        }
    }

    /// The merged value of a counter.
    pub fn counter(&self, name: &str, plugin: &str) -> u64 {
        self.counters.get(&(name.to_owned(), plugin.to_owned())).copied().unwrap_or(0)
    }

    /// Every counter, in (name, plugin) order.
    pub fn counters(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.counters.iter().map(|((n, p), v)| (n.as_str(), p.as_str(), *v))
    }

    /// Percentiles of every merged histogram, in (name, plugin) order.
    pub fn latencies(&self) -> Vec<LatencySummary> {
        self.histograms
            .iter()
            .map(|((metric, plugin), h)| LatencySummary {
                metric: metric.clone(),
                plugin: plugin.clone(),
                count: h.len(),
                p50_us: h.value_at_quantile(0.50),
                p90_us: h.value_at_quantile(0.90),
                p99_us: h.value_at_quantile(0.99),
                max_us: h.max(),
            })
            .collect()
    }

    /// Deltas that were malformed, oversized or beyond the series bound.
    pub fn rejected_deltas(&self) -> u64 {
        self.rejected_deltas
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::{Serializer, V2Serializer};

    fn encoded(samples: &[u64]) -> Vec<u8> {
        let mut h = Histogram::<u64>::new(3).expect("valid sigfig");
        for s in samples {
            h.record(*s).expect("in range");
        }
        let mut out = Vec::new();
        V2Serializer::new().serialize(&h, &mut out).expect("serializes");
        out
    }

    #[test]
    fn percentiles_come_from_the_merged_histogram() {
        // Worker A saw 99 fast tasks, worker B one slow one: the merged p99 is fast,
        // the merged max is slow. Averaging per-worker p99s would say ~5000.
        let mut m = ClusterMetrics::default();
        let fast: Vec<u64> = vec![100; 99];
        m.merge(&MetricDeltas { counters: vec![], histograms: vec![("lat".into(), "echo".into(), encoded(&fast))] });
        m.merge(&MetricDeltas {
            counters: vec![],
            histograms: vec![("lat".into(), "echo".into(), encoded(&[10_000]))],
        });
        let s = &m.latencies()[0];
        assert_eq!(s.count, 100);
        assert!(s.p99_us <= 101, "{s:?}");
        assert!(s.max_us >= 9_990, "{s:?}");
    }

    #[test]
    fn counters_add_up_and_garbage_is_rejected() {
        let mut m = ClusterMetrics::default();
        for _ in 0..3 {
            m.merge(&MetricDeltas {
                counters: vec![("tasks_succeeded".into(), "echo".into(), 5)],
                histograms: vec![("lat".into(), "echo".into(), vec![1, 2, 3])],
            });
        }
        assert_eq!(m.counter("tasks_succeeded", "echo"), 15);
        assert_eq!(m.rejected_deltas(), 3);
        assert!(m.latencies().is_empty());
    }
}
