//! The simulated network: one link per worker, FIFO per direction like a TCP stream,
//! with latency, partitions that hold stream messages back (TCP retransmits), resets
//! that lose them, keepalives that notice a dead connection, and unary calls that may
//! overtake, be lost or be duplicated.

use std::collections::VecDeque;

use rollout_core::framing;
use rollout_core::protocol::{Channel, ToCoordinator, ToWorker};
use rollout_core::{Incarnation, TaskId};
use rollout_worker::WorkerInput;

use super::report::MessageRecord;
use super::{Ev, NS_PER_MS, Sim};
use crate::liveness::Env;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    /// Worker → coordinator.
    Up = 0,
    /// Coordinator → worker.
    Down = 1,
}

/// A message on a link, either way.
#[derive(Debug, Clone)]
pub(super) enum Wire {
    Up(ToCoordinator),
    Down(ToWorker),
    /// The worker's end of the Work stream of this incarnation closed (END_STREAM or a
    /// cancel, sent once the incarnation's runs stopped): the coordinator's transport
    /// turns it into `CoordinatorInput::WorkClosed`.
    WorkClosed(Incarnation),
}

impl Wire {
    pub(super) fn dir(&self) -> Dir {
        match self {
            Wire::Up(_) | Wire::WorkClosed(_) => Dir::Up,
            Wire::Down(_) => Dir::Down,
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            Wire::Up(m) => m.kind(),
            Wire::Down(m) => m.kind(),
            Wire::WorkClosed(_) => "work_closed",
        }
    }

    /// Unary calls (Register, Heartbeat and their answers) travel on their own HTTP/2
    /// streams; everything else on the worker's Work and Control streams.
    pub(super) fn unary(&self) -> bool {
        self.channel() == Channel::Unary
    }

    pub(super) fn channel(&self) -> Channel {
        match self {
            Wire::Up(m) => m.channel(),
            Wire::Down(m) => m.channel(),
            Wire::WorkClosed(_) => Channel::Work,
        }
    }

    /// Its size in a Work frame (the protocol's upper bound on the encoded size).
    fn work_entry_bytes(&self) -> usize {
        match self {
            Wire::Up(m) => m.work_entry_bytes(),
            Wire::Down(m) => m.work_entry_bytes(),
            Wire::WorkClosed(_) => None,
        }
        .unwrap_or(0)
    }

    /// The task it is about, for the timeline.
    fn task(&self) -> Option<TaskId> {
        match self {
            Wire::Up(ToCoordinator::Submit(s)) => Some(s.task),
            Wire::Down(ToWorker::Assign(a)) => Some(a.task),
            Wire::Down(ToWorker::SubmitAck { task, .. }) => Some(*task),
            _ => None,
        }
    }
}

/// One direction of a link.
#[derive(Default)]
pub(super) struct Half {
    pub(super) blocked: bool,
    /// When the last stream message sent this way arrives (FIFO).
    last: u64,
    /// Stream messages held by a partition, delivered in order when it heals.
    held: VecDeque<(Wire, Option<u32>)>,
}

/// One coordinator–worker connection.
#[derive(Default)]
pub(super) struct Link {
    /// Bumped on reset: messages sent on an older connection are lost.
    pub(super) conn: u64,
    halves: [Half; 2],
    /// Extra one-way latency of a slow link.
    pub(super) extra_ns: u64,
    /// Bumped whenever the link becomes blocked: a keepalive check of an older
    /// blocking is void.
    blocked_generation: u64,
    /// The coordinator end of this connection lost power: nothing comes back on it, and
    /// a restarted coordinator answers its next message with a reset.
    peer_gone: bool,
    /// The coordinator's end was reset and the worker's end does not know yet (a
    /// middlebox's RST reached one side): nothing gets through, and the worker's next
    /// message (or keepalive) is answered with a reset.
    pub(super) half_open: bool,
}

impl Link {
    pub(super) fn half(&self, dir: Dir) -> &Half {
        &self.halves[dir as usize]
    }

    pub(super) fn half_mut(&mut self, dir: Dir) -> &mut Half {
        &mut self.halves[dir as usize]
    }

    pub(super) fn blocked(&self, dir: Dir) -> bool {
        self.half(dir).blocked
    }

    fn blocked_any(&self) -> bool {
        self.halves.iter().any(|h| h.blocked)
    }

