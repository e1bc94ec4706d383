//! The worker's metric deltas: counters and task-latency histograms per plugin,
//! accumulated between shipments and reset after each.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use rollout_core::protocol::MetricDeltas;

use rollout_core::protocol::metric::{
    HISTOGRAM_SIGNIFICANT_DIGITS as LATENCY_SIGNIFICANT_DIGITS, HISTOGRAM_VALUE_MAX as LATENCY_US_MAX,
};
pub use rollout_core::protocol::metric::{
    PLUGIN_RESTARTS, TASK_LATENCY_US, TASKS_CANCELLED, TASKS_FAILED, TASKS_STARTED, TASKS_SUCCEEDED, UNKNOWN_PLUGIN,
};

/// Deltas since the last shipment. Keys are bounded by the advertised plugins
/// (plus [`UNKNOWN_PLUGIN`]) times the fixed metric names.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    counters: BTreeMap<(&'static str, String), u64>,
    latency_us: BTreeMap<String, Histogram<u64>>,
}

impl Metrics {
    /// Adds one to `counter` of `plugin`.
    pub(crate) fn count(&mut self, counter: &'static str, plugin: &str) {
        self.add(counter, plugin, 1);
    }

    /// Adds `n` to `counter` of `plugin` (nothing for 0).
    pub(crate) fn add(&mut self, counter: &'static str, plugin: &str, n: u64) {
        if n == 0 {
            return;
        }
        let value = self.counters.entry((counter, plugin.to_owned())).or_insert(0);
        *value = value.saturating_add(n);
    }

    /// Records one task latency of `plugin`.
    pub(crate) fn record_latency(&mut self, plugin: &str, latency: Duration) {
        let histogram = self.latency_us.entry(plugin.to_owned()).or_insert_with(|| {
            Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid")
        });
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        histogram.saturating_record(micros);
    }

    /// Whether nothing was recorded since the last shipment.
    pub(crate) fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.latency_us.values().all(Histogram::is_empty)
    }

    /// The deltas in key order, then everything reset to zero.
    pub(crate) fn take(&mut self) -> MetricDeltas {
        let counters = std::mem::take(&mut self.counters)
            .into_iter()
            .map(|((name, plugin), delta)| (name.to_owned(), plugin, delta))
            .collect();
        let mut histograms = Vec::new();
        let mut serializer = V2Serializer::new();
        for (plugin, histogram) in &mut self.latency_us {
            if histogram.is_empty() {
                continue;
            }
            let mut bytes = Vec::new();
            // Writing to a Vec cannot fail; should the encoder refuse anyway, the
            // histogram is dropped from this shipment rather than failing the worker.
            if serializer.serialize(histogram, &mut bytes).is_ok() {
                histograms.push((TASK_LATENCY_US.to_owned(), plugin.clone(), bytes));
            }
            // Reset, not remove: the counts array is reused next interval.
            histogram.reset();
        }
        MetricDeltas { counters, histograms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn deltas_decode_and_reset() {
        let mut m = Metrics::default();
        m.count(TASKS_SUCCEEDED, "echo");
        m.count(TASKS_SUCCEEDED, "echo");
        m.count(TASKS_STARTED, "echo");
        m.record_latency("echo", Duration::from_millis(3));
        m.record_latency("echo", Duration::from_secs(100 * 24 * 3600));
        assert!(!m.is_empty());
        let deltas = m.take();
        assert_eq!(
            deltas.counters,
            vec![
                ("tasks_started".to_owned(), "echo".to_owned(), 1),
                ("tasks_succeeded".to_owned(), "echo".to_owned(), 2)
            ]
        );
        assert_eq!(deltas.histograms.len(), 1);
        let (name, plugin, bytes) = &deltas.histograms[0];
        assert_eq!((name.as_str(), plugin.as_str()), (TASK_LATENCY_US, "echo"));
        let h: Histogram<u64> = Deserializer::new().deserialize(&mut bytes.as_slice()).expect("V2 decodes");
        assert_eq!(h.len(), 2);
        assert!(h.equivalent(h.min(), 3_000));
        assert!(h.equivalent(h.max(), LATENCY_US_MAX), "beyond the range saturates");
        assert!(m.is_empty(), "take resets");
        assert_eq!(m.take(), MetricDeltas::default());
    }
}
