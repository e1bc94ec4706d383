//! The Redis side of `make bench-compare`: rollout's no-op workload through Redis
//! Streams with a consumer group, as a task queue would use it. Redis runs with
//! `appendonly yes`, `appendfsync always` (started by `scripts/bench-compare.sh`), so a
//! write is on disk before its reply.
//!
//! - Producer: `XADD tasks * p <payload> t <enqueue time>`, pipelined in batches.
//! - Two workers, each on its own connection: `XREADGROUP GROUP g <name> COUNT n BLOCK
//!   100 STREAMS tasks >`, then per batch one pipeline of `XADD results * task <id>
//!   result <payload>` for each task and one `XACK tasks g <ids..>`: the result is
//!   durable before the task is acknowledged, as rollout's commit is.
//!
//! Measured, as `key value..` lines on stdout:
//! - `throughput <tasks/s>`: `--tasks` tasks, first XADD to last XACK.
//! - `latency_one <p50 ms> <p99 ms>`: one task at a time, enqueue (just before its
//!   XADD) to start (its worker read it), `--samples` tasks.
//! - `latency_load <rate> <p50 ms> <p99 ms>`: open loop at `--load` of the measured
//!   throughput for `--seconds`: whatever is due goes out as one pipeline, each task
//!   stamped with the time it was due.
//!
//! Usage: redis-streams-bench --port P [--tasks N] [--samples N] [--load F] [--seconds S]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use redis::{Connection, Value};

const WORKERS: usize = 2;
const PRODUCE_BATCH: u64 = 1_000;
const READ_COUNT: usize = 512;

struct Args {
    port: u16,
    tasks: u64,
    samples: u64,
    load: f64,
    seconds: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { port: 0, tasks: 200_000, samples: 1_000, load: 0.5, seconds: 5 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--port" => args.port = value.parse().map_err(|e| bad(&e))?,
            "--tasks" => args.tasks = value.parse().map_err(|e| bad(&e))?,
            "--samples" => args.samples = value.parse().map_err(|e| bad(&e))?,
            "--load" => args.load = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => args.seconds = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag} (--port, --tasks, --samples, --load, --seconds)")),
        }
    }
    if args.port == 0 {
        return Err("--port is required".into());
    }
    Ok(args)
}

fn connect(port: u16) -> redis::RedisResult<Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()
}

/// The entries of an XREADGROUP reply: `(id, fields)`.
fn entries(reply: Value) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let bytes = |v: Value| match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    let Value::Array(streams) = reply else { return out };
    for stream in streams {
        let Value::Array(mut pair) = stream else { continue };
        let Some(Value::Array(items)) = pair.pop() else { continue };
        for item in items {
            let Value::Array(mut entry) = item else { continue };
            let fields = match entry.pop() {
                Some(Value::Array(fields)) => fields.into_iter().map(bytes).collect(),
                _ => Vec::new(),
            };
            let id = entry.pop().map(bytes).unwrap_or_default();
            out.push((id, fields));
        }
    }
    out
}

/// What the workers share: tasks done, start latencies of tasks that carry an
/// enqueue time, and a signal per task done (for one-at-a-time runs).
struct Shared {
    epoch: Instant,
    done: AtomicU64,
    stop: AtomicBool,
    latencies: Mutex<Vec<u64>>,
}

fn worker(port: u16, name: String, shared: Arc<Shared>, each: mpsc::Sender<()>) -> redis::RedisResult<()> {
    let mut con = connect(port)?;
    while !shared.stop.load(Ordering::Relaxed) {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(&name)
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg("tasks")
            .arg(">")
            .query(&mut con)?;
        let read_at = shared.epoch.elapsed().as_nanos() as u64;
        let batch = entries(reply);
        if batch.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        let mut ack = redis::cmd("XACK");
        ack.arg("tasks").arg("g");
        let mut lat = Vec::new();
        for (id, fields) in &batch {
            let payload = fields.get(1).cloned().unwrap_or_default();
            if let Some(t) = fields.get(3).and_then(|t| std::str::from_utf8(t).ok()?.parse::<u64>().ok()) {
                lat.push(read_at.saturating_sub(t));
            }
            pipe.cmd("XADD").arg("results").arg("*").arg("task").arg(id.as_slice()).arg("result").arg(payload).ignore();
            ack.arg(id.as_slice());
        }
        pipe.add_command(ack).ignore();
        pipe.query::<()>(&mut con)?;
        if !lat.is_empty() {
            shared.latencies.lock().unwrap_or_else(PoisonError::into_inner).extend(lat);
        }
        shared.done.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for _ in 0..batch.len() {
            let _ = each.send(());
        }
    }
    Ok(())
}

