"""rollout_client against a real cluster: a `rollout coordinator` and two `rollout worker`
processes (built-in echo and sleep plugins) started by this module, on loopback ports of
their own, in a temp dir. $ROLLOUT names the binary (the Rust test that runs this file,
system/cli/tests/python_client.rs, sets it); without it the tests fail, saying so.
"""

import os
import signal
import socket
import sys
import subprocess
import tempfile
import time

import pytest

from rollout_client import Client, InvalidArgument, NotFound, Task


# Set by system/cli/tests/python_client.rs: the example cdylib, and whether the binary
# under test has in-process Python (the `python` feature).
ECHO_SO = os.environ.get("ROLLOUT_TEST_ECHO_SO", "")
PY_INPROC = os.environ.get("ROLLOUT_TEST_PY_INPROC") == "1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    rollout = os.environ.get("ROLLOUT")
    assert rollout and os.path.exists(rollout), "set ROLLOUT to the rollout binary (cargo test -p rollout-cli does)"
    tmp = tempfile.mkdtemp(prefix="rollout-pyclient-")
    port = free_port()
    metrics = {w: f"127.0.0.1:{free_port()}" for w in ("w1", "w2")}
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    cfg = os.path.join(tmp, "cluster.toml")
    with open(cfg, "w") as f:
        f.write(
            f"""[health]
heartbeat_interval = "200ms"
worker_self_fence_timeout = "800ms"
coordinator_failure_timeout = "1s"
clock_skew_budget = "100ms"
failure_scan_interval = "100ms"
[transport]
listen_addr = "127.0.0.1:{port}"
coordinator_addr = "127.0.0.1:{port}"
tls_dir = "{tmp}/tls"
[storage]
data_dir = "{tmp}/data"
[metrics]
listen_addr = ""
worker_listen_addr = ""

[[plugins]]
name = "echo-py"
mode = "sidecar"
script = "{examples}/echo_plugin.py"
python = "{sys.executable}"
startup_timeout = "30s"
"""
        )
        if ECHO_SO:
            f.write(f"""
[[plugins]]
name = "echo-rs"
mode = "cdylib"
path = "{ECHO_SO}"
""")
        if PY_INPROC:
            f.write(f"""
[[plugins]]
name = "echo-inproc"
mode = "python"
module = "inproc_echo"
path = "{examples}"
""")
    run = lambda *args: subprocess.run([rollout, *args, "--config", cfg], check=True, capture_output=True)
    run("certs", "init")
    for w in ("w1", "w2"):
        run("certs", "issue", "--worker", w)
    procs = [subprocess.Popen([rollout, "coordinator", "--config", cfg, "--history", "/dev/null"],
                              stderr=open(os.path.join(tmp, "coordinator.log"), "w"))]
    for w in ("w1", "w2"):
        procs.append(subprocess.Popen(
            [rollout, "worker", "--config", cfg, "--id", w, "--slots", "4", "--history", "/dev/null",
             "--metrics-addr", metrics[w]],
            stderr=open(os.path.join(tmp, f"{w}.log"), "w")))
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    client = None
    while True:
        try:
            client = client or Client(addr, tls_dir=os.path.join(tmp, "tls"), timeout=10)
            if sum(w.state == "active" for w in client.status().workers) == 2:
                break
        except Exception:  # noqa: BLE001 - not up yet
            client = None
        assert time.monotonic() < deadline, "the cluster did not come up within 60 s"
        time.sleep(0.1)
    client.worker_metrics = metrics
    yield client
    client.close()
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def test_status_shows_both_workers_with_their_plugins(cluster):
    status = cluster.status()
    ids = sorted(w.worker_id for w in status.workers)
    assert ids == ["w1", "w2"]
    assert all({"echo", "sleep", "echo-py"} <= set(w.plugins) and w.slots == 4 for w in status.workers)
    assert status.totals["workers_active"] == 2


def test_results_arrive_as_tasks_finish_not_only_at_the_end(cluster):
    # 16 sleeps of 200..1700 ms on 8 slots: the first finish long before the last.
    tasks = [Task("sleep", str(200 + 100 * i)) for i in range(16)]
    started = time.monotonic()
    job = cluster.submit(tasks, name="py-sleep")
    arrivals = []
    for r in job.results():
        arrivals.append((time.monotonic() - started, r))
    assert sorted(r.index for _, r in arrivals) == list(range(16)), "each task once"
    assert all(r.state == "committed" and r.result == tasks[r.index].payload.encode() for _, r in arrivals)
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first > 0.8, f"results came together ({first:.2f} s, {last:.2f} s): not as they finished"
    assert job.wait(timeout=5).committed == 16


def test_a_large_job_is_streamed_in_batches_and_every_result_is_its_payload(cluster):
    n = 25_000  # more than one AppendTasks call holds
    job = cluster.submit((Task("echo", f"t{i}") for i in range(n)), name="py-large", idempotency_key="py-large-1")
    assert job.tasks == n and not job.existing
    status = job.wait(timeout=120)
    assert (status.committed, status.dead_lettered) == (n, 0)
    results = job.all_results()
    assert len(results) == n
    assert all(r.result == f"t{r.index}".encode() for r in results)
    again = cluster.submit((Task("echo", f"t{i}") for i in range(n)), name="py-large", idempotency_key="py-large-1")
    assert again.id == job.id and again.existing, "the same key is the same job"


def test_cancel_stops_what_has_not_run(cluster):
    job = cluster.submit([Task("sleep", "3000") for _ in range(30)], name="py-cancel")
    time.sleep(0.3)
    cancelled = job.cancel()
    assert cancelled > 0
    status = job.wait(timeout=30)
    assert status.cancelled == cancelled and status.committed + status.cancelled == 30


