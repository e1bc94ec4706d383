"""A Python operator client for a rollout coordinator.

    from rollout_client import Client, Task

    client = Client("127.0.0.1:7450", tls_dir="./data/tls", operator="admin")
    job = client.submit((Task("echo", f"hello {i}") for i in range(10_000)), name="demo")
    for result in job.results():          # as tasks finish, not only at the end
        print(result.index, result.state, result.result)
    job.wait(progress=True)
    print(client.status().totals)

It speaks the Operator service over gRPC with mutual TLS, reading the same files the
CLI reads (``ca.pem`` and ``operators/<name>/cert.pem`` / ``key.pem`` in ``tls_dir``), and
takes the schema from the coordinator itself (gRPC reflection), so it needs only grpcio
and protobuf.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Iterable, Iterator, Optional, Union

import grpc

from . import _reflection

PACKAGE = "rollout.transport.v1"
SERVICE = PACKAGE + ".Operator"
# Tasks per AppendTasks call, and the bytes of payload per call (kept well under the
# coordinator's default 4 MiB message limit).
APPEND_TASKS_MAX = 10_000
APPEND_BYTES_MAX = 2 * 1024 * 1024
_STATES = {0: "unspecified", 1: "queued", 2: "leased", 3: "committed", 4: "dead_lettered", 5: "cancelled"}
_TERMINAL = {"committed", "dead_lettered", "cancelled"}
_WORKER_STATES = {0: "unspecified", 1: "active", 2: "draining", 3: "failed"}
_PHASES = {0: "unspecified", 1: "open", 2: "active", 3: "finished"}


class RolloutError(Exception):
    """The coordinator refused a call, or could not be reached.

    ``code`` is the gRPC status code's name (e.g. ``"INVALID_ARGUMENT"``), ``message``
    the server's words, and ``field`` the field it names, if any (e.g. ``tasks[3].plugin``).
    """

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        match = re.search(r"field ([A-Za-z0-9_.\[\]]+)", message) or re.match(r"([a-z_]+\.[a-z_.\[\]0-9]+):", message)
        self.field: Optional[str] = match.group(1) if match else None
        super().__init__(f"{code}: {message}")


class NotFound(RolloutError):
    """The job (or task) is not there (never was, or deleted after its retention)."""


class Unavailable(RolloutError):
    """The coordinator is unreachable or restarting; retrying later may work."""


class InvalidArgument(RolloutError):
    """The request is malformed or over a limit; ``field`` names what."""


def _error(e: grpc.RpcError) -> RolloutError:
    code = e.code()
    kind = {
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    }.get(code, RolloutError)
    return kind(code.name, e.details() or "")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: which plugin runs it, with what payload."""

    plugin: str
    payload: Union[bytes, str] = b""
    method: str = "run"
    gpus: int = 0
    deadline_ms: int = 0
    #: Content ids (hex, from ``put_blob``) of blobs the task reads; each worker fetches
    #: a blob once, and the plugin gets local file paths.
    inputs: tuple = ()


@dataclasses.dataclass(frozen=True)
class Result:
    """A task's state and, once committed, its result. ``seq`` (from ``Job.results``)
    is the audit seq of its end, to resume a stream after it."""

    index: int
    state: str
    attempts: int
    content_id: Optional[str]
    result: Optional[bytes]
    errors: list
    seq: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class JobStatus:
    job: int
    name: str
    phase: str
    tasks: int
    queued: int
    leased: int
    committed: int
    dead_lettered: int
    cancelled: int

    @property
    def done(self) -> int:
        return self.committed + self.dead_lettered + self.cancelled

    @property
    def finished(self) -> bool:
        return self.phase == "finished"


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    incarnation: int
    state: str
    last_beat_unix_ms: int
    due_at_unix_ms: int
    slots: int
    running: int
    plugins: list
    clock_offset_ms: Optional[int]


@dataclasses.dataclass(frozen=True)
class ClusterStatus:
    workers: list
    jobs: list
    totals: dict
    latencies: list


