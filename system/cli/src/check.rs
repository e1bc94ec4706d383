//! `rollout check`: the simulator's invariant checker over recorded histories, and
//! `no_lost_task` against the coordinator's own task states.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rollout_core::TaskId;
use rollout_core::history::HistoryRecord;
use rollout_history::{ReportedState, check_recorded, check_states, merge_histories};

/// Longest line of a history or results file (a record is a few hundred bytes; a
/// results line with its result bytes at most a few MiB).
const LINE_BYTES_MAX: usize = 8 << 20;

/// Calls `f` with every non-blank line of `path` and its number; a line longer than
/// [`LINE_BYTES_MAX`] is an error naming file and line (nothing is read for it beyond
/// the bound).
fn for_each_line(path: &Path, mut f: impl FnMut(usize, &str) -> Result<(), String>) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut buf = Vec::new();
    for number in 1.. {
        buf.clear();
        let read = (&mut reader)
            .take(LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("{}:{number}: cannot read: {e}", path.display()))?;
        if read == 0 {
            break;
        }
        if buf.len() > LINE_BYTES_MAX {
            return Err(format!("{}:{number}: a line longer than {LINE_BYTES_MAX} bytes", path.display()));
        }
        let line = std::str::from_utf8(&buf).map_err(|_| format!("{}:{number}: not UTF-8", path.display()))?;
        if !line.trim().is_empty() {
            f(number, line)?;
        }
    }
    Ok(())
}

/// Reads one JSON-lines history; an error names the file and line.
fn read_history(path: &Path) -> Result<Vec<HistoryRecord>, String> {
    let mut records = Vec::new();
    for_each_line(path, |number, line| {
        let record: HistoryRecord = serde_json::from_str(line)
            .map_err(|e| format!("{}:{number}: not a history record: {e}", path.display()))?;
        records.push(record);
        Ok(())
    })?;
    Ok(records)
}

/// One line of `rollout results`.
#[derive(serde::Deserialize)]
struct ResultLine {
    task: String,
    state: String,
}

/// Reads task states from `rollout results` output; an error names the file and line.
fn read_states(path: &Path, into: &mut Vec<(TaskId, ReportedState)>) -> Result<(), String> {
    for_each_line(path, |number, line| {
        let r: ResultLine =
            serde_json::from_str(line).map_err(|e| format!("{}:{number}: not a results line: {e}", path.display()))?;
        let task: TaskId =
            r.task.parse().map_err(|e| format!("{}:{number}: task {:?}: {e}", path.display(), r.task))?;
        let state = ReportedState::parse(&r.state)
            .ok_or_else(|| format!("{}:{number}: unknown state {:?}", path.display(), r.state))?;
        into.push((task, state));
        Ok(())
    })
}

/// Runs the check; exit 0 clean, 1 on a violation, 2 on unreadable input.
pub fn run(files: &[PathBuf], states: &[PathBuf], strict_overlap: bool, complete: bool) -> ExitCode {
    let mut histories = Vec::new();
    for path in files {
        match read_history(path) {
            Ok(records) => histories.push(records),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let mut reported = Vec::new();
    for path in states {
        if let Err(e) = read_states(path, &mut reported) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let merged = merge_histories(histories);
    let verdict = check_recorded(&merged, strict_overlap, complete).and_then(|v| {
        let checked = if states.is_empty() { None } else { Some(check_states(&merged, &reported)?) };
        Ok((v, checked))
    });
    match verdict {
        Ok((v, checked)) => {
            println!(
                "history ok: {} records from {} file(s); {} commits; {} of {} tasks of accepted jobs finished; {} overlapping run(s){}",
                v.records,
                files.len(),
                v.commits,
                v.terminal,
                v.tasks,
                v.overlaps,
                if strict_overlap { "" } else { " (counted, not failed)" }
            );
            let lost = match checked {
                Some(n) => format!(", no_lost_task ({n} tasks against the coordinator's states)"),
                None => String::new(),
            };
            println!(
                "invariants held: single_commit, fenced_commit, self_fence{lost}{}{}",
                if strict_overlap { ", no_overlap" } else { "" },
                if complete { ", progress" } else { "" }
            );
            if checked.is_none() {
                println!(
                    "not checked: no_lost_task (a history cannot show what the coordinator still holds: pass \
                     --states with the output of `rollout results JOB` for each job)"
                );
            }
            ExitCode::SUCCESS
        }
        Err(v) => {
            eprintln!("VIOLATION: {v}");
            if let Some(record) = v.seq.and_then(|s| merged.get(s as usize)) {
                eprintln!("record: {}", serde_json::to_string(record).unwrap_or_default());
            }
            ExitCode::from(1)
        }
    }
}