    /// What the liveness checker is told about this link.
    pub(super) fn env(&self) -> Env {
        Env::Link { up: !self.blocked(Dir::Up), down: !self.blocked(Dir::Down) }
    }

    /// Forgets everything held (the connection is gone); the held messages' log
    /// indexes, to mark them lost.
    fn drop_held(&mut self) -> Vec<Option<u32>> {
        self.halves.iter_mut().flat_map(|h| h.held.drain(..).map(|(_, r)| r)).collect()
    }
}

impl Sim {
    pub(super) fn latency(&mut self) -> u64 {
        let [lo, hi] = self.scenario.network.latency_us;
        (lo + self.rng_net.below(hi - lo + 1)) * 1_000
    }

    /// Logs a message for the timeline; its index.
    fn log_message(&mut self, w: usize, msg: &Wire, at: Option<u64>) -> Option<u32> {
        if !self.options.record {
            return None;
        }
        let record = MessageRecord {
            worker: w,
            up: msg.dir() == Dir::Up,
            kind: msg.kind(),
            task: msg.task(),
            sent_ns: self.now,
            delivered_ns: at,
        };
        self.message_log.push(record);
        Some((self.message_log.len() - 1) as u32)
    }

    fn set_delivery(&mut self, rec: Option<u32>, at: Option<u64>) {
        if let Some(r) = rec.and_then(|r| self.message_log.get_mut(r as usize)) {
            r.delivered_ns = at;
        }
    }

    /// A message sent but dropped on arrival (reset, partition, dead receiver).
    fn lost_in_flight(&mut self, w: usize, rec: Option<u32>) {
        self.messages.1 += 1;
        self.set_delivery(rec, None);
        let id = self.workers[w].id.clone();
        self.liveness.worker_env(self.now, &id, Env::Disturbed);
    }

    /// When a message sent now on link `w` arrives: none if it is lost at once.
    /// Stream messages keep FIFO order per direction; unary calls may overtake, and may
    /// be lost or duplicated (a client retry after a lost answer).
    fn arrival(&mut self, w: usize, dir: Dir, unary: bool) -> Vec<u64> {
        if self.links[w].blocked(dir) {
            return Vec::new();
        }
        let extra = self.links[w].extra_ns;
        let at = self.now + self.latency() + extra;
        if !unary {
            let half = self.links[w].half_mut(dir);
            let at = at.max(half.last);
            half.last = at;
            return vec![at];
        }
        let net = &self.scenario.network;
        let (loss, dup) = (net.unary_loss, net.unary_duplicate);
        if loss > 0.0 && self.rng_net.unit_f64() < loss {
            self.coverage.unary_lost_or_duplicated += 1;
            return Vec::new();
        }
        if dir == Dir::Up && dup > 0.0 && self.rng_net.unit_f64() < dup {
            self.coverage.unary_lost_or_duplicated += 1;
            let again = self.now + self.latency() + extra;
            return vec![at, again];
        }
        vec![at]
    }

    /// Sends `msg` on link `w`.
    pub(super) fn send(&mut self, w: usize, msg: Wire) {
        self.messages.0 += 1;
        let (dir, unary) = (msg.dir(), msg.unary());
        if self.links[w].half_open {
            // The coordinator's end is gone: lost, and a message of the worker's is
            // answered with a reset by the coordinator's kernel.
            self.messages.1 += 1;
            self.log_message(w, &msg, None);
            if dir == Dir::Up {
                let conn = self.links[w].conn;
                let at = self.now + 2 * self.latency() + 2 * self.links[w].extra_ns;
                self.push(at, Ev::ResetBack { w, conn });
            }
            return;
        }
        if self.links[w].blocked(dir) && !unary {
            self.coverage.held_messages += 1;
            let rec = self.log_message(w, &msg, None);
            self.links[w].half_mut(dir).held.push_back((msg, rec));
            return;
        }
        let arrivals = self.arrival(w, dir, unary);
        if arrivals.is_empty() {
            self.messages.1 += 1;
            self.log_message(w, &msg, None);
            let id = self.workers[w].id.clone();
            self.liveness.worker_env(self.now, &id, Env::Disturbed);
            return;
        }
        let conn = self.links[w].conn;
        for at in arrivals {
            let rec = self.log_message(w, &msg, Some(at));
            self.push(at, Ev::Deliver { w, conn, msg: msg.clone(), rec });
        }
    }

