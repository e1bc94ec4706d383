//! A self-contained HTML page with an SVG space-time diagram of one run: one lane per
//! node, messages as arrows between lanes (lost ones end in a cross), task runs as bars
//! on the worker lanes, faults shaded, history events as marks, overlapping runs of
//! one task and stale submits highlighted, and the violation (if any) as a red line.
//! Every mark has a tooltip. No scripts or styles are fetched: it opens offline.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rollout_core::history::HistoryEvent;
use rollout_core::{FencingToken, TaskId};

use crate::engine::RunReport;
use crate::scenario::Scenario;

const LANE_GAP: f64 = 70.0;
const TOP: f64 = 90.0;
const LEFT: f64 = 110.0;

struct Layout {
    px_per_ns: f64,
    lanes: usize,
}

impl Layout {
    fn x(&self, t: u64) -> f64 {
        LEFT + t as f64 * self.px_per_ns
    }
    fn lane_y(&self, lane: usize) -> f64 {
        TOP + lane as f64 * LANE_GAP
    }
    fn height(&self) -> f64 {
        TOP + self.lanes as f64 * LANE_GAP + 40.0
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn secs(t: u64) -> String {
    format!("{:.3}s", t as f64 / 1e9)
}

fn message_color(kind: &str) -> &'static str {
    match kind {
        "heartbeat" | "heartbeat_ack" => "#b8c4d6",
        "register" | "registered" | "register_rejected" => "#2b7bb9",
        "pull" => "#9acd9a",
        "assign" => "#1a9641",
        "submit" => "#7b3294",
        "submit_ack" => "#c2a5cf",
        _ => "#f29e4c",
    }
}

/// A task run on one worker: `[start, end)`.
struct RunBar {
    task: TaskId,
    token: FencingToken,
    lane: usize,
    start: u64,
    end: u64,
}

/// Renders `report` (run with [`crate::Options::record`]) as an HTML page.
pub fn render(scenario: &Scenario, report: &RunReport) -> String {
    let end = report.sim_ns.max(1);
    let width_px = (end as f64 / 1e9 * 120.0).clamp(1_200.0, 60_000.0);
    let layout = Layout { px_per_ns: width_px / end as f64, lanes: 1 + scenario.cluster.workers as usize };
    let lane_of = |node: &str| -> usize {
        if node == "coordinator" {
            0
        } else {
            node.strip_prefix('w').and_then(|n| n.parse::<usize>().ok()).unwrap_or(0)
        }
    };
    let total_w = LEFT + width_px + 40.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="tl" width="{total_w:.0}" height="{:.0}" font-family="sans-serif" font-size="11">"#,
        layout.height()
    );

