//! Reference models the tests judge the machines by, written apart from them.
//!
//! [`SelfFenceOracle`]: the self-fence rule rebuilt from the wire, not taken from the
//! worker machine (the simulator consults it after every worker step, the worker's
//! property test after every input). A worker may start or submit work of a
//! registration only before the send time (on its own monotonic clock) of the latest
//! Register or Heartbeat of that registration whose answer reached it, plus the
//! `worker_self_fence_timeout` of the coordinator's answer. The machine keeps its own
//! deadline; the oracle rebuilds one from what the worker sent and received, so a
//! wrongly computed deadline in the machine (from an answer's arrival rather than its
//! request's departure, from the wrong beat, with the config's timeout rather than the
//! coordinator's) is caught.
//!
//! The oracle is at least as permissive as the rule (the latest Register of a round
//! rather than the oldest), so it never fails a correct worker.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::protocol::{ToCoordinator, ToWorker};
use crate::{Incarnation, Mono};

/// Unanswered beats remembered.
const BEATS_KEPT: usize = 1024;
/// Registrations remembered (the newest).
const INCARNATIONS_KEPT: usize = 16;

/// One worker process's view, rebuilt from its messages.
#[derive(Debug, Default)]
pub struct SelfFenceOracle {
    /// Send time of the latest Register (whichever of them an answer answers, it was
    /// sent no later than this).
    latest_register: Option<Mono>,
    /// Send times of the beats not yet answered, by (incarnation, beat seq).
    beats: BTreeMap<(Incarnation, u64), Mono>,
    /// Per adopted registration: the latest send time answered, and the fence timeout.
    alive: BTreeMap<Incarnation, (Mono, Duration)>,
}

impl SelfFenceOracle {
    /// The worker process sent `msg` at `mono`.
    pub fn sent(&mut self, mono: Mono, msg: &ToCoordinator) {
        match msg {
            ToCoordinator::Register(_) => self.latest_register = Some(mono),
            ToCoordinator::Heartbeat(beat) => {
                self.beats.insert((beat.incarnation, beat.beat_seq), mono);
                // Beats whose answers were lost pile up; one sent this long ago could
                // not move a deadline past the ones after it anyway.
                while self.beats.len() > BEATS_KEPT {
                    self.beats.pop_first();
                }
            }
            ToCoordinator::Pull(_) | ToCoordinator::Submit(_) => {}
        }
    }

    /// The worker process received `msg`.
    pub fn received(&mut self, msg: &ToWorker) {
        match msg {
            ToWorker::Registered { incarnation, terms, .. } => {
                if let Some(latest) = self.latest_register {
                    let grant = self.alive.entry(*incarnation).or_insert((latest, terms.worker_self_fence_timeout));
                    grant.0 = grant.0.max(latest);
                    // A process acts only for its newest registrations.
                    while self.alive.len() > INCARNATIONS_KEPT {
                        self.alive.pop_first();
                    }
                }
            }
            ToWorker::HeartbeatAck { incarnation, beat_seq, reregister: false } => {
                let sent = self.beats.get(&(*incarnation, *beat_seq)).copied();
                if let (Some(sent), Some((latest, _))) = (sent, self.alive.get_mut(incarnation)) {
                    *latest = (*latest).max(sent);
                }
                self.beats.retain(|(i, seq), _| i != incarnation || seq > beat_seq);
            }
            _ => {}
        }
    }

    /// Why starting or submitting work of `incarnation` at `mono` breaks the rule, if
    /// it does.
    pub fn judge(&self, mono: Mono, incarnation: Incarnation) -> Result<(), String> {
        let Some(&(latest, timeout)) = self.alive.get(&incarnation) else {
            return Err(format!("acts for {incarnation}, which no answer it received granted"));
        };
        let deadline = latest.as_duration() + timeout;
        if mono.as_duration() >= deadline {
            return Err(format!(
                "acts for {incarnation} at mono {:?}, at or past {deadline:?} (latest answered send at {:?} + \
                 worker_self_fence_timeout {timeout:?})",
                mono.as_duration(),
                latest.as_duration()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthConfig;
    use crate::protocol::{Heartbeat, Register, WorkerTerms};
    use std::time::SystemTime;

    fn at(ms: u64) -> Mono {
        Mono::from_duration(Duration::from_millis(ms))
    }

    fn beat(incarnation: Incarnation, seq: u64) -> ToCoordinator {
        ToCoordinator::Heartbeat(Heartbeat {
            incarnation,
            beat_seq: seq,
            due_at: SystemTime::UNIX_EPOCH,
            running: Vec::new(),
            assigns_through: 0,
            metrics: None,
        })
    }

    fn register() -> ToCoordinator {
        ToCoordinator::Register(Register {
            protocol_version: 1,
            plugins: Vec::new(),
            slots: 1,
            inventory: Default::default(),
            boot: 7,
            adopted: None,
        })
    }

    fn registered(incarnation: Incarnation, fence_ms: u64) -> ToWorker {
        let health = HealthConfig { worker_self_fence_timeout: Duration::from_millis(fence_ms), ..Default::default() };
        ToWorker::Registered { incarnation, terms: WorkerTerms::new(&health, 1 << 20), assigns_sent: 0 }
    }

    #[test]
    fn the_deadline_runs_from_the_send_of_the_latest_answered_request() {
        let inc = Incarnation(3);
        let mut o = SelfFenceOracle::default();
        assert!(o.judge(at(0), inc).is_err(), "nothing granted yet");
        o.sent(at(100), &register());
        o.received(&registered(inc, 1_000));
        assert!(o.judge(at(1_099), inc).is_ok());
        assert!(o.judge(at(1_100), inc).is_err(), "deadline is the Register's send + 1 s");
        o.sent(at(600), &beat(inc, 1));
        o.sent(at(900), &beat(inc, 2));
        // Beat 2's answer arrives late, at 1.5 s: the deadline moves to 900 + 1000, not
        // to the arrival + 1000.
        o.received(&ToWorker::HeartbeatAck { incarnation: inc, beat_seq: 2, reregister: false });
        assert!(o.judge(at(1_899), inc).is_ok());
        let err = o.judge(at(1_900), inc).expect_err("past");
        assert!(err.contains("worker_self_fence_timeout"), "{err}");
        // An older beat's answer does not move it back; a reregister answer moves nothing.
        o.received(&ToWorker::HeartbeatAck { incarnation: inc, beat_seq: 1, reregister: false });
        assert!(o.judge(at(1_899), inc).is_ok());
        o.sent(at(1_200), &beat(inc, 3));
        o.received(&ToWorker::HeartbeatAck { incarnation: inc, beat_seq: 3, reregister: true });
        assert!(o.judge(at(1_900), inc).is_err());
        // Another incarnation's grant is its own.
        assert!(o.judge(at(10), Incarnation(2)).is_err());
    }
}