    /// Sends one burst of Work-stream messages on link `w` the way the transport does:
    /// cut into frames of at most `limits.max_message_bytes` (acks before assignments
    /// down; pulls after every submit up). A frame over the limit cannot be encoded:
    /// like tonic, the sender's stream ends there with an error, the frames before it
    /// still go out, and the worker's transport reports the broken stream once they are
    /// through. With the planted bug `frames_by_count`, a burst is one frame whatever
    /// its size (the framing before the fix).
    pub(super) fn send_work(&mut self, w: usize, burst: Vec<Wire>) {
        let Some(dir) = burst.first().map(Wire::dir) else { return };
        let limit = self.max_message_bytes;
        let total: usize = burst.iter().map(Wire::work_entry_bytes).sum();
        if total <= limit {
            // One frame (the common case): the order the framing gives, without cutting:
            // acks before assignments down, pulls after submits up (a stable sort).
            let mut burst = burst;
            burst.sort_by_key(|m| match m {
                Wire::Down(ToWorker::SubmitAck { .. }) | Wire::Up(ToCoordinator::Submit(_)) => 0,
                _ => 1,
            });
            for msg in burst {
                self.send(w, msg);
            }
            return;
        }
        let frames: Vec<Vec<Wire>> = if self.frames_by_count {
            vec![burst]
        } else {
            match dir {
                Dir::Up => {
                    let msgs = burst.into_iter().filter_map(|m| if let Wire::Up(m) = m { Some(m) } else { None });
                    framing::frames_up(msgs.collect(), limit)
                        .into_iter()
                        .map(|f| f.into_iter().map(Wire::Up).collect())
                        .collect()
                }
                Dir::Down => {
                    let msgs = burst.into_iter().filter_map(|m| if let Wire::Down(m) = m { Some(m) } else { None });
                    framing::frames_down(msgs.collect(), limit)
                        .into_iter()
                        .map(|f| f.into_iter().map(Wire::Down).collect())
                        .collect()
                }
            }
        };
        let mut frames = frames.into_iter();
        while let Some(frame) = frames.next() {
            let bytes: usize = frame.iter().map(Wire::work_entry_bytes).sum();
            if bytes > limit {
                self.frames_broken += 1;
                for msg in frame.into_iter().chain(frames.flatten()) {
                    self.messages.0 += 1;
                    self.messages.1 += 1;
                    self.log_message(w, &msg, None);
                }
                // The error reaches the worker behind the frames already sent.
                let conn = self.links[w].conn;
                let at = (self.now + self.latency()).max(self.links[w].half(dir).last);
                self.push(at, Ev::StreamBroken { w, conn, bytes });
                return;
            }
            for msg in frame {
                self.send(w, msg);
            }
        }
    }

    /// The Work stream of link `w` ended on a frame of `bytes` over the limit.
    pub(super) fn stream_broken(&mut self, w: usize, conn: u64, bytes: usize) {
        if self.links[w].conn != conn {
            return;
        }
        let why = format!("work frame of {bytes} bytes over limits.max_message_bytes ({})", self.max_message_bytes);
        self.break_link(w, &why, false);
    }

    /// A message arrives at the end of link `w` (sent on connection `conn`).
    pub(super) fn deliver(&mut self, w: usize, conn: u64, msg: Wire, rec: Option<u32>) {
        let dir = msg.dir();
        if dir == Dir::Up && self.links[w].conn == conn && self.links[w].peer_gone && self.coord.machine.is_some() {
            // The restarted coordinator knows nothing of this connection: it resets it.
            self.lost_in_flight(w, rec);
            return self.reset_link(w, "reset by the restarted coordinator");
        }
        let link = &mut self.links[w];
        if link.conn == conn && link.blocked(dir) && !msg.unary() {
            link.half_mut(dir).held.push_back((msg, rec));
            self.coverage.held_messages += 1;
            return;
        }
        let receiver_up = match dir {
            Dir::Up => self.coord.machine.is_some(),
            Dir::Down => self.workers[w].machine.is_some(),
        };
        if link.conn != conn || link.blocked(dir) || !receiver_up {
            self.lost_in_flight(w, rec);
            return;
        }
        match msg {
            Wire::Up(message) => {
                let worker = self.workers[w].id.clone();
                self.coord_enqueue(rollout_coordinator::CoordinatorInput::from_worker(worker, message));
            }
            Wire::WorkClosed(incarnation) => {
                self.coverage.work_closed += 1;
                let worker = self.workers[w].id.clone();
                self.coord_enqueue(rollout_coordinator::CoordinatorInput::WorkClosed { worker, incarnation });
            }
            Wire::Down(message) => {
                self.workers[w].oracle.received(&message);
                self.worker_input(w, WorkerInput::Message(message))
            }
        }
    }