class Job:
    """A submitted job."""

    def __init__(self, client: "Client", job: int, tasks: int, existing: bool):
        self._client = client
        self.id = job
        self.tasks = tasks
        self.existing = existing

    def __repr__(self) -> str:
        return f"Job(job-{self.id}, {self.tasks} tasks)"

    def status(self) -> JobStatus:
        """This job's counts now."""
        for j in self._client._status(job=self.id).jobs:
            if j.job == self.id:
                return JobStatus(
                    j.job, j.name, _PHASES.get(j.phase, "?"), j.tasks, j.queued, j.leased, j.committed,
                    j.dead_lettered, j.cancelled,
                )
        raise NotFound("NOT_FOUND", f"job-{self.id} is not held by the coordinator")

    def wait(self, timeout: Optional[float] = None, progress: bool = False, poll: float = 0.05) -> JobStatus:
        """Waits until every task is committed, dead-lettered or cancelled. With
        ``progress``, a progress line on standard error. Raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = poll
        while True:
            s = self.status()
            if progress:
                width = 30
                filled = width * s.done // max(1, s.tasks)
                sys.stderr.write(f"\rjob-{self.id} [{'#' * filled}{'.' * (width - filled)}] {s.done}/{s.tasks}")
                sys.stderr.flush()
            if s.finished:
                if progress:
                    sys.stderr.write("\n")
                return s
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job-{self.id}: {s.done} of {s.tasks} tasks done after {timeout} s")
            time.sleep(interval)
            interval = min(0.5, interval * 1.5)

    def results(
        self, include_bytes: bool = True, after_seq: int = 0, timeout: Optional[float] = None
    ) -> Iterator[Result]:
        """Yields each task once as it ends (committed, dead-lettered or cancelled), in
        the order they end, until every task has; then returns. Streamed by the
        coordinator (WatchResults). Each result carries ``seq``: pass the last one seen
        as ``after_seq`` to resume later without missing or repeating a task; a broken
        connection is resumed that way by itself."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = after_seq
        backoff = 0.1
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                for r in self._client._watch(self.id, include_bytes, cursor, remaining):
                    cursor = r.seq
                    backoff = 0.1
                    yield r
                return
            except Unavailable:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                time.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            except RolloutError as e:
                if e.code == "DEADLINE_EXCEEDED":
                    raise TimeoutError(f"job-{self.id}: results not all in after {timeout} s") from None
                raise

    def all_results(self, include_bytes: bool = True) -> list:
        """Every task's current state and result, in task order."""
        return list(self._client._results(self.id, include_bytes=include_bytes, from_index=0))

    def cancel(self) -> int:
        """Cancels every task not committed yet; returns how many were cancelled."""
        return self._client._call("CancelJob", job=self.id).cancelled


