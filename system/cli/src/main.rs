//! `rollout`: run a coordinator or a worker, and operate a cluster.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid input (config, arguments).

use std::path::PathBuf;
use std::process::ExitCode;

mod certs;
mod check;
mod ops;
mod run;
mod token;

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
    /// Run the coordinator until Ctrl-C.
    ///
    /// Opens (or creates) the database <storage.data_dir>/rollout.db and the object
    /// store <storage.data_dir>/object-store, recovers every job and worker, and serves
    /// workers and operators over mutual TLS on transport.listen_addr. Needs
    /// ca.pem and coordinator.pem in transport.tls_dir (`rollout certs init`), and
    /// ca.key.pem to enroll workers that `--join` with a `rollout token create` token
    /// (a client without a certificate may call Enroll and nothing else). History
    /// events are written as JSON lines to --history (default: standard output); logs
    /// go to standard error (RUST_LOG=debug for more).
    Coordinator {
        #[command(flatten)]
        common: CommonArgs,
        /// Listen here instead of transport.listen_addr (host:port).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Append history events (JSON lines) to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        history: Option<PathBuf>,
    },
    /// Run a worker until Ctrl-C: register, beat, pull and run tasks.
    ///
    /// Connects to transport.coordinator_addr with the client certificate
    /// worker.<ID>.pem from transport.tls_dir (`rollout certs issue --worker ID`, or
    /// obtained with --join ADDR --token T from a `rollout token create` token), runs
    /// tasks with the plugins named by the [[plugins]] tables of --config (cdylib,
    /// python or sidecar; relative paths are taken from the config file's directory)
    /// plus the built-in `echo` and `sleep` unless a configured plugin has that name, and
    /// advertises exactly those at registration. Re-registers with jittered exponential
    /// backoff after losing the coordinator. Exits 2 if a plugin cannot be loaded or
    /// started, 1 if the coordinator refuses it for good (e.g. a protocol version mismatch).
    Worker {
        #[command(flatten)]
        common: CommonArgs,
        /// The worker's id (its certificate's name).
        #[arg(long, value_name = "ID")]
        id: String,
        /// Tasks run at once.
        #[arg(long, default_value_t = 4)]
        slots: u32,
        /// Connect here instead of transport.coordinator_addr (host:port).
        #[arg(long, value_name = "ADDR", conflicts_with = "join")]
        coordinator: Option<String>,
        /// Enroll with the coordinator at ADDR (host:port) unless worker.<ID>.pem, its key and
        /// ca.pem are already in transport.tls_dir, then run against ADDR.
        ///
        /// A key pair is made here (it never leaves the machine; written 0600) and its
        /// signing request is sent with --token over TLS without a client certificate. The
        /// token is sent only if the coordinator's certificate chain contains, and verifies
        /// against, the CA whose SHA-256 the token pins. The certificate that comes back
        /// must name this --id and hold that key. Then ca.pem, worker.<ID>.key.pem and
        /// worker.<ID>.pem are written to transport.tls_dir. Idempotent: with the files in
        /// place nothing is sent (so a spent token on a restart is fine). A coordinator
        /// that cannot be reached yet is retried with the reconnect backoff
        /// (transport.reconnect_backoff_*) until it answers; a refusal stops at once.
        #[arg(long, value_name = "ADDR", requires = "token")]
        join: Option<String>,
        /// The bootstrap token for --join (from `rollout token create`). Prefer the
        /// environment variable, which other users cannot read from the process list.
        #[arg(long, value_name = "TOKEN", env = "ROLLOUT_JOIN_TOKEN", hide_env_values = true, requires = "join")]
        token: Option<String>,
        /// Append worker-side history events (JSON lines) to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        history: Option<PathBuf>,
        /// Serve this worker's Prometheus metrics at http://ADDR/metrics instead of
        /// metrics.worker_listen_addr (loopback only; port 0 picks a free port, logged at
        /// start; empty turns it off).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
    },
    /// Judge recorded histories with the simulator's invariant checker.
    ///
    /// Reads the JSON-lines histories of a coordinator and any workers (`--history`
    /// files, `rollout audit export` or `sim run --trace` output), merges them by wall
    /// time without reordering any one file, and checks single_commit, fenced_commit,
    /// self_fence and no_overlap, and with --complete that every task of every accepted
    /// job finished (progress). no_lost_task needs the coordinator's own account: with
    /// --states (`rollout results JOB` output, one or more files), every task of every
    /// accepted job that did not expire must be among its tasks, in the terminal state
    /// the history shows if it shows one. Exits 1 naming the first violated invariant
    /// and record, 2 on unreadable input (lines are at most 8 MiB).
    Check {
        /// History files (JSON lines), e.g. coordinator.jsonl w1.jsonl w2.jsonl.
        #[arg(required = true, value_name = "HISTORY.jsonl")]
        files: Vec<PathBuf>,
        /// Fail on overlapping runs of one task (sound only while clocks stay within
        /// health.clock_skew_budget); by default they are counted and reported.
        #[arg(long)]
        strict_overlap: bool,
        /// Require every task of every accepted job to have finished.
        #[arg(long)]
        complete: bool,
        /// The coordinator's task states (`rollout results JOB` output) to check
        /// no_lost_task against; repeat for several files.
        #[arg(long, value_name = "RESULTS.jsonl")]
        states: Vec<PathBuf>,
    },
    /// Create, list or revoke bootstrap tokens for `rollout worker --join`.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Upload, list or download blobs: inputs stored once in the coordinator's
    /// content-addressed store (<storage.data_dir>/blobs), named by their SHA-256.
    Blob {
        #[command(subcommand)]
        command: BlobCommand,
    },
    /// Create or issue certificates (development CA).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Submit tasks from a JSONL file and, by default, wait for them with a progress bar.
    ///
    /// One task per line: {"plugin": "echo", "payload": "text"}, with optional "method"
    /// (default "run"), "gpus", "deadline_ms", "inputs" (content ids of blobs from
    /// `rollout blob put` the task reads; refused if one is not stored) and "job" (lines
    /// with the same "job" label form one job, at most 64 labels; without it, all lines
    /// form one job named after the file). A hash of each job's lines is its idempotency key, so re-running
    /// the same command does not queue the same tasks twice, and a submit that was cut
    /// off resumes where it stopped.
    ///
    /// The file is read twice, in bounded memory whatever its size: once to check every
    /// line (errors name the line and the limit, e.g. limits.max_payload_bytes or
    /// limits.max_tasks_per_job) before anything is sent, then to stream each job in
    /// batches that fit limits.max_message_bytes. Nothing of a job runs until all of it
    /// is queued. An unreachable or restarting coordinator is retried for 30 s.
    Submit {
        #[command(flatten)]
        op: OperatorArgs,
        /// The JSONL file.
        file: PathBuf,
        /// Return once the jobs are queued instead of waiting for them to finish.
        #[arg(long)]
        no_wait: bool,
        /// Print one JSON object per line instead of text: each job as it is queued
        /// ({"event":"queued","job":"job-N","id":N,"name":..,"tasks":K,"existing":bool})
        /// and, when waiting, each job as it ends ({"event":"finished","job":..,
        /// "committed":..,"dead_lettered":..,"cancelled":..,"tasks":..}).
        #[arg(long)]
        json: bool,
    },
    /// Show cluster totals, workers (state, last beat, due_at, clock offset, inventory),
    /// jobs with progress, and latency percentiles.
    ///
    /// By default: open and active jobs and the most recently finished ones (--finished),
    /// and up to 1000 workers; --all lists every worker and every job the coordinator
    /// keeps (finished jobs are deleted after tasks.job_retention), --job one job. The
    /// clock column is each worker's wall clock minus the coordinator's as its latest
    /// beat showed it (deadlines are kept on the coordinator's clock either way).
    Status {
        #[command(flatten)]
        op: OperatorArgs,
        /// Print the raw status as JSON.
        #[arg(long)]
        json: bool,
        /// Every worker and every job kept, page after page.
        #[arg(long, conflicts_with = "job")]
        all: bool,
        /// Only this job (e.g. 3 or job-3).
        #[arg(long, value_name = "JOB")]
        job: Option<String>,
        /// How many recently finished jobs to show.
        #[arg(long, value_name = "N", default_value_t = 10)]
        finished: u32,
    },
    /// Print every task of a job (state, attempts, content id, errors) as JSON lines.
    ///
    /// Read from the coordinator's storage a page at a time, so a job of any size
    /// streams. A job deleted after tasks.job_retention fails with a message saying so.
    Results {
        #[command(flatten)]
        op: OperatorArgs,
        /// The job id (as printed by submit, e.g. 3 or job-3).
        job: String,
        /// Include the result bytes (as UTF-8 text where possible, else hex).
        #[arg(long)]
        bytes: bool,
        /// Start at this task index (to resume an interrupted listing).
        #[arg(long, value_name = "INDEX", default_value_t = 0, conflicts_with = "follow")]
        from: u32,
        /// Print each task as it ends (committed, dead-lettered or cancelled), in the
        /// order they end, until every task has; each line carries "seq", to resume with
        /// --after SEQ (a connection that breaks is resumed by itself).
        #[arg(long)]
        follow: bool,
        /// With --follow: only the tasks that ended after this seq.
        #[arg(long, value_name = "SEQ", default_value_t = 0, requires = "follow")]
        after: u64,
    },
    /// Cancel every task of a job that has not finished.
    Cancel {
        #[command(flatten)]
        op: OperatorArgs,
        /// The job id (e.g. 3 or job-3).
        job: String,
    },
    /// Tell a worker to finish what it runs and take nothing new.
    Drain {
        #[command(flatten)]
        op: OperatorArgs,
        /// The worker's id.
        worker: String,
    },
    /// Inspect the coordinator's hash-chained audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// TOML config file; without it, defaults and ROLLOUT_<SECTION>__<KEY> environment overrides only.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum BlobCommand {
    /// Upload FILE (streamed in 1 MiB chunks; at most limits.max_blob_bytes) and print its
    /// content id. The same bytes again are stored once.
    Put {
        #[command(flatten)]
        op: OperatorArgs,
        /// The file to upload.
        file: PathBuf,
        /// Print {"content_id":..,"size_bytes":..} instead of the id alone.
        #[arg(long)]
        json: bool,
    },
    /// List every stored blob: content id, size, when it was stored.
    Ls {
        #[command(flatten)]
        op: OperatorArgs,
        /// One JSON object per blob.
        #[arg(long)]
        json: bool,
    },
    /// Download a blob by content id (checked against its hash) to --out or standard output.
    Get {
        #[command(flatten)]
        op: OperatorArgs,
        /// The content id (64 hex digits).
        id: String,
        /// Write here (replaced only once the whole blob verified) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct OperatorArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Operator certificate to use: operator.<NAME>.pem in transport.tls_dir.
    #[arg(long, value_name = "NAME", default_value = "admin", env = "ROLLOUT_OPERATOR")]
    operator: String,
    /// Coordinator address instead of transport.coordinator_addr (host:port).
    #[arg(long, value_name = "ADDR")]
    coordinator: Option<String>,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create the development CA (once; idempotent), the coordinator's server
    /// certificate and the operator certificate "admin", in transport.tls_dir.
    Init {
        #[command(flatten)]
        common: CommonArgs,
        /// Extra names (DNS or IP) for the coordinator certificate; localhost and 127.0.0.1 are always included.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Issue a certificate signed by the CA in transport.tls_dir.
    Issue {
        #[command(flatten)]
        common: CommonArgs,
        /// A worker client certificate named after this worker id.
        #[arg(long, value_name = "ID", group = "kind")]
        worker: Option<String>,
        /// An operator client certificate with this name.
        #[arg(long, value_name = "NAME", group = "kind")]
        operator: Option<String>,
        /// The coordinator's server certificate (with --san names).
        #[arg(long, group = "kind")]
        server: bool,
        /// Extra names for --server.
        #[arg(long = "san", value_name = "NAME", requires = "server")]
        sans: Vec<String>,
        /// How long it is valid, e.g. 12h or 30d (default: transport.worker_cert_lifetime,
        /// operator_cert_lifetime or server_cert_lifetime).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        valid_for: Option<std::time::Duration>,
    },
    /// Revoke certificates: the coordinator refuses them at the handshake and on every
    /// RPC, and closes their connections within a fraction of a second (it reads the
    /// deny list in transport.tls_dir/revoked). Run it where the CA is. A worker's
    /// leases then follow the failure path (its deadline). Revoking a worker or operator
    /// revokes every unexpired certificate issued to it.
    Revoke {
        #[command(flatten)]
        common: CommonArgs,
        /// Every certificate of this worker.
        #[arg(long, value_name = "ID", group = "who")]
        worker: Option<String>,
        /// Every certificate of this operator.
        #[arg(long, value_name = "NAME", group = "who")]
        operator: Option<String>,
        /// One certificate, by serial number (hex, as `certs list` prints it).
        #[arg(long, value_name = "HEX", group = "who")]
        serial: Option<String>,
    },
    /// Start a CA rotation: a new CA signs from now on (and new bootstrap tokens pin
    /// it), the old one stays trusted, the coordinator gets a server certificate from
    /// the new CA that clients trusting only the old one still verify (through a
    /// cross-signed certificate, ca.cross.pem). A running coordinator picks it up within
    /// a second. Workers move to the new CA, and get the new bundle, at their next
    /// renewal; then `certs retire-ca`.
    RotateCa {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// End a CA rotation: stop trusting the previous CA. Refused, with the list, while
    /// any worker, operator or the coordinator still holds a certificate from it.
    RetireCa {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// The trusted CAs (the current one first) and, for each, which identities hold a
    /// certificate from it (their newest unexpired, unrevoked one).
    Status {
        #[command(flatten)]
        common: CommonArgs,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List the certificates in transport.tls_dir (the CA, the coordinator's, workers'
    /// and operators', and those enrollment issued) with serial number, expiry and
    /// whether each is still valid.
    List {
        #[command(flatten)]
        common: CommonArgs,
        /// One JSON object per certificate instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a single-use bootstrap token for `rollout worker --join ADDR --token T`.
    ///
    /// Run it where the coordinator's transport.tls_dir is (it reads ca.pem and writes
    /// the token's record to tokens/<id>.json, mode 0600). The token carries a random id
    /// and 128-bit secret, its expiry, the worker id it is bound to (with --worker) and
    /// the SHA-256 of the CA certificate, which the joining worker checks the coordinator
    /// against before sending anything. The record keeps only a hash of the secret. The
    /// token alone goes to standard output; a summary goes to standard error.
    Create {
        #[command(flatten)]
        common: CommonArgs,
        /// How long the token works, e.g. 15m or 2h (at most 168h).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// Only this worker id may enroll with the token. Needed to replace the
        /// certificate of a worker id that already has one.
        #[arg(long, value_name = "ID")]
        worker: Option<String>,
    },
    /// List the token records in transport.tls_dir: id, worker, expiry, and use.
    List {
        #[command(flatten)]
        common: CommonArgs,
        /// One JSON object per token instead of the table:
        /// {"id":..,"worker":..|null,"expires_at_unix_ms":..,"state":"unused"|"expired"|"used","used_by":..|null,"used_at_unix_ms":..|null}
        #[arg(long)]
        json: bool,
    },
    /// Remove a token's record so it can no longer be used.
    Revoke {
        #[command(flatten)]
        common: CommonArgs,
        /// The token id (the second part of the token, as `token list` shows it).
        id: String,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    duration_text::parse(text)
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk the whole audit chain in <storage.data_dir>/rollout.db and report the first
    /// entry that does not verify. Run it while the coordinator is stopped (the
    /// database is locked while it runs).
    Verify {
        #[command(flatten)]
        common: CommonArgs,
        /// Print {"database":..,"verified":true,"entries":N} instead of the sentence (a
        /// chain that does not verify is still an error, exit status 1).
        #[arg(long)]
        json: bool,
    },
    /// Verify the audit chain, then write the coordinator's history from it: one JSON
    /// history record per line (the format `rollout check` reads), node "coordinator".
    ///
    /// The audit chain is committed with the state changes it records, so this is the
    /// complete coordinator history even across crashes. The JSON-lines stream a running
    /// coordinator emits is written after each commit and may miss the last batch
    /// before a kill -9. Run it while the coordinator is stopped.
    Export {
        #[command(flatten)]
        common: CommonArgs,
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan { config } => plan(config),
        Command::Certs { command } => report(certs::run(command)),
        Command::Token { command } => report(token::run(command)),
        Command::Audit { command: AuditCommand::Verify { common, json } } => report(ops::audit_verify(&common, json)),
        Command::Audit { command: AuditCommand::Export { common, out } } => {
            report(ops::audit_export(&common, out.as_deref()))
        }
        Command::Check { files, strict_overlap, complete, states } => {
            check::run(&files, &states, strict_overlap, complete)
        }
        other => {
            init_logging();
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            report(runtime.block_on(run_async(other)))
        }
    }
}

async fn run_async(command: Command) -> Result<(), Error> {
    match command {
        Command::Coordinator { common, listen, history } => run::coordinator(&common, listen, history).await,
        Command::Worker { common, id, slots, coordinator, join, token, history, metrics_addr } => {
            let join = join.zip(token);
            run::worker(&common, &id, slots, coordinator, join, history, metrics_addr).await
        }
        Command::Submit { op, file, no_wait, json } => ops::submit(&op, &file, !no_wait, json).await,
        Command::Status { op, json, all, job, finished } => {
            let view = match (all, job) {
                (true, _) => ops::StatusView::All,
                (false, Some(job)) => ops::StatusView::Job(ops::parse_job(&job)?),
                (false, None) => ops::StatusView::Current { recent: finished },
            };
            ops::status(&op, json, view).await
        }
        Command::Results { op, job, bytes, from, follow: false, .. } => ops::results(&op, &job, bytes, from).await,
        Command::Results { op, job, bytes, follow: true, after, .. } => ops::follow(&op, &job, bytes, after).await,
        Command::Cancel { op, job } => ops::cancel(&op, &job).await,
        Command::Blob { command: BlobCommand::Put { op, file, json } } => ops::blob_put(&op, &file, json).await,
        Command::Blob { command: BlobCommand::Ls { op, json } } => ops::blob_ls(&op, json).await,
        Command::Blob { command: BlobCommand::Get { op, id, out } } => ops::blob_get(&op, &id, out.as_deref()).await,
        Command::Drain { op, worker } => ops::drain(&op, &worker).await,
        Command::Plan { .. }
        | Command::Certs { .. }
        | Command::Token { .. }
        | Command::Audit { .. }
        | Command::Check { .. } => Ok(()),
    }
}

fn report(result: Result<(), Error>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_code_for(&e))
        }
    }
}

/// Logs to standard error; RUST_LOG overrides the default level (info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// The effective config of a command.
fn load_config(common: &CommonArgs) -> Result<Config, Error> {
    Config::load(common.config.as_deref(), std::env::vars())
}

fn plan(config_path: Option<PathBuf>) -> ExitCode {
    // The file's [[plugins]] are validated too (without loading them).
    let plugins = |path: &Option<PathBuf>| match path {
        Some(path) => rollout_plugin_host::plugin_specs_from_config_file(path),
        None => Ok(Vec::new()),
    };
    match Config::load(config_path.as_deref(), std::env::vars()).and_then(|c| Ok((c, plugins(&config_path)?))) {
        Ok((config, plugins)) => {
            print!("{}", render_plan(&config));
            for p in plugins {
                println!("# plugin {:?}: {:?}", p.name, p.mode);
            }
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