    /// Blocks link `w` in the given directions (a partition).
    pub(super) fn block(&mut self, w: usize, up: bool, down: bool) {
        let link = &mut self.links[w];
        link.half_mut(Dir::Up).blocked |= up;
        link.half_mut(Dir::Down).blocked |= down;
        self.link_changed(w);
    }

    /// One step of a flapping link: cut or healed, and the next step scheduled.
    pub(super) fn flap(&mut self, w: usize, cut: bool, period: u64, until: u64) {
        let link = &mut self.links[w];
        link.half_mut(Dir::Up).blocked = cut;
        link.half_mut(Dir::Down).blocked = cut;
        self.link_changed(w);
        if self.now < until {
            self.push((self.now + period).min(until), Ev::Flap { w, cut: !cut, period, until });
        } else if cut {
            self.push(self.now, Ev::Flap { w, cut: false, period, until });
        }
    }

    /// The keepalive check of link `w`: still blocked since `generation`, the
    /// connection is declared dead and reset.
    pub(super) fn keepalive(&mut self, w: usize, conn: u64, generation: u64) {
        let link = &self.links[w];
        if link.conn == conn
            && link.blocked_generation == generation
            && (link.blocked_any() || link.peer_gone || link.half_open)
        {
            self.coverage.keepalive_resets += 1;
            self.reset_link(w, "keepalive timeout");
        }
    }

    /// The coordinator end of link `w` went silent (a power cut): the worker's transport
    /// notices when its keepalive goes unanswered, unless a partition's check or a reset
    /// comes first.
    pub(super) fn peer_gone(&mut self, w: usize) {
        let link = &mut self.links[w];
        link.peer_gone = true;
        link.blocked_generation += 1;
        let (conn, generation) = (link.conn, link.blocked_generation);
        self.push(self.now + self.scenario.network.keepalive_ms * NS_PER_MS, Ev::Keepalive { w, conn, generation });
    }

    /// Link `w` works again at full speed.
    pub(super) fn heal(&mut self, w: usize) {
        let link = &mut self.links[w];
        let was = (link.blocked(Dir::Up), link.blocked(Dir::Down), link.extra_ns);
        link.half_mut(Dir::Up).blocked = false;
        link.half_mut(Dir::Down).blocked = false;
        link.extra_ns = 0;
        if was != (false, false, 0) {
            self.link_changed(w);
            let name = self.workers[w].id.to_string();
            self.close_span(&name, "partition");
            self.close_span(&name, "slow");
        }
    }

    fn link_changed(&mut self, w: usize) {
        let link = &mut self.links[w];
        let change = link.env();
        // A silent peer (a power cut) leaves the keepalive as pending as a cut link does.
        let blocked = link.blocked_any() || link.peer_gone;
        link.blocked_generation += 1;
        let (conn, generation) = (link.conn, link.blocked_generation);
        let id = self.workers[w].id.clone();
        self.liveness.worker_env(self.now, &id, change);
        if blocked {
            // The transport's keepalive notices a dead connection after this long.
            self.push(self.now + self.scenario.network.keepalive_ms * NS_PER_MS, Ev::Keepalive { w, conn, generation });
        }
        // What the partition held goes out now, in order, on the same connection.
        for dir in [Dir::Up, Dir::Down] {
            if self.links[w].blocked(dir) {
                continue;
            }
            for (msg, rec) in std::mem::take(&mut self.links[w].half_mut(dir).held) {
                let at = (self.now + self.latency() + self.links[w].extra_ns).max(self.links[w].half(dir).last);
                self.links[w].half_mut(dir).last = at;
                self.set_delivery(rec, Some(at));
                self.push(at, Ev::Deliver { w, conn, msg, rec });
            }
        }
    }

    /// The connection of link `w` breaks: whatever was in flight or held is lost, and
    /// the worker's transport tells its machine.
    pub(super) fn reset_link(&mut self, w: usize, why: &str) {
        self.break_link(w, why, true);
    }