class Client:
    """An operator client. ``addr`` defaults to $ROLLOUT_TRANSPORT__COORDINATOR_ADDR or
    127.0.0.1:7450; ``tls_dir`` to $ROLLOUT_TRANSPORT__TLS_DIR or ./data/tls."""

    def __init__(
        self,
        addr: Optional[str] = None,
        *,
        tls_dir: Optional[str] = None,
        operator: str = "admin",
        timeout: float = 30.0,
    ):
        addr = addr or os.environ.get("ROLLOUT_TRANSPORT__COORDINATOR_ADDR") or "127.0.0.1:7450"
        tls_dir = tls_dir or os.environ.get("ROLLOUT_TRANSPORT__TLS_DIR") or "./data/tls"
        self.addr = addr
        self.tls_dir = tls_dir
        self.timeout = timeout
        own = os.path.join(tls_dir, "operators", operator)
        if not os.path.exists(os.path.join(own, "cert.pem")) and os.path.exists(
            os.path.join(tls_dir, f"operator.{operator}.pem")
        ):
            # The flat layout of earlier releases (any rollout command migrates it).
            cert, key = (os.path.join(tls_dir, f"operator.{operator}{s}") for s in (".pem", ".key.pem"))
        else:
            cert, key = os.path.join(own, "cert.pem"), os.path.join(own, "key.pem")
        files = {"ca": os.path.join(tls_dir, "ca.pem"), "cert": cert, "key": key}
        for what, path in files.items():
            if not os.path.exists(path):
                hint = " (rollout certs issue --operator NAME makes one)" if what != "ca" else ""
                raise FileNotFoundError(f"{path}: no such file{hint}")
        creds = grpc.ssl_channel_credentials(
            open(files["ca"], "rb").read(), open(files["key"], "rb").read(), open(files["cert"], "rb").read()
        )
        host = addr.rsplit(":", 1)[0].strip("[]")
        options = [
            ("grpc.ssl_target_name_override", host),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        self._channel = grpc.secure_channel(addr, creds, options=options)
        try:
            self._message = _reflection.fetch_messages(self._channel, SERVICE, timeout)
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _msg(self, name: str):
        return self._message(f"{PACKAGE}.{name}")

    _SHAPES = {
        "SubmitJob": ("SubmitJobRequest", "SubmitJobResponse"),
        "OpenJob": ("OpenJobRequest", "OpenJobResponse"),
        "AppendTasks": ("AppendTasksRequest", "AppendTasksResponse"),
        "SealJob": ("SealJobRequest", "SubmitJobResponse"),
        "CancelJob": ("CancelJobRequest", "CancelJobResponse"),
        "Status": ("StatusRequest", "StatusResponse"),
        "Drain": ("DrainRequest", "DrainResponse"),
    }

    def _call(self, method: str, **fields):
        request, response = self._SHAPES[method]
        call = self._channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=self._msg(request).SerializeToString,
            response_deserializer=self._msg(response).FromString,
        )
        try:
            return call(self._msg(request)(**fields), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None

    def _status(self, job: Optional[int] = None):
        if job is None:
            return self._call("Status")
        return self._call("Status", jobs_view=2, job=job)

    def _results(self, job: int, include_bytes: bool, from_index: int) -> Iterator[Result]:
        call = self._channel.unary_stream(
            f"/{SERVICE}/Results",
            request_serializer=self._msg("ResultsRequest").SerializeToString,
            response_deserializer=self._msg("TaskResult").FromString,
        )
        request = self._msg("ResultsRequest")(job=job, include_bytes=include_bytes, from_index=from_index)
        try:
            for r in call(request, timeout=self.timeout):
                yield self._result(r, include_bytes)
        except grpc.RpcError as e:
            raise _error(e) from None

    @staticmethod
    def _result(r, include_bytes: bool, seq: Optional[int] = None) -> Result:
        state = _STATES.get(r.state, "?")
        return Result(
            index=r.task.index,
            state=state,
            attempts=r.attempts,
            content_id=r.content_id.hex() if r.content_id else None,
            result=bytes(r.result) if include_bytes and state == "committed" else None,
            errors=list(r.errors),
            seq=seq,
        )

    def _watch(self, job: int, include_bytes: bool, after_seq: int, timeout: Optional[float]) -> Iterator[Result]:
        call = self._channel.unary_stream(
            f"/{SERVICE}/WatchResults",
            request_serializer=self._msg("WatchResultsRequest").SerializeToString,
            response_deserializer=self._msg("TaskOutcome").FromString,
        )
        request = self._msg("WatchResultsRequest")(job=job, after_seq=after_seq, include_bytes=include_bytes)
        try:
            for o in call(request, timeout=timeout):
                yield self._result(o.result, include_bytes, o.seq)
        except grpc.RpcError as e:
            raise _error(e) from None

    def submit(self, tasks: Iterable[Task], *, name: str = "", idempotency_key: Optional[str] = None) -> Job:
        """Submits a job of any size: tasks are streamed in batches (OpenJob,
        AppendTasks, SealJob), so an iterable of millions never sits in memory whole.
        With ``idempotency_key``, submitting again resumes (or finds) the same job."""
        opened = self._call("OpenJob", name=name, idempotency_key=idempotency_key or "")
        job, held = opened.job, opened.tasks
        if opened.sealed:
            return Job(self, job, held, existing=True)
        TaskSpec = self._msg("TaskSpec")
        batch, batch_bytes, index = [], 0, 0

        def flush(first: int, batch: list) -> None:
            if batch:
                self._call("AppendTasks", job=job, first_index=first, tasks=batch)

        first = 0
        for t in tasks:
            if isinstance(t, dict):
                t = Task(**t)
            if index < held:  # already appended by an interrupted submission
                index += 1
                first = index
                continue
            payload = t.payload.encode() if isinstance(t.payload, str) else bytes(t.payload)
            inputs = [bytes.fromhex(i) for i in t.inputs]
            batch.append(TaskSpec(plugin=t.plugin, method=t.method, payload=payload, gpus=t.gpus,
                                  deadline_ms=t.deadline_ms, inputs=inputs))
            batch_bytes += len(payload) + len(t.plugin) + len(t.method) + 16 + 34 * len(inputs)
            index += 1
            if len(batch) >= APPEND_TASKS_MAX or batch_bytes >= APPEND_BYTES_MAX:
                flush(first, batch)
                first, batch, batch_bytes = index, [], 0
        flush(first, batch)
        sealed = self._call("SealJob", job=job, tasks=index)
        return Job(self, sealed.job, sealed.tasks, existing=opened.existing)

    def put_blob(self, data: Union[bytes, bytearray, memoryview, str, "os.PathLike"], chunk_bytes: int = 1 << 20) -> str:
        """Uploads a blob (bytes, or a file path, streamed in chunks) into the
        coordinator's content-addressed store; returns its content id (64 hex digits).
        The same bytes again are stored once. Over ``limits.max_blob_bytes`` it is
        ``InvalidArgument`` and nothing is kept."""
        Chunk = self._msg("BlobChunk")

        def chunks():
            if isinstance(data, (bytes, bytearray, memoryview)):
                view = memoryview(data)
                for at in range(0, len(view), chunk_bytes):
                    yield Chunk(data=bytes(view[at : at + chunk_bytes]))
                return
            with open(data, "rb") as f:
                while True:
                    block = f.read(chunk_bytes)
                    if not block:
                        return
                    yield Chunk(data=block)

        call = self._channel.stream_unary(
            f"/{SERVICE}/PutBlob",
            request_serializer=Chunk.SerializeToString,
            response_deserializer=self._msg("BlobInfo").FromString,
        )
        try:
            return call(chunks(), timeout=None).content_id.hex()
        except grpc.RpcError as e:
            raise _error(e) from None

    def get_blob(self, content_id: str, path: Optional[str] = None) -> Optional[bytes]:
        """A blob's bytes (or, with ``path``, written there once complete and verified)."""
        call = self._channel.unary_stream(
            f"/{SERVICE}/GetBlob",
            request_serializer=self._msg("GetBlobRequest").SerializeToString,
            response_deserializer=self._msg("BlobChunk").FromString,
        )
        try:
            stream = call(self._msg("GetBlobRequest")(content_id=bytes.fromhex(content_id)), timeout=None)
            if path is None:
                return b"".join(c.data for c in stream)
            partial = path + ".partial"
            with open(partial, "wb") as f:
                for c in stream:
                    f.write(c.data)
            os.replace(partial, path)
            return None
        except grpc.RpcError as e:
            raise _error(e) from None

    def list_blobs(self) -> list:
        """Every stored blob: dicts with content_id, size_bytes, created_unix_ms."""
        call = self._channel.unary_unary(
            f"/{SERVICE}/ListBlobs",
            request_serializer=self._msg("ListBlobsRequest").SerializeToString,
            response_deserializer=self._msg("ListBlobsResponse").FromString,
        )
        try:
            blobs = call(self._msg("ListBlobsRequest")(), timeout=self.timeout).blobs
        except grpc.RpcError as e:
            raise _error(e) from None
        return [{"content_id": b.content_id.hex(), "size_bytes": b.size_bytes, "created_unix_ms": b.created_unix_ms} for b in blobs]

    def job(self, job: Union[int, str]) -> Job:
        """A handle on an existing job (``3`` or ``"job-3"``)."""
        job_id = int(str(job).removeprefix("job-"))
        for j in self._status(job=job_id).jobs:
            if j.job == job_id:
                return Job(self, job_id, j.tasks, existing=True)
        raise NotFound("NOT_FOUND", f"job-{job_id} is not held by the coordinator")

    def status(self) -> ClusterStatus:
        """Workers, current jobs, cluster totals and latency percentiles."""
        s = self._status()
        t = s.totals
        totals = {f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields}
        workers = [
            WorkerStatus(
                w.worker_id, w.incarnation, _WORKER_STATES.get(w.state, "?"), w.last_beat_unix_ms, w.due_at_unix_ms,
                w.slots, w.running, list(w.plugins), w.clock_offset_ms if w.clock_offset_known else None,
            )
            for w in s.workers
        ]
        jobs = [
            JobStatus(j.job, j.name, _PHASES.get(j.phase, "?"), j.tasks, j.queued, j.leased, j.committed,
                      j.dead_lettered, j.cancelled)
            for j in s.jobs
        ]
        latencies = [{f.name: getattr(l, f.name) for f in l.DESCRIPTOR.fields} for l in s.latencies]
        return ClusterStatus(workers, jobs, totals, latencies)