    // Time axis: a tick every second (every 10 s when long).
    let step_s = if end > 200_000_000_000 { 10 } else { 1 };
    let mut s = 0u64;
    while s * 1_000_000_000 <= end {
        let x = layout.x(s * 1_000_000_000);
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="{:.0}" x2="{x:.1}" y2="{:.0}" stroke="#eee"/><text x="{x:.1}" y="{:.0}" fill="#888" text-anchor="middle">{s}s</text>"##,
            TOP - 30.0,
            layout.height() - 30.0,
            TOP - 34.0
        );
        s += step_s;
    }

    // Fault shading, under everything else.
    for f in &report.fault_log {
        let lane = lane_of(&f.node);
        let y = layout.lane_y(lane);
        let x0 = layout.x(f.start_ns);
        let tip =
            format!("{}: {} from {} to {}", f.node, f.what, secs(f.start_ns), f.end_ns.map_or("the end".into(), secs));
        match f.end_ns {
            Some(e) if e == f.start_ns => {
                let _ = write!(
                    svg,
                    r##"<g><title>{}</title><line x1="{x0:.1}" y1="{:.0}" x2="{x0:.1}" y2="{:.0}" stroke="#e66101" stroke-width="3"/><text x="{:.1}" y="{:.0}" fill="#e66101">{}</text></g>"##,
                    esc(&tip),
                    y - 25.0,
                    y + 25.0,
                    x0 + 3.0,
                    y - 27.0,
                    esc(&f.what)
                );
            }
            other => {
                let x1 = layout.x(other.unwrap_or(end));
                let _ = write!(
                    svg,
                    r##"<g><title>{}</title><rect x="{x0:.1}" y="{:.0}" width="{:.1}" height="50" fill="#fdb863" fill-opacity="0.35"/><text x="{:.1}" y="{:.0}" fill="#b35806">{}</text></g>"##,
                    esc(&tip),
                    y - 25.0,
                    (x1 - x0).max(1.0),
                    x0 + 3.0,
                    y - 27.0,
                    esc(&f.what)
                );
            }
        }
    }

    // Lanes.
    for lane in 0..layout.lanes {
        let y = layout.lane_y(lane);
        let name = if lane == 0 { "coordinator".to_owned() } else { format!("w{lane}") };
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.0}" x2="{:.0}" y2="{y:.0}" stroke="#444"/><text x="8" y="{:.0}" font-weight="bold">{name}</text>"##,
            LEFT + width_px,
            y + 4.0
        );
    }

    // Messages.
    for m in &report.message_log {
        let (from, to) = if m.up { (m.worker + 1, 0) } else { (0, m.worker + 1) };
        let (y0, y1) = (layout.lane_y(from), layout.lane_y(to));
        let x0 = layout.x(m.sent_ns);
        let color = message_color(m.kind);
        let about = m.task.map(|t| format!(" {t}")).unwrap_or_default();
        let dir = if m.up {
            format!("w{} → coordinator", m.worker + 1)
        } else {
            format!("coordinator → w{}", m.worker + 1)
        };
        match m.delivered_ns {
            Some(at) => {
                let x1 = layout.x(at);
                let _ = write!(
                    svg,
                    r#"<line x1="{x0:.1}" y1="{y0:.0}" x2="{x1:.1}" y2="{y1:.0}" stroke="{color}" marker-end="url(#arrow)"><title>{}{} {dir}: sent {}, delivered {}</title></line>"#,
                    m.kind,
                    esc(&about),
                    secs(m.sent_ns),
                    secs(at)
                );
            }
            None => {
                let ym = (y0 + y1) / 2.0;
                let x1 = x0 + 12.0;
                let _ = write!(
                    svg,
                    r##"<g><title>{}{} {dir}: sent {}, LOST</title><line x1="{x0:.1}" y1="{y0:.0}" x2="{x1:.1}" y2="{ym:.0}" stroke="{color}" stroke-dasharray="3,2"/><text x="{x1:.1}" y="{:.0}" fill="#d7191c" text-anchor="middle">×</text></g>"##,
                    m.kind,
                    esc(&about),
                    secs(m.sent_ns),
                    ym + 4.0
                );
            }
        }
    }

    // Task runs from TaskStarted / TaskStopped.
    let mut open: BTreeMap<(TaskId, FencingToken, usize), u64> = BTreeMap::new();
    let mut bars = Vec::new();
    for (t, r) in &report.history {
        match &r.event {
            HistoryEvent::TaskStarted { task, worker, token } => {
                open.insert((*task, *token, lane_of(worker.as_str())), *t);
            }
            HistoryEvent::TaskStopped { task, worker, token } => {
                let lane = lane_of(worker.as_str());
                if let Some(start) = open.remove(&(*task, *token, lane)) {
                    bars.push(RunBar { task: *task, token: *token, lane, start, end: *t });
                }
            }
            _ => {}
        }
    }
    for ((task, token, lane), start) in open {
        bars.push(RunBar { task, token, lane, start, end });
    }
    bars.sort_by_key(|b| (b.lane, b.start));
    let mut row_end: BTreeMap<(usize, usize), u64> = BTreeMap::new();
    for b in &bars {
        // Stack runs of one worker in rows below its lane.
        let row = (0..8).find(|r| row_end.get(&(b.lane, *r)).is_none_or(|e| *e <= b.start)).unwrap_or(7);
        row_end.insert((b.lane, row), b.end);
        let y = layout.lane_y(b.lane) + 4.0 + row as f64 * 5.0;
        let (x0, x1) = (layout.x(b.start), layout.x(b.end));
        let _ = write!(
            svg,
            r##"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="4" fill="#5e3c99" fill-opacity="0.6"><title>{} token {} on w{}: {} to {}</title></rect>"##,
            (x1 - x0).max(1.0),
            b.task,
            b.token,
            b.lane,
            secs(b.start),
            secs(b.end)
        );
    }
    // Overlaps: runs of one task on two workers at once.
    let mut overlaps = 0;
    for (i, a) in bars.iter().enumerate() {
        for b in &bars[i + 1..] {
            if a.task == b.task && a.lane != b.lane && a.start < b.end && b.start < a.end {
                overlaps += 1;
                let (s, e) = (a.start.max(b.start), a.end.min(b.end));
                let (lo, hi) = (a.lane.min(b.lane), a.lane.max(b.lane));
                let (x0, x1) = (layout.x(s), layout.x(e));
                let _ = write!(
                    svg,
                    r##"<g><title>OVERLAP: {} runs on w{} (token {}) and w{} (token {}) from {} to {}</title><rect x="{x0:.1}" y="{:.0}" width="{:.1}" height="{:.0}" fill="#d01c8b" fill-opacity="0.25" stroke="#d01c8b"/><text x="{x0:.1}" y="{:.0}" fill="#d01c8b" font-weight="bold">overlap {}</text></g>"##,
                    a.task,
                    a.lane,
                    a.token,
                    b.lane,
                    b.token,
                    secs(s),
                    secs(e),
                    layout.lane_y(lo) - 10.0,
                    (x1 - x0).max(2.0),
                    layout.lane_y(hi) - layout.lane_y(lo) + 30.0,
                    layout.lane_y(hi) + 32.0,
                    a.task
                );
            }
        }
    }

    // History marks.
    for (t, r) in &report.history {
        let x = layout.x(*t);
        let (lane, color, radius, label): (usize, &str, f64, Option<String>) = match &r.event {
            HistoryEvent::Registered { worker, .. } => (lane_of(worker.as_str()), "#2b7bb9", 3.0, None),
            HistoryEvent::DeclaredFailed { worker, .. } => {
                (lane_of(worker.as_str()), "#e66101", 5.0, Some("declared failed".into()))
            }
            HistoryEvent::SelfFenced { worker, .. } => {
                (lane_of(worker.as_str()), "#e66101", 5.0, Some("self-fenced".into()))
            }
            HistoryEvent::StaleRejected { task, token, .. } => {
                (0, "#d7191c", 6.0, Some(format!("stale submit rejected: {task} token {token}")))
            }
            HistoryEvent::Committed { .. } => (0, "#1a9641", 2.0, None),
            HistoryEvent::DeadLettered { task, .. } => (0, "#000", 4.0, Some(format!("dead-lettered {task}"))),
            _ => continue,
        };
        let y = layout.lane_y(lane);
        let tip = format!("{} {} {:?}", secs(*t), r.node, r.event);
        let _ = write!(
            svg,
            r#"<circle cx="{x:.1}" cy="{y:.0}" r="{radius}" fill="{color}"><title>{}</title></circle>"#,
            esc(&tip)
        );
        if let Some(label) = label {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.0}" fill="{color}" font-weight="bold">{}</text>"#,
                x + 6.0,
                y - 8.0,
                esc(&label)
            );
        }
    }

    // The violation.
    if let Some(v) = &report.violation {
        let t = v.seq.and_then(|s| report.history.get(s as usize)).map_or(report.sim_ns, |(t, _)| *t);
        let x = layout.x(t);
        let _ = write!(
            svg,
            r##"<g><title>{}</title><line x1="{x:.1}" y1="{:.0}" x2="{x:.1}" y2="{:.0}" stroke="#d7191c" stroke-width="2"/><text x="{:.1}" y="{:.0}" fill="#d7191c" font-weight="bold">VIOLATION: {}</text></g>"##,
            esc(&v.to_string()),
            TOP - 45.0,
            layout.height() - 20.0,
            x + 4.0,
            TOP - 48.0,
            esc(v.invariant)
        );
    }
    svg.push_str(
        r##"<defs><marker id="arrow" viewBox="0 0 6 6" refX="6" refY="3" markerWidth="5" markerHeight="5" orient="auto"><path d="M0,0 L6,3 L0,6 z" fill="#666"/></marker></defs></svg>"##,
    );

    let verdict = match &report.violation {
        Some(v) => format!("<b style=\"color:#d7191c\">{}</b>", esc(&v.to_string())),
        None => "no violation".into(),
    };
    format!(
        r##"<!doctype html>
<html><head><meta charset="utf-8"><title>rollout sim: {name} seed {seed}</title>
<style>body{{font-family:sans-serif;margin:12px}} #wrap{{overflow-x:auto;border:1px solid #ccc}} .k span{{display:inline-block;width:18px;height:3px;margin:0 4px 3px 12px}}</style></head>
<body>
<h2>{name}, seed {seed}</h2>
<p>{description}</p>
<p>Reproduce: <code>cargo run -p sim -- run {name} --seed {seed} --timeline out.html</code><br>
{verdict} · {events} events · {sim:.3} simulated s · {commits} committed · {stale} stale submits rejected · {overlaps} overlapping runs · trace hash <code>{hash}</code></p>
<p class="k">Messages:<span style="background:#b8c4d6"></span>heartbeat<span style="background:#2b7bb9"></span>register<span style="background:#9acd9a"></span>pull<span style="background:#1a9641"></span>assign<span style="background:#7b3294"></span>submit<span style="background:#c2a5cf"></span>submit ack<span style="background:#f29e4c"></span>control;
× lost. Purple bars: task runs. Orange shading: faults. Magenta: overlapping runs of one task. Red dot: stale submit rejected. Hover anything for details.
Zoom: <input type="range" min="0.1" max="3" step="0.1" value="1" oninput="var s=document.getElementById('tl');s.style.width=(s.getAttribute('width')*this.value)+'px';s.setAttribute('viewBox','0 0 '+s.getAttribute('width')+' '+s.getAttribute('height'));"></p>
<div id="wrap">{svg}</div>
</body></html>
"##,
        name = esc(&scenario.name),
        seed = report.seed,
        description = esc(&scenario.description),
        events = report.events,
        sim = report.sim_ns as f64 / 1e9,
        commits = report.committed,
        stale = report.stale_rejected,
        hash = report.trace_hash,
    )
}
