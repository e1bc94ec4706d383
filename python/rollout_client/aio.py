"""The asyncio variant of the client: the same calls as coroutines, for programs that
already run an event loop (an RL trainer's, a web service's).

    from rollout_client.aio import AsyncClient

    async with AsyncClient(addr, tls_dir="./data/tls") as client:
        job = await client.submit(tasks, name="demo")
        async for r in job.results():
            ...
        await job.wait()

Each call runs the blocking client's call on a worker thread (asyncio.to_thread), so the
loop never blocks on the network; a result stream is read on one thread and handed over
through a queue as results arrive.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Iterable, Optional

from .client import Client, ClusterStatus, Job, JobStatus, Result, Task

_DONE = object()


class AsyncJob:
    """A submitted job, with coroutine methods."""

    def __init__(self, job: Job):
        self._job = job
        self.id = job.id
        self.tasks = job.tasks
        self.existing = job.existing

    def __repr__(self) -> str:
        return f"AsyncJob(job-{self.id}, {self.tasks} tasks)"

    async def status(self) -> JobStatus:
        return await asyncio.to_thread(self._job.status)

    async def wait(self, timeout: Optional[float] = None) -> JobStatus:
        return await asyncio.to_thread(self._job.wait, timeout)

    async def cancel(self) -> int:
        return await asyncio.to_thread(self._job.cancel)

    async def results(self, include_bytes: bool = True, after_seq: int = 0) -> AsyncIterator[Result]:
        """Each task once as it ends (see ``Job.results``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=1024)

        def pump() -> None:
            try:
                for r in self._job.results(include_bytes=include_bytes, after_seq=after_seq):
                    asyncio.run_coroutine_threadsafe(queue.put(r), loop).result()
                asyncio.run_coroutine_threadsafe(queue.put(_DONE), loop).result()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                asyncio.run_coroutine_threadsafe(queue.put(e), loop).result()

        reader = loop.run_in_executor(None, pump)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if reader.done():
                reader.result()


class AsyncClient:
    """``Client`` with coroutine methods (the same arguments)."""

    def __init__(self, addr: Optional[str] = None, **kwargs):
        self._args = (addr, kwargs)
        self._client: Optional[Client] = None

    async def connect(self) -> "AsyncClient":
        addr, kwargs = self._args
        self._client = await asyncio.to_thread(Client, addr, **kwargs)
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    def _sync(self) -> Client:
        if self._client is None:
            raise RuntimeError("AsyncClient: call `await client.connect()` (or use `async with`) first")
        return self._client

    async def submit(self, tasks: Iterable[Task], *, name: str = "", idempotency_key: Optional[str] = None) -> AsyncJob:
        job = await asyncio.to_thread(self._sync().submit, tasks, name=name, idempotency_key=idempotency_key)
        return AsyncJob(job)

    async def job(self, job) -> AsyncJob:
        return AsyncJob(await asyncio.to_thread(self._sync().job, job))

    async def status(self) -> ClusterStatus:
        return await asyncio.to_thread(self._sync().status)
