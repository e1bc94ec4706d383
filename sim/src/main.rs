//! `sim`: run a scenario with one seed, or explore many seeds.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use sim::{Options, RunReport, Scenario, run, run_with, scenarios_dir};

/// `println!` that ends the process quietly when stdout is gone (`sim explore … | head`)
/// instead of panicking on the broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("writing to stdout: {e}");
        }
    }};
}

/// rollout's deterministic simulator.
#[derive(Parser)]
#[command(name = "sim")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one scenario with one seed.
    Run {
        /// A scenario name in scenarios/ or a path to a TOML file.
        scenario: String,
        /// The seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Prints the whole history as JSON lines (with true time) after the summary.
        #[arg(long)]
        trace: bool,
        /// Writes a self-contained HTML space-time diagram of the run to this file.
        #[arg(long, value_name = "FILE.html")]
        timeline: Option<PathBuf>,
    },
    /// Delta-debugs a failing seed to a minimal scenario that fails the same way and
    /// writes it (with its seed) where `cargo test -p sim` runs it forever after.
    Shrink {
        /// A scenario name in scenarios/ or a path to a TOML file.
        scenario: String,
        /// The failing seed.
        #[arg(long)]
        seed: u64,
        /// Where to write the minimal scenario.
        #[arg(long, default_value_os_t = scenarios_dir().join("regressions"))]
        out: PathBuf,
    },
    /// Runs a scenario over many seeds and prints the failing ones.
    Explore {
        /// A scenario name in scenarios/ or a path to a TOML file.
        scenario: String,
        /// How many seeds.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        start: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { scenario, seed, trace, timeline } => {
            // Seed and scenario first, so even a crash leaves what is needed to reproduce.
            say!("seed {seed} scenario {scenario}");
            let Some(loaded) = load(&scenario) else { return ExitCode::from(2) };
            let started = Instant::now();
            let report = run_with(&loaded, seed, &Options { record: timeline.is_some() });
            let wall = started.elapsed().as_secs_f64();
            print_summary(&report, wall);
            if let Some(path) = &timeline {
                match std::fs::write(path, sim::timeline::render(&loaded, &report)) {
                    Ok(()) => say!("timeline          {}", path.display()),
                    Err(e) => {
                        eprintln!("error: cannot write timeline {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                }
            }
            if trace {
                for (t, record) in &report.history {
                    let json = serde_json::to_string(record).unwrap_or_default();
                    say!("{{\"true_ns\":{t},{}", json.trim_start_matches('{'));
                }
            }
            match &report.violation {
                None => ExitCode::SUCCESS,
                Some(v) => {
                    eprintln!("{}\nVIOLATION: {v}\nlast events:\n{}", repro(&scenario, seed), report.tail());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explore { scenario, seeds, start } => {
            say!("scenario {scenario} seeds {start}..{}", start.saturating_add(seeds));
            let Some(loaded) = load(&scenario) else { return ExitCode::from(2) };
            let started = Instant::now();
            let mut failing = 0u64;
            let mut sim_ns = 0u128;
            for seed in start..start.saturating_add(seeds) {
                let report = run(&loaded, seed);
                sim_ns += u128::from(report.sim_ns);
                if let Some(v) = &report.violation {
                    failing += 1;
                    say!("FAIL {}  # {v}", repro(&scenario, seed));
                }
            }
            let wall = started.elapsed().as_secs_f64();
            say!("{failing} of {seeds} seeds failed; {:.0} simulated s in {wall:.2} wall s", sim_ns as f64 / 1e9);
            if failing == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Shrink { scenario, seed, out } => {
            say!("seed {seed} scenario {scenario}");
            let Some(loaded) = load(&scenario) else { return ExitCode::from(2) };
            let started = Instant::now();
            let mut progress = |step: &str| say!("  {step}");
            let shrunk = match sim::shrink::shrink(&loaded, seed, &mut progress) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let path = match shrunk.write(&out) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: cannot write to {}: {e}", out.display());
                    return ExitCode::from(2);
                }
            };
            let s = &shrunk.scenario;
            say!(
                "shrunk in {} runs ({:.1} s): {} fault(s), {} job(s) of {} task(s), {} worker(s), {} s",
                shrunk.runs,
                started.elapsed().as_secs_f64(),
                s.faults.len(),
                s.workload.jobs,
                s.workload.tasks_per_job,
                s.cluster.workers,
                s.duration_s
            );
            if let Some(v) = &shrunk.report.violation {
                say!("still fails: {v}");
            }
            say!("wrote {}", path.display());
            say!("reproduce: {}", repro(&path.display().to_string(), seed));
            ExitCode::SUCCESS
        }
    }
}

fn load(scenario: &str) -> Option<Scenario> {
    match Scenario::load(scenario, &scenarios_dir()) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

fn repro(scenario: &str, seed: u64) -> String {
    format!("cargo run -p sim -- run {scenario} --seed {seed}")
}

fn print_summary(r: &RunReport, wall_s: f64) {
    let sim_s = r.sim_ns as f64 / 1e9;
    say!("events            {}", r.events);
    say!("simulated         {sim_s:.3} s");
    say!("wall              {wall_s:.3} s");
    say!("speed             {:.0} sim-s per wall-s", sim_s / wall_s.max(1e-9));
    say!("jobs acknowledged {}", r.jobs_acked);
    say!("tasks committed   {} (dead-lettered {})", r.committed, r.dead_lettered);
    say!("messages          {} sent, {} dropped", r.messages.0, r.messages.1);
    say!("batches           {} ({} inputs)", r.batches.0, r.batches.1);
    say!("overlaps          {} (non-strict)", r.overlaps);
    say!("stale submits     {} rejected", r.stale_rejected);
    say!("frames broken     {} (work frames over limits.max_message_bytes)", r.frames_broken);
    say!("sets dropped      {} (batches applied over a sync that failed)", r.sets_dropped);
    let reached: Vec<String> = r.coverage.reached().iter().map(|(n, c)| format!("{n} {c}")).collect();
    say!("coverage          {}", if reached.is_empty() { "nothing rare".to_owned() } else { reached.join(", ") });
    say!("faults            {}", r.faults.len());
    say!("audit entries     {} verified", r.audit_entries);
    say!("history           {} events", r.history.len());
    say!("trace hash        {}", r.trace_hash);
    say!("result            {}", if r.violation.is_none() { "ok" } else { "VIOLATION" });
}
