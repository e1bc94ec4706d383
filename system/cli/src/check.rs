//! `rollout check`: the simulator's invariant checker over recorded histories.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rollout_core::history::HistoryRecord;
use sim::checker::{check_recorded, merge_histories};

/// Reads one JSON-lines history; an error names the file and line.
fn read_history(path: &Path) -> Result<Vec<HistoryRecord>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: HistoryRecord = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a history record: {e}", path.display(), i + 1))?;
        records.push(record);
    }
    Ok(records)
}

/// Runs the check; exit 0 clean, 1 on a violation, 2 on unreadable input.
pub fn run(files: &[PathBuf], strict_overlap: bool, complete: bool) -> ExitCode {
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
    let merged = merge_histories(histories);
    match check_recorded(&merged, strict_overlap, complete) {
        Ok(v) => {
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
            println!(
                "invariants held: single_commit, fenced_commit, self_fence, no_lost_task{}{}",
                if strict_overlap { ", no_overlap" } else { "" },
                if complete { ", progress" } else { "" }
            );
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
