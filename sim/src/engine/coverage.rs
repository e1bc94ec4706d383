//! What a run exercised: faults that had an observable effect, and the rare states the
//! system reached. A scenario names what it exists for (`exercises = [...]`), and
//! `cargo test -p sim` fails when its fixed seeds no longer reach one of them.

use rollout_core::history::HistoryEvent;

/// Counts of effects and states, by name (see [`Coverage::NAMES`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Stream messages a partition held back (delivered at the heal, or lost at a reset).
    pub held_messages: u64,
    /// Connections the keepalive declared dead.
    pub keepalive_resets: u64,
    /// Coordinator crashes that lost writes not yet synced.
    pub lost_unsynced: u64,
    /// Commits torn or reordered by a power cut, then recovered.
    pub torn_recovered: u64,
    /// Batches applied over a sync that then failed (dropped with it).
    pub sets_dropped: u64,
    /// Wall-clock steps that landed on a running node.
    pub clock_steps: u64,
    /// Submits rejected as stale (a fencing token no longer current).
    pub stale_rejected: u64,
    /// Workers declared failed by the coordinator.
    pub declared_failed: u64,
    /// Workers that fenced themselves.
    pub self_fenced: u64,
    /// Leases ended and the task queued again.
    pub requeued: u64,
    /// Tasks dead-lettered.
    pub dead_lettered: u64,
    /// Runs of one task overlapping on two workers (allowed beyond the skew budget).
    pub overlaps: u64,
    /// Work frames over the message limit (each broke its stream).
    pub frames_broken: u64,
    /// Unary calls lost or duplicated by the network.
    pub unary_lost_or_duplicated: u64,
    /// Work streams the coordinator saw closed from the worker's end (an ended
    /// incarnation's stream, or a dead process's FIN).
    pub work_closed: u64,
    /// Resets only the coordinator's end saw (the worker ran on, half-open).
    pub half_open: u64,
    /// Certificates renewed over the worker's link.
    pub certificates_renewed: u64,
    /// Workers stopped because their certificate expired unrenewed.
    pub certificates_expired: u64,
}

impl Coverage {
    /// Every name a scenario's `exercises` may use.
    pub const NAMES: [&'static str; 18] = [
        "held_messages",
        "keepalive_resets",
        "lost_unsynced",
        "torn_recovered",
        "sets_dropped",
        "clock_steps",
        "stale_rejected",
        "declared_failed",
        "self_fenced",
        "requeued",
        "dead_lettered",
        "overlaps",
        "frames_broken",
        "unary_lost_or_duplicated",
        "work_closed",
        "half_open",
        "certificates_renewed",
        "certificates_expired",
    ];

    /// The count of `name` (`None`: no such name).
    pub fn get(&self, name: &str) -> Option<u64> {
        Some(match name {
            "held_messages" => self.held_messages,
            "keepalive_resets" => self.keepalive_resets,
            "lost_unsynced" => self.lost_unsynced,
            "torn_recovered" => self.torn_recovered,
            "sets_dropped" => self.sets_dropped,
            "clock_steps" => self.clock_steps,
            "stale_rejected" => self.stale_rejected,
            "declared_failed" => self.declared_failed,
            "self_fenced" => self.self_fenced,
            "requeued" => self.requeued,
            "dead_lettered" => self.dead_lettered,
            "overlaps" => self.overlaps,
            "frames_broken" => self.frames_broken,
            "unary_lost_or_duplicated" => self.unary_lost_or_duplicated,
            "work_closed" => self.work_closed,
            "half_open" => self.half_open,
            "certificates_renewed" => self.certificates_renewed,
            "certificates_expired" => self.certificates_expired,
            _ => return None,
        })
    }

    /// Counts what a history record shows.
    pub(super) fn observe(&mut self, event: &HistoryEvent) {
        match event {
            HistoryEvent::StaleRejected { .. } => self.stale_rejected += 1,
            HistoryEvent::DeclaredFailed { .. } => self.declared_failed += 1,
            HistoryEvent::SelfFenced { .. } => self.self_fenced += 1,
            HistoryEvent::Requeued { .. } => self.requeued += 1,
            HistoryEvent::DeadLettered { .. } => self.dead_lettered += 1,
            _ => {}
        }
    }

    /// The names with a count above zero, with their counts.
    pub fn reached(&self) -> Vec<(&'static str, u64)> {
        Self::NAMES.iter().filter_map(|n| self.get(n).filter(|c| *c > 0).map(|c| (*n, c))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_its_own_field() {
        let mut c = Coverage::default();
        assert!(c.reached().is_empty());
        let fields = [
            &mut c.held_messages,
            &mut c.keepalive_resets,
            &mut c.lost_unsynced,
            &mut c.torn_recovered,
            &mut c.sets_dropped,
            &mut c.clock_steps,
            &mut c.stale_rejected,
            &mut c.declared_failed,
            &mut c.self_fenced,
            &mut c.requeued,
            &mut c.dead_lettered,
            &mut c.overlaps,
            &mut c.frames_broken,
            &mut c.unary_lost_or_duplicated,
            &mut c.work_closed,
            &mut c.half_open,
            &mut c.certificates_renewed,
            &mut c.certificates_expired,
        ];
        for (i, field) in fields.into_iter().enumerate() {
            *field = 100 + i as u64;
        }
        // Each name in its place in NAMES reads the field in the same place.
        for (i, name) in Coverage::NAMES.iter().enumerate() {
            assert_eq!(c.get(name), Some(100 + i as u64), "{name}");
        }
        assert_eq!(c.reached().len(), Coverage::NAMES.len());
        assert_eq!(c.get("nonsense"), None);
    }
}