    /// [`Self::reset_link`]; `environment`: the network or a crash did it (the liveness
    /// checker excuses what follows), not the system itself.
    fn break_link(&mut self, w: usize, why: &str, environment: bool) {
        let link = &mut self.links[w];
        link.conn += 1;
        link.peer_gone = false;
        link.half_open = false;
        for rec in link.drop_held() {
            self.messages.1 += 1;
            self.set_delivery(rec, None);
        }
        let id = self.workers[w].id.clone();
        if environment {
            self.liveness.worker_env(self.now, &id, Env::Disturbed);
        }
        if why != "reset" {
            self.instant_span(id.as_str(), why.into());
        }
        // The connection is gone, its Work stream with it.
        self.worker_input(w, WorkerInput::StreamBroken(Channel::Work));
    }

    /// The coordinator's end of link `w` is reset and the worker's end does not know
    /// (a middlebox's RST). The coordinator's transport takes a reset for no proof of
    /// anything (the worker may still run), so its machine hears nothing; the worker
    /// learns when its next message, or its keepalive, is answered with a reset. With
    /// the planted bug `reset_ends_incarnation` the transport takes it for the worker's
    /// death, the coordinator leases the tasks elsewhere while the worker still runs
    /// them, and `no_overlap` fails.
    pub(super) fn reset_coordinator_end(&mut self, w: usize) {
        let link = &mut self.links[w];
        if link.half_open || link.peer_gone || self.coord.machine.is_none() {
            return;
        }
        link.conn += 1;
        link.half_open = true;
        link.blocked_generation += 1;
        let (conn, generation) = (link.conn, link.blocked_generation);
        for rec in link.drop_held() {
            self.messages.1 += 1;
            self.set_delivery(rec, None);
        }
        self.push(self.now + self.scenario.network.keepalive_ms * NS_PER_MS, Ev::Keepalive { w, conn, generation });
        self.coverage.half_open += 1;
        let id = self.workers[w].id.clone();
        self.liveness.worker_env(self.now, &id, Env::Disturbed);
        if self.reset_ends_incarnation
            && let Some((incarnation, _)) = self.workers[w].work_stream
        {
            self.coord_enqueue(rollout_coordinator::CoordinatorInput::WorkClosed { worker: id, incarnation });
        }
    }

    /// The reset the coordinator's kernel answered a message on half-open link `w` with
    /// reaches the worker.
    pub(super) fn reset_back(&mut self, w: usize, conn: u64) {
        if self.links[w].conn == conn && self.links[w].half_open {
            self.reset_link(w, "reset by the coordinator's end");
        }
    }

    /// The worker's end closed its Work stream of `incarnation`, opened on connection
    /// `conn`: the close travels if that connection is still the link's.
    pub(super) fn close_work(&mut self, w: usize, incarnation: Incarnation, conn: u64) {
        if self.links[w].conn == conn {
            self.send(w, Wire::WorkClosed(incarnation));
        }
    }

    /// The worker process of link `w` is gone, its connection with it: its kernel
    /// closes the connection (FIN), which reaches the coordinator's end unless the link
    /// is cut or that end is gone already; the coordinator's transport turns it into
    /// `WorkClosed` for each incarnation whose Work stream was open on it (`closing`).
    /// Whatever else was in flight is lost.
    pub(super) fn drop_connection(&mut self, w: usize, closing: Vec<(Incarnation, u64)>) {
        let link = &self.links[w];
        let fin_gets_through = !link.blocked(Dir::Up) && !link.peer_gone && !link.half_open;
        if fin_gets_through && self.coord.machine.is_some() {
            let conn = link.conn;
            let at = (self.now + self.latency() + self.links[w].extra_ns).max(self.links[w].half(Dir::Up).last);
            let epoch = self.coord.epoch;
            for (incarnation, _) in closing.into_iter().filter(|(_, c)| *c == conn) {
                self.push(at, Ev::Fin { w, epoch, incarnation });
            }
        }
        let link = &mut self.links[w];
        link.conn += 1;
        link.peer_gone = false;
        link.half_open = false;
        link.drop_held();
    }

    /// The FIN of worker `w`'s dead process reaches the coordinator (unless it crashed
    /// since it was sent: `epoch`).
    pub(super) fn fin(&mut self, w: usize, epoch: u64, incarnation: Incarnation) {
        if epoch != self.coord.epoch || self.coord.machine.is_none() {
            return;
        }
        self.coverage.work_closed += 1;
        let worker = self.workers[w].id.clone();
        self.coord_enqueue(rollout_coordinator::CoordinatorInput::WorkClosed { worker, incarnation });
    }
}
