#!/usr/bin/env bash
# Coordinator crash test of the real binaries (what `make crash-test` runs after the build):
#
#   1 coordinator + 2 workers (w1, w2) on loopback under mutual TLS, with the built-in
#   plugins only (echo, sleep). Load: BIG_JOBS jobs of BIG_TASKS `sleep` tasks of 20-50 ms
#   each, plus a stream of small `echo` jobs submitted back to back by a background loop
#   (one `rollout submit --no-wait --json` per job; its exit status and its "queued"
#   line say whether it was acknowledged, and which job it got).
#
#   While tasks run and a stream submit is (probably) in flight, the coordinator is
#   killed with SIGKILL and restarted on the same data dir and port, with a new history
#   file per incarnation (coordinator.1.jsonl, .2, ...). With CRASHES=2 (the default) the
#   restarted coordinator is killed again as soon as it has something in flight (its
#   first lease after the restart, i.e. right after recovery and re-registration) and
#   started a third time (CRASHES=N: N kills in all). The workers are never restarted: they must find the new
#   coordinator with their own reconnect backoff.
#
#   Submits that were not acknowledged (refused or cut off by the kill) are retried
#   once the last coordinator is up: the same file gives the same idempotency key, so a
#   job that had been accepted before the crash must come back with its old id.
#
#   Asserts:
#   - every acknowledged job (and every retried one) exists after the restarts, with its
#     name and all its tasks, every task committed with the right result (its payload);
#   - no job name was queued twice (idempotent retries across the crash);
#   - over the coordinator's complete history (`rollout audit export`: its audit chain,
#     committed with every state change), every task of those jobs has exactly one
#     `committed` event, and each of their jobs exactly one `job_accepted`;
#   - the JSON-lines streams the incarnations wrote hold nothing the chain does not (a
#     kill may cut the last batch's records from a stream: counted and printed);
#   - no task is charged a failed attempt for a restart (its worker re-registering with
#     the restarted coordinator costs a re-run, not one of tasks.max_attempts);
#   - `rollout audit verify` passes and `rollout check --complete` over the exported
#     coordinator history and both workers' holds every invariant.
#   Prints, per crash, kill -> restart -> first commit after the restart, and how many
#   tasks leased before the kill (not committed) were leased again after it.
#
# Everything lives in a fresh temp dir on a free port; the dir is removed on success
# and kept (path printed, with the tails of the logs) on failure or with KEEP=1.
#
# Usage: scripts/coordinator-crash.sh   (ROLLOUT=path/to/rollout; CRASHES=2,
#        BIG_JOBS=4, BIG_TASKS=100, SLOTS=4, RESTART_DELAY_MS=200)
set -euo pipefail
cd "$(dirname "$0")/.."

ROLLOUT=${ROLLOUT:-${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}/debug/rollout}
CRASHES=${CRASHES:-2}
BIG_JOBS=${BIG_JOBS:-4}
BIG_TASKS=${BIG_TASKS:-100}
SLOTS=${SLOTS:-4}
# How long the coordinator stays dead before each restart.
RESTART_DELAY_MS=${RESTART_DELAY_MS:-200}
STREAM_TASKS=3
# HEARTBEAT_MS, SELF_FENCE_MS, ...: the test cluster's health settings; say, die, now_ms.
LOG_PREFIX=crash-test
source scripts/lib/cluster.sh

[[ -x $ROLLOUT ]] || die "no rollout binary at $ROLLOUT (run \`make build\` first, or set ROLLOUT)"
[[ $CRASHES =~ ^[1-9][0-9]*$ ]] || die "CRASHES must be a positive number"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rollout-crash.XXXXXX")
cfg=$tmp/crash.toml
coord_pid=
stream_pid=
declare -A worker_pid
ok=0

