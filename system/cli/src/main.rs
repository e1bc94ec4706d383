//! `rollout`: run a coordinator or a worker, and operate a cluster.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid input (config, arguments).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rollout_core::config::duration_text;
use rollout_core::{Config, Error, health};

/// Exit code for invalid configuration or arguments.
const EXIT_INVALID: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "rollout",
    version,
    about = "Run batches of work on a fleet of CPU and GPU machines.",
    long_about = "Run batches of work on a fleet of CPU and GPU machines.\n\n\
        A coordinator leases tasks from a durable queue to registered workers under fencing \
        tokens; workers run them with plugins and submit results. Configuration comes from \
        the seed defaults, then --config FILE, then ROLLOUT_<SECTION>__<KEY> environment \
        variables (e.g. ROLLOUT_HEALTH__HEARTBEAT_INTERVAL=750ms)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and print the effective config.
    ///
    /// Prints every setting (defaults filled in, file and environment overrides applied)
    /// as TOML, followed by the failure-detection bounds it implies. Exits 2 with a
    /// one-line reason naming the offending field when the config is invalid.
    Plan {
        /// TOML config file; without it, defaults and environment overrides only.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan { config } => plan(config),
    }
}

fn plan(config_path: Option<PathBuf>) -> ExitCode {
    match Config::load(config_path.as_deref(), std::env::vars()) {
        Ok(config) => {
            print!("{}", render_plan(&config));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_code_for(&e))
        }
    }
}

fn exit_code_for(e: &Error) -> u8 {
    match e {
        Error::Fatal(rollout_core::Fatal::ConfigInvalid { .. } | rollout_core::Fatal::InvalidInput(_)) => EXIT_INVALID,
        _ => 1,
    }
}

/// The effective config, then what it implies, as TOML comments.
fn render_plan(config: &Config) -> String {
    let h = &config.health;
    let detect = h.clock_skew_budget.max(h.coordinator_failure_timeout);
    let fmt = duration_text::format;
    let mut out = String::from("# rollout plan: effective configuration (valid)\n\n");
    out.push_str(&config.to_toml_string());
    out.push_str(&format!(
        "\n# Implied bounds:\n\
         # - a worker announces due_at = now + {due} on every beat\n\
         # - a silent worker is declared failed at most {detect} + one scan tick ({scan}) after its due_at\n\
         # - a cut-off worker stops its tasks {fence} after its last acknowledged beat, {margin} before \
           the coordinator may re-lease them\n\
         # - failed tasks are retried up to {attempts} attempts in all, backoff {b0} doubling to {b1}\n",
        due = fmt(health::next_due_at(std::time::UNIX_EPOCH, h.heartbeat_interval)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()),
        detect = fmt(detect),
        scan = fmt(h.failure_scan_interval),
        fence = fmt(h.worker_self_fence_timeout),
        margin = fmt(h.coordinator_failure_timeout.saturating_sub(h.worker_self_fence_timeout)),
        attempts = config.tasks.max_attempts,
        b0 = fmt(config.tasks.retry_backoff_initial),
        b1 = fmt(config.tasks.retry_backoff_max),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_shows_settings_and_bounds() {
        let text = render_plan(&Config::default());
        assert!(text.contains("heartbeat_interval = \"500ms\""), "{text}");
        assert!(text.contains("due_at = now + 1s"), "{text}");
        assert!(text.contains("declared failed at most 5s"), "{text}");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