def test_errors_name_what_is_wrong(cluster):
    with pytest.raises(NotFound):
        cluster.job(987_654)
    with pytest.raises(InvalidArgument) as refused:
        cluster.submit([Task("", "x")], name="py-bad")
    assert "plugin" in refused.value.message, refused.value


def test_a_result_stream_resumed_after_a_seq_neither_misses_nor_repeats(cluster):
    job = cluster.submit([Task("sleep", str(100 + 60 * i)) for i in range(12)], name="py-resume")
    first = []
    for r in job.results():
        first.append(r)
        if len(first) == 5:
            break  # the client goes away mid-stream
    rest = list(job.results(after_seq=first[-1].seq))
    seen = [r.index for r in first + rest]
    assert sorted(seen) == list(range(12)), seen
    assert [r.seq for r in first + rest] == sorted(r.seq for r in first + rest)
    assert list(job.results(after_seq=rest[-1].seq)) == []


def test_the_asyncio_client_submits_streams_and_waits(cluster):
    import asyncio

    from rollout_client.aio import AsyncClient

    async def run():
        async with AsyncClient(cluster.addr, tls_dir=cluster.tls_dir, timeout=10) as client:
            job = await client.submit([Task("echo", f"a{i}") for i in range(50)], name="py-async")
            got = {}
            async for r in job.results():
                got[r.index] = r.result
            status = await job.wait(timeout=10)
            workers = (await client.status()).workers
            return got, status, workers

    got, status, workers = asyncio.run(run())
    assert got == {i: f"a{i}".encode() for i in range(50)}
    assert status.committed == 50 and len(workers) == 2


def test_a_blob_round_trips_once_and_a_missing_one_is_not_found(cluster, tmp_path):
    import hashlib

    data = bytes(range(256)) * 20_000  # about 5 MB, several chunks
    cid = cluster.put_blob(data)
    assert cid == hashlib.sha256(data).hexdigest()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert cluster.put_blob(str(path)) == cid, "the same bytes from a file: the same blob"
    assert cluster.get_blob(cid) == data
    out = tmp_path / "back.bin"
    cluster.get_blob(cid, str(out))
    assert out.read_bytes() == data
    listed = [b for b in cluster.list_blobs() if b["content_id"] == cid]
    assert len(listed) == 1 and listed[0]["size_bytes"] == len(data)
    with pytest.raises(NotFound):
        cluster.get_blob("00" * 32)


def scrape(addr):
    import urllib.request

    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_200_tasks_reading_one_64_mib_blob_fetch_it_once_per_worker(cluster):
    import hashlib

    blob = os.urandom(64 * 1024 * 1024)
    cid = cluster.put_blob(blob)
    before = {w: scrape(a) for w, a in cluster.worker_metrics.items()}
    job = cluster.submit([Task("echo-py", b"", method="inputs", inputs=(cid,)) for _ in range(200)], name="py-blob")
    want = f"{hashlib.sha256(blob).hexdigest()} {len(blob)}".encode()
    results = list(job.results())
    assert len(results) == 200 and all(r.state == "committed" and r.result == want for r in results), results[:2]
    after = {w: scrape(a) for w, a in cluster.worker_metrics.items()}
    for w in ("w1", "w2"):
        fetches = after[w]["rollout_worker_blob_fetches_total"] - before[w].get("rollout_worker_blob_fetches_total", 0)
        fetched = after[w]["rollout_worker_blob_fetch_bytes_total"] - before[w].get("rollout_worker_blob_fetch_bytes_total", 0)
        calls = sum(v for k, v in after[w].items() if k.startswith('rollout_worker_plugin_calls_total{plugin="echo-py"'))
        print(f"{w}: {int(calls)} echo-py calls, {int(fetches)} blob fetch(es), {int(fetched)} bytes fetched")
        assert calls > 0, f"{w} ran none of the tasks"
        assert (fetches, fetched) == (1, len(blob)), f"{w} fetched the blob {fetches} times ({fetched} bytes)"


def test_a_task_naming_a_blob_that_is_not_stored_is_refused_naming_it(cluster):
    missing = "ab" * 32
    with pytest.raises(InvalidArgument) as refused:
        cluster.submit([Task("echo-py", b"", method="inputs", inputs=(missing,))], name="py-missing")
    assert missing in refused.value.message and "tasks[0].inputs[0]" in refused.value.message, refused.value


@pytest.mark.parametrize("plugin", ["echo-py", "echo-rs", "echo-inproc"])
def test_a_task_reads_its_input_blob_in_each_plugin_mode(cluster, plugin):
    import hashlib

    if plugin == "echo-rs" and not ECHO_SO:
        pytest.fail("ROLLOUT_TEST_ECHO_SO is not set: run this suite through cargo test -p rollout-cli")
    if plugin == "echo-inproc" and not PY_INPROC:
        pytest.skip("this rollout binary was built without the python feature (make test builds it with all features)")
    data = os.urandom(100_000)
    cid = cluster.put_blob(data)
    job = cluster.submit([Task(plugin, b"", method="inputs", inputs=(cid,))], name=f"py-mode-{plugin}")
    [r] = list(job.results())
    assert r.state == "committed", r.errors
    if plugin == "echo-rs":
        assert r.result == str(len(data)).encode()  # the cdylib reports each input's size
    else:
        assert r.result == f"{hashlib.sha256(data).hexdigest()} {len(data)}".encode()