stop_stream() {
    [[ -n $stream_pid ]] || return 0
    touch "$tmp/stream.stop"
    wait "$stream_pid" 2>/dev/null || true
    stream_pid=
}
stop_all() {
    stop_stream
    local w
    for w in "${!worker_pid[@]}"; do stop_pid "${worker_pid[$w]}"; done
    worker_pid=()
    stop_pid "$coord_pid"
    coord_pid=
}
on_exit() {
    stop_all
    finish_tmp crash-test "${KEEP:-}" "config, logs, histories, submit records"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

port=$(free_port)
cluster_config "$port" "$tmp" >"$cfg"

say "config $cfg (heartbeat ${HEARTBEAT_MS}ms, self-fence ${SELF_FENCE_MS}ms, failure timeout ${FAILURE_TIMEOUT_MS}ms, reconnect backoff 50ms..1s)"
"$ROLLOUT" plan --config "$cfg" >"$tmp/plan.txt" || die "rollout plan rejected the config: $(cat "$tmp/plan.txt")"
"$ROLLOUT" certs init --config "$cfg" >/dev/null
for w in w1 w2; do "$ROLLOUT" certs issue --config "$cfg" --worker "$w" >/dev/null; done

# Incarnation N of the coordinator writes coordinator.N.jsonl and coordinator.N.log.
# Odd incarnations run with the write-ahead log (storage.wal_bytes, 1 MiB), even ones
# without it: the first kill is recovered by replaying the log and turning it off, the
# second by the plain database, and the third start turns the log on again.
incarnation=0
start_coordinator() {
    incarnation=$((incarnation + 1))
    local wal_bytes=0
    if ((incarnation % 2 == 1)); then wal_bytes=1048576; fi
    ROLLOUT_STORAGE__WAL_BYTES=$wal_bytes "$ROLLOUT" coordinator --config "$cfg" \
        --history "$tmp/coordinator.$incarnation.jsonl" 2>"$tmp/coordinator.$incarnation.log" &
    coord_pid=$!
}
kill_coordinator() {
    disown "$coord_pid" # no "Killed" job notice from bash
    kill -KILL "$coord_pid"
    for _ in $(seq 1 200); do
        kill -0 "$coord_pid" 2>/dev/null || break
        sleep 0.01
    done
    kill -0 "$coord_pid" 2>/dev/null && die "the coordinator (pid $coord_pid) survived SIGKILL"
    coord_pid=
}
status_json() { "$ROLLOUT" status --config "$cfg" --all --json 2>/dev/null; }

say "coordinator on 127.0.0.1:$port, workers w1 and w2 ($SLOTS slots each, built-in echo/sleep)"
start_coordinator
for w in w1 w2; do
    "$ROLLOUT" worker --config "$cfg" --id "$w" --slots "$SLOTS" --history "$tmp/$w.history.jsonl" 2>"$tmp/$w.log" &
    worker_pid[$w]=$!
done
deadline=$(($(now_ms) + 30000))
until status_json | python3 -c '
import json, sys
try:
    workers = {w["worker_id"]: w["state"] for w in json.load(sys.stdin)["workers"]}
except ValueError:
    sys.exit(1)
sys.exit(0 if all(workers.get(w) == "active" for w in ("w1", "w2")) else 1)
'; do
    for w in w1 w2; do kill -0 "${worker_pid[$w]}" 2>/dev/null || die "worker $w exited during start-up"; done
    (($(now_ms) < deadline)) || die "the workers did not register within 30s"
    sleep 0.1
done
say "both workers registered"

# The stream: small echo jobs, one submit each, back to back until stream.stop exists.
# submits.txt gets one line per submit: index, exit status, start and end (unix ms).
mkdir "$tmp/stream"
stream_loop() {
    local i=0 start rc
    while [[ ! -e $tmp/stream.stop ]]; do
        i=$((i + 1))
        local f=$tmp/stream/s$i.jsonl
        : >"$f"
        for k in $(seq 1 $STREAM_TASKS); do
            echo "{\"plugin\":\"echo\",\"payload\":\"stream-$i-$k\",\"job\":\"stream-$i\"}" >>"$f"
        done
        start=$(now_ms)
        rc=0
        # A submit cut off by the kill fails at once (the connection is reset); the
        # timeout only keeps a hung one from stalling the test.
        timeout 10 "$ROLLOUT" submit --config "$cfg" --no-wait --json "$f" >"$tmp/stream/s$i.out" 2>"$tmp/stream/s$i.err" || rc=$?
        echo "$i $rc $start $(now_ms)" >>"$tmp/submits.txt"
        if ((rc != 0)); then sleep 0.1; else sleep 0.02; fi
    done
}
: >"$tmp/submits.txt"
stream_loop &
stream_pid=$!

big=$tmp/big.jsonl
: >"$big"
for j in $(seq 1 "$BIG_JOBS"); do
    for i in $(seq 0 $((BIG_TASKS - 1))); do
        echo "{\"plugin\":\"sleep\",\"payload\":\"$((20 + (i * 7 + j) % 31))\",\"job\":\"big-$j\"}" >>"$big"
    done
done
total_big=$((BIG_JOBS * BIG_TASKS))
say "submitting $BIG_JOBS jobs x $BIG_TASKS sleep tasks (20-50 ms) and a stream of $STREAM_TASKS-task echo jobs"
"$ROLLOUT" submit --config "$cfg" --no-wait --json "$big" >"$tmp/big.out" 2>"$tmp/big.err" ||
    die "submitting the big jobs failed: $(cat "$tmp/big.err")"
[[ $(grep -c '"event":"queued"' "$tmp/big.out") == "$BIG_JOBS" ]] || die "unexpected submit output: $(cat "$tmp/big.out")"

# Waits until the current coordinator's history shows at least $1 commits and $2
# leases not yet committed (a python exit status), or dies after $3 ms.
wait_history() {
    local min_commits=$1 min_held=$2 limit=$3 what=$4
    local deadline=$(($(now_ms) + limit))
    until python3 - "$tmp/coordinator.$incarnation.jsonl" "$min_commits" "$min_held" <<'PY'; do
import json, sys
path, min_commits, min_held = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held, commits = set(), 0
try:
    lines = open(path).readlines()
except OSError:
    sys.exit(1)
for line in lines:
    try:
        r = json.loads(line)
    except ValueError:
        break  # a line still being written
    if r["event"] == "leased":
        held.add(r["task"])
    elif r["event"] in ("committed", "requeued", "dead_lettered", "cancelled"):
        held.discard(r["task"])
        commits += r["event"] == "committed"
sys.exit(0 if commits >= min_commits and len(held) >= min_held else 1)
PY
        kill -0 "$coord_pid" 2>/dev/null || die "coordinator incarnation $incarnation exited by itself: $(tail -n 5 "$tmp/coordinator.$incarnation.log")"
        (($(now_ms) < deadline)) || die "$what"
        sleep 0.02
    done
}

# crash N: kill the current coordinator, wait RESTART_DELAY_MS, start the next one.
# Records kill and restart times in crashes.txt.
crash() {
    local kill_ms restart_ms
    kill_ms=$(now_ms)
    kill_coordinator
    local killed=$incarnation
    sleep_ms "$RESTART_DELAY_MS"
    restart_ms=$(now_ms)
    start_coordinator
    echo "$killed $kill_ms $restart_ms" >>"$tmp/crashes.txt"
    say "killed coordinator incarnation $killed (SIGKILL), restarted it $((restart_ms - kill_ms)) ms later as incarnation $incarnation"
}
: >"$tmp/crashes.txt"

# Crash 1: under load, once a quarter of the big tasks are done and leases are out, and
# the stream has been acknowledged at least once.
wait_history $((total_big / 4)) 4 30000 "the big jobs did not get a quarter done within 30s"
deadline=$(($(now_ms) + 30000))
until grep -q ' 0 ' "$tmp/submits.txt"; do
    (($(now_ms) < deadline)) || die "no stream submit was acknowledged within 30s"
    sleep 0.02
done
crash
for _ in $(seq 2 "$CRASHES"); do
    # Crash 2 (and later ones): as soon as the restarted coordinator has leased work
    # again (during re-registration and the first leases after recovery).
    wait_history 0 1 30000 "the restarted coordinator leased nothing within 30s"
    crash
done

# Everything acknowledged finishes on the last coordinator.
say "waiting for every acknowledged job to finish"
wait_history 1 0 30000 "the last coordinator committed nothing within 30s of its start"
stop_stream
# Retry every submit that was not acknowledged: same file, same idempotency key.
retried=0
while read -r i rc _ _; do
    ((rc != 0)) || continue
    "$ROLLOUT" submit --config "$cfg" --no-wait --json "$tmp/stream/s$i.jsonl" >"$tmp/stream/s$i.retry.out" 2>"$tmp/stream/s$i.retry.err" ||
        die "retrying stream submit $i failed: $(cat "$tmp/stream/s$i.retry.err")"
    retried=$((retried + 1))
done <"$tmp/submits.txt"
say "retried $retried unacknowledged stream submits"

deadline=$(($(now_ms) + 60000))
until status_json >"$tmp/status.json" && python3 - "$tmp/status.json" <<'PY' 2>"$tmp/done.err"; do
import json, sys
jobs = json.load(open(sys.argv[1]))["jobs"]
bad = [j for j in jobs if j["dead_lettered"] or j["cancelled"]]
if bad:
    sys.exit("tasks were dead-lettered or cancelled: %s" % bad)
sys.exit(0 if all(j["committed"] == j["tasks"] for j in jobs) else 1)
PY
    [[ -s $tmp/done.err ]] && die "$(cat "$tmp/done.err")"
    if (($(now_ms) >= deadline)); then
        die "not every job finished within 60s of the last restart: $(python3 -c '
import json, sys
print([(j["job"], j["name"], "%d/%d" % (j["committed"], j["tasks"])) for j in json.load(open(sys.argv[1]))["jobs"] if j["committed"] != j["tasks"]][:10])' "$tmp/status.json")"
    fi
    sleep 0.2
done
say "every job finished"

# Results (from the coordinator's database) of every job.
mkdir "$tmp/results"
for job in $(python3 -c 'import json, sys; print(" ".join(str(j["job"]) for j in json.load(open(sys.argv[1]))["jobs"]))' "$tmp/status.json"); do
    "$ROLLOUT" results --config "$cfg" --bytes "$job" >"$tmp/results/$job.jsonl" || die "rollout results $job failed"
done

say "stopping the coordinator and the workers (SIGINT)"
stop_all
# The odd incarnations ran with the write-ahead log: its file is there, holding records
# (the last start turned it on again after the even one had replayed and emptied it).
wal=$tmp/data/rollout.db.wal
wal_size=$(stat -c %s "$wal" 2>/dev/null || echo 0)
# The coordinator's complete history: its audit chain, committed with every state change
# it records. (The JSON-lines stream of each incarnation is written after each commit,
# so a SIGKILL can cut its last batch: the streams must be a subset of this.)
failed=()
if "$ROLLOUT" audit export --config "$cfg" --out "$tmp/coordinator.audit.jsonl" 2>"$tmp/audit-export.err"; then
    say "audit export: $(cat "$tmp/audit-export.err")"
else
    die "rollout audit export failed: $(cat "$tmp/audit-export.err")"
fi

# The assertions, the audit chain and `rollout check` all run (and report) before the
# verdict, so a failing run shows every symptom.
python3 - "$tmp" "$incarnation" <<'PY' || failed+=("the assertions above")
import collections, glob, json, os, re, sys

tmp, incarnations = sys.argv[1], int(sys.argv[2])
failures = []

def lines(path):
    return [l for l in open(path).read().splitlines() if l.strip()]

def expected_tasks(path):
    """job name -> [payload of task 0, 1, ...] from a submit file."""
    out = collections.defaultdict(list)
    for l in lines(path):
        t = json.loads(l)
        out[t["job"]].append(t["payload"])
    return out

def acked(out_path):
    """job name -> job id, from a submit's --json output."""
    got = {}
    for l in lines(out_path):
        try:
            line = json.loads(l)
        except ValueError:
            failures.append(f"{out_path}: not a JSON line: {l!r}")
            continue
        if line.get("event") != "queued":
            failures.append(f"{out_path}: unexpected line {l!r}")
            continue
        got[line["name"]] = line["id"]
    return got

# What was acknowledged: the big jobs, every stream submit that exited 0, and every
# retried one (the retry is acknowledged too).
want = {}  # job name -> (job id, payloads)
for name, job in acked(f"{tmp}/big.out").items():
    want[name] = (job, expected_tasks(f"{tmp}/big.jsonl")[name])
submits = [l.split() for l in lines(f"{tmp}/submits.txt")]
crashes = [tuple(map(int, l.split())) for l in lines(f"{tmp}/crashes.txt")]
acked_stream = retried_same = retried_new = in_flight = 0
for i, rc, start, end in submits:
    rc, start, end = int(rc), int(start), int(end)
    in_flight += any(start <= kill <= end for _, kill, _ in crashes)
    spec = expected_tasks(f"{tmp}/stream/s{i}.jsonl")
    if rc == 0:
        acked_stream += 1
        got = acked(f"{tmp}/stream/s{i}.out")
    else:
        got = acked(f"{tmp}/stream/s{i}.retry.out")
    for name, job in got.items():
        want[name] = (job, spec[name])

# The coordinator histories, one per incarnation.
hist = []
for n in range(1, incarnations + 1):
    hist.append([json.loads(l) for l in lines(f"{tmp}/coordinator.{n}.jsonl")])
accepted_in = {}  # job id -> incarnation that accepted it
accepts = collections.Counter()
for n, records in enumerate(hist, 1):
    for r in records:
        if r["event"] == "job_accepted":
            accepts[r["job"]] += 1
            accepted_in.setdefault(r["job"], n)

# Retried submits: accepted before a crash (same id back) or only on the retry.
for i, rc, start, end in submits:
    if int(rc) != 0:
        for name, job in acked(f"{tmp}/stream/s{i}.retry.out").items():
            # The retry went to the last incarnation: if that one did not accept the job,
            # an earlier one had (even if the kill lost its job_accepted event).
            if accepted_in.get(job) == incarnations:
                retried_new += 1
            else:
                retried_same += 1

# 1. Every acknowledged job exists, with its name and all its tasks, every task
#    committed with its payload as result.
status = json.load(open(f"{tmp}/status.json"))
by_id = {j["job"]: j for j in status["jobs"]}
for name, (job, payloads) in sorted(want.items()):
    j = by_id.get(job)
    if j is None:
        failures.append(f"job-{job} ({name}) was acknowledged but is gone after the restart")
        continue
    if j["name"] != name or j["tasks"] != len(payloads) or j["committed"] != len(payloads):
        failures.append(f"job-{job}: expected {name!r} with {len(payloads)} committed tasks, status says {j}")
    results = [json.loads(l) for l in lines(f"{tmp}/results/{job}.jsonl")]
    wrong = [r for r in results if r["state"] != "committed"
             or r.get("result") != payloads[int(r["task"].rsplit(".", 1)[1])]]
    if len(results) != len(payloads) or wrong:
        failures.append(f"job-{job} ({name}): {len(results)} results of {len(payloads)}, wrong: {wrong[:3]}")

# 2. No job name queued twice (a retry of an accepted submit must not make a new job).
names = collections.Counter(j["name"] for j in status["jobs"])
twice = {n: c for n, c in names.items() if c > 1}
if twice:
    failures.append(f"job names queued more than once: {twice}")
unknown = sorted(set(names) - set(want))
if unknown:
    # Accepted but never acknowledged, and not retried: cannot happen (every
    # unacknowledged submit is retried).
    failures.append(f"jobs nobody was told about: {unknown}")

# 3. Exactly once over the coordinator's whole history (the audit chain, across every
#    incarnation): one job_accepted per job, one committed per task.
audit = [json.loads(l) for l in lines(f"{tmp}/coordinator.audit.jsonl")]
commits = collections.Counter(r["task"] for r in audit if r["event"] == "committed")
accepts = collections.Counter(r["job"] for r in audit if r["event"] == "job_accepted")
# The streams the incarnations emitted hold nothing the chain does not (each record
# once), and miss at most what a kill cut off.
# (The chain keeps milliseconds; the streams' microseconds are left out of the match.)
def key(r):
    return json.dumps({k: v for k, v in r.items() if k not in ("seq", "node", "wall_unix_us")}, sort_keys=True)
chain = collections.Counter(map(key, audit))
streamed = collections.Counter(key(r) for h in hist for r in h)
extra = streamed - chain
if extra:
    failures.append(f"{sum(extra.values())} streamed history records are not in the audit chain, e.g. {next(iter(extra))}")
cut = sum((chain - streamed).values())
print(f"crash-test: audit chain {len(audit)} records; the incarnations' streams {sum(streamed.values())}; "
      f"{cut} cut from the streams by the kills (committed, then killed before they were written)")
gap = "in the database (status/results) but missing from the audit chain"
for name, (job, payloads) in sorted(want.items()):
    if accepts[job] != 1:
        failures.append(f"job-{job} ({name}): {accepts[job]} job_accepted events (expected 1)"
                        + (f"; the job is {gap}" if accepts[job] == 0 and job in by_id else ""))
    results = {r["task"]: r for r in map(json.loads, lines(f"{tmp}/results/{job}.jsonl"))} if job in by_id else {}
    for t in range(len(payloads)):
        n = commits[f"job-{job}.{t}"]
        if n != 1:
            r = results.get(f"job-{job}.{t}", {})
            failures.append(f"job-{job}.{t} ({name}): committed {n} times in the coordinator histories"
                            + (f"; its commit (attempts {r['attempts']}) is {gap}" if n == 0 and r.get("state") == "committed" else ""))
if len(failures) > 20:
    failures[20:] = [f"... and {len(failures) - 20} more"]

# Timings and re-leases per crash: tasks leased by the killed incarnation and not
# committed (nor otherwise ended) by it, which a later incarnation leased again.
for n, (killed, kill_ms, restart_ms) in enumerate(crashes, 1):
    before, after = hist[killed - 1], hist[killed]
    held = set()
    for r in before:
        if r["event"] == "leased":
            held.add(r["task"])
        elif r["event"] in ("committed", "requeued", "dead_lettered", "cancelled"):
            held.discard(r["task"])
    later = [r for h in hist[killed:] for r in h]
    releases = {r["task"] for r in later if r["event"] == "leased"} & held
    committed_later = {r["task"] for r in later if r["event"] == "committed"} & held
    # The first re-registration and commit after the kill, by whichever incarnation
    # (the next one may have been killed before it committed anything).
    first_reg = next((r["wall_unix_ms"] for r in later if r["event"] == "registered"), None)
    first = next(((r["wall_unix_ms"], r["node"]) for r in later if r["event"] == "committed"), None)
    by = next(k for k, h in enumerate(hist[killed:], killed + 1) if any(r["event"] == "committed" for r in h))
    print(f"crash-test: crash {n} (incarnation {killed}): kill -> restart {restart_ms - kill_ms} ms "
          f"-> first re-registration {first_reg - kill_ms} ms -> first commit after the restart "
          f"{first[0] - kill_ms} ms (by incarnation {by}, {first[0] - restart_ms} ms after the restart)")
    print(f"crash-test:   {len(held)} tasks were leased (uncommitted) at the kill; "
          f"{len(releases)} of them were leased again later, {len(committed_later)} committed later")
by_worker = collections.Counter(r["worker"] for h in hist for r in h if r["event"] == "committed")
once = sum(commits[f"job-{job}.{t}"] == 1 for job, p in want.values() for t in range(len(p)))
print(f"crash-test: {once} of {sum(len(p) for _, p in want.values())} tasks of {len(want)} acknowledged jobs committed exactly once "
      f"({dict(sorted(by_worker.items()))}); stream: {len(submits)} submits, {acked_stream} acknowledged, "
      f"{in_flight} in flight at a kill, {retried_same + retried_new} retried "
      f"({retried_same} had been accepted before a crash and kept their id, {retried_new} queued on the retry)")
charged = [r["task"] for f in glob.glob(f"{tmp}/results/*.jsonl") for r in map(json.loads, lines(f))
           if any("registered again" in e for e in r["errors"])]
print(f"crash-test: {len(charged)} tasks were charged a failed attempt because their worker re-registered "
      f"with a restarted coordinator (expected 0: a restart costs a re-run, not an attempt)")
if charged:
    failures.append(f"tasks charged an attempt for a coordinator restart: {charged[:10]}")
if failures:
    sys.stdout.flush()
    sys.exit("\n".join(failures))
PY

if "$ROLLOUT" audit verify --config "$cfg" >"$tmp/audit.out" 2>&1; then
    say "audit: $(cat "$tmp/audit.out")"
else
    say "audit verify FAILED: $(cat "$tmp/audit.out")"
    failed+=("audit verify")
fi
states=()
for f in "$tmp"/results/*.jsonl; do states+=(--states "$f"); done
if "$ROLLOUT" check --complete "${states[@]}" "$tmp/coordinator.audit.jsonl" "$tmp/w1.history.jsonl" "$tmp/w2.history.jsonl" >"$tmp/check.out" 2>&1; then
    say "rollout check: $(tr '\n' ' ' <"$tmp/check.out")"
else
    say "rollout check found a violation: $(tr '\n' ' ' <"$tmp/check.out")"
    failed+=("rollout check")
fi
if ((wal_size > 0)); then
    say "the write-ahead log was used by the odd incarnations ($wal_size bytes in $wal at the last stop)"
else
    say "the write-ahead log $wal is missing or empty though incarnation $incarnation ran with it"
    failed+=("write-ahead log")
fi
((${#failed[@]} == 0)) || die "$(IFS=,; echo "${failed[*]}" | sed 's/,/, /g')"
ok=1
say "passed"