fn reset(con: &mut Connection) -> redis::RedisResult<()> {
    redis::cmd("DEL").arg("tasks").arg("results").query::<()>(con)?;
    redis::cmd("XGROUP").arg("CREATE").arg("tasks").arg("g").arg("$").arg("MKSTREAM").query::<()>(con)
}

struct Cluster {
    shared: Arc<Shared>,
    done_rx: mpsc::Receiver<()>,
    workers: Vec<thread::JoinHandle<redis::RedisResult<()>>>,
}

fn start(port: u16) -> redis::RedisResult<Cluster> {
    reset(&mut connect(port)?)?;
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        latencies: Mutex::new(Vec::new()),
    });
    let (tx, done_rx) = mpsc::channel();
    let workers = (0..WORKERS)
        .map(|i| {
            let (shared, tx) = (Arc::clone(&shared), tx.clone());
            thread::spawn(move || worker(port, format!("w{}", i + 1), shared, tx))
        })
        .collect();
    Ok(Cluster { shared, done_rx, workers })
}

impl Cluster {
    fn stop(self) -> redis::RedisResult<Vec<u64>> {
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.join().map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "a worker panicked")))??;
        }
        let mut lat = std::mem::take(&mut *self.shared.latencies.lock().unwrap_or_else(PoisonError::into_inner));
        lat.sort_unstable();
        Ok(lat)
    }

    fn now_ns(&self) -> u64 {
        self.shared.epoch.elapsed().as_nanos() as u64
    }
}

fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

fn throughput(port: u16, tasks: u64) -> redis::RedisResult<f64> {
    let cluster = start(port)?;
    let mut con = connect(port)?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < tasks {
        let n = PRODUCE_BATCH.min(tasks - sent);
        let mut pipe = redis::pipe();
        for i in sent..sent + n {
            pipe.cmd("XADD").arg("tasks").arg("*").arg("p").arg(format!("task-{i:08}")).ignore();
        }
        pipe.query::<()>(&mut con)?;
        sent += n;
    }
    while cluster.shared.done.load(Ordering::Relaxed) < tasks {
        thread::sleep(Duration::from_micros(200));
    }
    let rate = tasks as f64 / started.elapsed().as_secs_f64();
    cluster.stop()?;
    Ok(rate)
}

fn latency_one(port: u16, samples: u64) -> redis::RedisResult<Vec<u64>> {
    let cluster = start(port)?;
    let mut con = connect(port)?;
    for i in 0..samples {
        let t = cluster.now_ns();
        redis::cmd("XADD")
            .arg("tasks")
            .arg("*")
            .arg("p")
            .arg(format!("one-{i}"))
            .arg("t")
            .arg(t)
            .query::<()>(&mut con)?;
        let _ = cluster.done_rx.recv_timeout(Duration::from_secs(5));
    }
    cluster.stop()
}

fn latency_load(port: u16, rate: f64, seconds: u64) -> redis::RedisResult<Vec<u64>> {
    let cluster = start(port)?;
    let mut con = connect(port)?;
    let total = (rate * seconds as f64) as u64;
    let started = cluster.now_ns();
    let due_at = |i: u64| started + (i as f64 * 1e9 / rate) as u64;
    let mut sent = 0;
    // Open loop: whatever is due goes out at once, in one pipeline, stamped with the
    // time it was due (a producer that falls behind counts its own delay).
    while sent < total {
        let now = cluster.now_ns();
        let due = (((now - started) as f64) * rate / 1e9) as u64 + 1;
        let upto = due.min(total);
        if upto <= sent {
            thread::sleep(Duration::from_micros(100));
            continue;
        }
        let mut pipe = redis::pipe();
        for i in sent..upto {
            pipe.cmd("XADD").arg("tasks").arg("*").arg("p").arg(format!("load-{i}")).arg("t").arg(due_at(i)).ignore();
        }
        pipe.query::<()>(&mut con)?;
        sent = upto;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.shared.done.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    cluster.stop()
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("redis-streams-bench: {e}");
            std::process::exit(2);
        }
    };
    let run = || -> redis::RedisResult<()> {
        let rate = throughput(args.port, args.tasks)?;
        println!("throughput {rate:.0}");
        let one = latency_one(args.port, args.samples)?;
        println!("latency_one {:.3} {:.3}", percentile_ms(&one, 0.5), percentile_ms(&one, 0.99));
        let load_rate = rate * args.load;
        let load = latency_load(args.port, load_rate, args.seconds)?;
        println!("latency_load {load_rate:.0} {:.3} {:.3}", percentile_ms(&load, 0.5), percentile_ms(&load, 0.99));
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("redis-streams-bench: {e}");
        std::process::exit(1);
    }
}
