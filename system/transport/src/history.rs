//! History emitters: where the drivers send the events the invariant checker judges.
//! Every emitter writes one JSON object per line ([`HistoryRecord`]'s JSON form), so a
//! recorded history can be fed to `rollout check` or read with `jq`.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::time::{unix_micros, unix_millis};
use rollout_core::traits::EventEmitter;
use rollout_core::{Error, Result};

/// Writes each record as one JSON line on standard output.
#[derive(Debug, Default)]
pub struct StdoutJsonEmitter {
    lock: Mutex<()>,
}

impl StdoutJsonEmitter {
    /// An emitter to stdout.
    pub fn new() -> Self {
        Self::default()
    }
}

impl EventEmitter for StdoutJsonEmitter {
    fn emit(&self, record: &HistoryRecord) {
        self.emit_all(std::slice::from_ref(record));
    }

    fn emit_all(&self, records: &[HistoryRecord]) {
        let lines = json_lines(records);
        // The lock keeps lines whole when several drivers share one process.
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&lines).and_then(|()| out.flush());
    }
}

/// `records` as JSON lines, in one buffer (a record that cannot be encoded, which no
/// history event is, is left out).
fn json_lines(records: &[HistoryRecord]) -> Vec<u8> {
    let mut lines = Vec::with_capacity(records.len() * 160);
    for record in records {
        if serde_json::to_writer(&mut lines, record).is_ok() {
            lines.push(b'\n');
        }
    }
    lines
}

/// Appends each record as one JSON line to a file, written as it is emitted (a batch's
/// records in one write) so that a killed process leaves every emitted event behind.
#[derive(Debug)]
pub struct FileJsonEmitter {
    out: Mutex<LineWriter<File>>,
}

impl FileJsonEmitter {
    /// Opens (creating, appending) the history file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::config_invalid(parent.display().to_string(), format!("creating the history directory: {e}"))
            })?;
        }
        let file = std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().create(true).append(true), 0o600)
            .open(path)
            .map_err(|e| Error::config_invalid(path.display().to_string(), format!("opening the history file: {e}")))?;
        Ok(FileJsonEmitter { out: Mutex::new(LineWriter::new(file)) })
    }
}

impl EventEmitter for FileJsonEmitter {
    fn emit(&self, record: &HistoryRecord) {
        self.emit_all(std::slice::from_ref(record));
    }

    fn emit_all(&self, records: &[HistoryRecord]) {
        let lines = json_lines(records);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // Ends with a newline, so the line writer passes it on in one write.
        if let Err(e) = out.write_all(&lines) {
            tracing::warn!(channel = "history", error = %e, "could not write history events");
        }
    }
}

/// Keeps records in memory (tests, embedding).
#[derive(Debug, Default)]
pub struct MemoryEmitter {
    records: Mutex<Vec<HistoryRecord>>,
}

impl MemoryEmitter {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record so far, in emission order.
    pub fn records(&self) -> Vec<HistoryRecord> {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl EventEmitter for MemoryEmitter {
    fn emit(&self, record: &HistoryRecord) {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).push(record.clone());
    }
}

/// Discards everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullEmitter;

impl EventEmitter for NullEmitter {
    fn emit(&self, _record: &HistoryRecord) {}
}

/// Stamps a node's events with its name, its own sequence number and its wall clock.
#[derive(Debug)]
pub(crate) struct Stamper {
    node: String,
    seq: u64,
}

impl Stamper {
    pub(crate) fn new(node: impl Into<String>) -> Self {
        Stamper { node: node.into(), seq: 0 }
    }

    /// Stamps `events` in order and hands them to `emitter` at once.
    pub(crate) fn emit_all(
        &mut self,
        emitter: &dyn EventEmitter,
        wall: std::time::SystemTime,
        events: impl IntoIterator<Item = HistoryEvent>,
    ) {
        let (wall_unix_ms, wall_unix_us) = (unix_millis(wall), Some(unix_micros(wall)));
        let records: Vec<HistoryRecord> = events
            .into_iter()
            .map(|event| {
                self.seq += 1;
                HistoryRecord { seq: self.seq, node: self.node.clone(), wall_unix_ms, wall_unix_us, event }
            })
            .collect();
        if !records.is_empty() {
            emitter.emit_all(&records);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout_core::{Incarnation, WorkerId};

    #[test]
    fn file_emitter_writes_one_json_object_per_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h/history.jsonl");
        let emitter = FileJsonEmitter::open(&path).expect("opens");
        let mut stamper = Stamper::new("coordinator");
        let w = WorkerId::new("w1").expect("id");
        let registered = |i| HistoryEvent::Registered { worker: w.clone(), incarnation: Incarnation(i) };
        // One batch of two, then one alone: three lines, numbered in order.
        stamper.emit_all(&emitter, std::time::SystemTime::UNIX_EPOCH, [registered(1), registered(2)]);
        stamper.emit_all(&emitter, std::time::SystemTime::UNIX_EPOCH, [registered(3)]);
        stamper.emit_all(&emitter, std::time::SystemTime::UNIX_EPOCH, []);
        let text = std::fs::read_to_string(&path).expect("reads");
        let records: Vec<HistoryRecord> =
            text.lines().map(|l| serde_json::from_str(l).expect("one record per line")).collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(records[0].node, "coordinator");
        assert_eq!(records[2].event, registered(3));
    }
}
