"""Fan-out of independent jobs (synthesis shards) in this process or on a Dask cluster.

Why Dask distributed (docs/scale.md has the measurements): it adds about 14 MB and 9 small pure-Python packages
to the environment and starts a 2-worker local cluster in about 1.5 s on the 2-core CI machine; Ray adds about
214 MB and needs about 4 s for `ray.init` there. What synthesis needs from an engine, Dask has: worker processes
on one host or many (`dask scheduler` / `dask worker`), per-worker resources for GPUs, objects sent once to every
worker (`scatter(broadcast=True)`), futures that carry a task's exception and traceback back, and an event stream
from workers to the client (progress).

    executor="local"   jobs run one after another in this process
    executor="dask"    address=None: a local cluster of `workers` processes (one thread each; with gpu=True one
                       worker per GPU, each seeing only its own GPU and offering the resource GPU=1);
                       address="tcp://host:8786": the running cluster there (start its workers with
                       `dask worker tcp://host:8786 --nthreads 1`, plus `--resources GPU=1` and
                       CUDA_VISIBLE_DEVICES=<k> per GPU for GPU backends)

A job function has the signature `fn(payload, job, report) -> result`: `payload` is shared by every job (sent to
each worker once), `report(k)` counts k items done (the caller's progress bar, from any worker), and an exception
fails that job only — unless it is one of `fatal`, which stops the whole fan-out. `fan_out` runs a list of jobs;
`Pool` is the open executor underneath, for callers that submit jobs one by one (the Prefect flow's shard tasks).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from cheetah.config import ConfigError

log = logging.getLogger(__name__)

Report = Callable[[int], None]
JobFn = Callable[[Any, Any, Report], Any]
_REPORT_EVERY = 0.5  # seconds between a worker's progress events


class Pool:
    """An open executor: `submit(fn, payload, job)` runs one job (here, or on the Dask cluster, sending `payload`
    to every worker once). Thread-safe, so a Prefect task per job can call `run` from the flow's task threads."""

    def __init__(self, executor: str, *, workers: int = 1, address: str | None = None, gpu: bool = False,
                 report: Report = lambda k: None, name: str = "job"):
        if executor not in ("local", "dask"):
            raise ConfigError(f"executor must be 'local' or 'dask', got {executor!r}")
        self.executor, self.workers, self.address, self.gpu = executor, workers, address, gpu
        self.report, self.name = report, name
        self.client: Any = None
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()  # local jobs run one at a time
        self._shared: dict[int, Any] = {}
        self._topic = f"cheetah-{name}-{time.time_ns()}"
        self._count = 0

    def __enter__(self) -> "Pool":
        if self.executor == "dask":
            self.client = self._stack.enter_context(dask_client(self.address, self.workers, self.gpu))
            self.client.subscribe_topic(self._topic, lambda event: self.report(int(event[1])))
            self._stack.callback(self.client.unsubscribe_topic, self._topic)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def submit(self, fn: JobFn, payload: Any, job: Any) -> Any:
        """A future of `fn(payload, job, report)`: a `concurrent.futures.Future` (local, already done) or a Dask one."""
        if self.client is None:
            future: Future = Future()
            with self._lock:
                try:
                    future.set_result(fn(payload, job, self.report))
                except Exception as e:  # noqa: BLE001 - handed to whoever reads the future
                    future.set_exception(e)
            return future
        with self._lock:
            if id(payload) not in self._shared:  # sent to every worker once
                self._shared[id(payload)] = self.client.scatter(payload, broadcast=True, hash=False)
            shared = self._shared[id(payload)]
            self._count += 1
            index = self._count
        return self.client.submit(_dask_task, fn, shared, job, self._topic, key=f"{self.name}-{index}-{time.time_ns()}",
                                  resources={"GPU": 1} if self.gpu else None, priority=-index, pure=False)

    def run(self, fn: JobFn, payload: Any, job: Any) -> Any:
        return self.submit(fn, payload, job).result()


def fan_out(fn: JobFn, payload: Any, jobs: Sequence[Any], *, executor: str, workers: int = 1,
            address: str | None = None, gpu: bool = False, report: Report = lambda k: None, name: str = "job",
            fatal: tuple[type[BaseException], ...] = (),
            done: Callable[[Any, Any], None] = lambda job, result: None) -> list[tuple[Any, Any, BaseException | None]]:
    """Run `fn(payload, job, report)` for every job; returns `(job, result, None)` or `(job, None, error)` per job,
    in the order of `jobs`, and calls `done(job, result)` as each one succeeds. Jobs that fail do not stop the
    others, except with an exception of a `fatal` type, which is raised at once."""
    if not jobs:
        return []
    outcome: dict[int, tuple[Any, Any, BaseException | None]] = {}
    with Pool(executor, workers=workers, address=address, gpu=gpu, report=report, name=name) as pool:
        def collect(future: Any, i: int) -> None:
            try:
                result = future.result()
            except fatal:
                raise
            except Exception as e:  # noqa: BLE001 - reported per job by the caller (a Dask KilledWorker included)
                outcome[i] = (jobs[i], None, e)
                return
            outcome[i] = (jobs[i], result, None)
            done(jobs[i], result)

        futures = {}
        for i, job in enumerate(jobs):
            future = pool.submit(fn, payload, job)
            futures[future] = i
            if pool.client is None:  # a local job is finished already: a fatal error stops the rest at once
                collect(future, i)
        if pool.client is not None:
            from distributed import as_completed

            for future in as_completed(list(futures)):
                try:
                    collect(future, futures[future])
                except fatal:
                    pool.client.cancel(list(futures))
                    raise
    return [outcome[i] for i in range(len(jobs))]


# ---------------------------------------------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------------------------------------------


SCHEDULER_TIMEOUT = 30
"""Seconds to wait for the Dask scheduler at `synthesize.address` to answer."""


def _check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> None:
    """Ask whatever listens at `address` who it is, within `timeout` seconds: a Dask client's own connection waits
    for ever on a service that accepts the connection but does not speak Dask (an HTTP server, say)."""
    import asyncio

    from distributed.comm import connect

    async def identity() -> Any:
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    try:
        reply = asyncio.run(asyncio.wait_for(identity(), timeout))
    except (TimeoutError, asyncio.TimeoutError):
        raise ConfigError(f"synthesize.address: nothing at {address} answered as a Dask scheduler within {timeout:g} "
                          "s (is it the scheduler's address, e.g. tcp://host:8786?)") from None
    except (OSError, ValueError, TypeError) as e:  # refused, unknown host, malformed address
        raise ConfigError(f"synthesize.address: cannot reach a Dask scheduler at {address!r} ({e})") from None
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        raise ConfigError(f"synthesize.address: {address} is not a Dask scheduler (it answered as "
                          f"{reply.get('type') if isinstance(reply, dict) else type(reply).__name__})")


@contextlib.contextmanager
def dask_client(address: str | None, workers: int, gpu: bool) -> Iterator[Any]:
    """A client of the cluster at `address`, or of a local cluster started (and stopped) here."""
    from distributed import Client

    if address:
        _check_scheduler(address)
        try:
            client = Client(address, timeout=f"{SCHEDULER_TIMEOUT}s")
        except OSError as e:
            raise ConfigError(f"synthesize.address: cannot reach a Dask scheduler at {address} ({e})") from None
        with client:
            if gpu and not any(w.get("resources", {}).get("GPU") for w in
                               client.scheduler_info()["workers"].values()):
                raise ConfigError(f"no worker of the Dask cluster at {address} offers the resource GPU; start one "
                                  f"worker per GPU with `CUDA_VISIBLE_DEVICES=<k> dask worker {address} --nthreads 1 "
                                  f"--resources GPU=1`")
            yield client
        return
    cluster = _gpu_cluster(workers) if gpu else _cpu_cluster(workers)
    with cluster, Client(cluster) as client:
        log.info("started a local Dask cluster: %d worker process(es)%s", workers, " (one GPU each)" if gpu else "")
        yield client


def _cpu_cluster(workers: int) -> Any:
    from distributed import LocalCluster

    # One thread per worker process: N workers use N cores, and torch results do not depend on a thread count.
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.WARNING)


def _gpu_cluster(workers: int) -> Any:
    import torch
    from distributed import Nanny, Scheduler, SpecCluster

    available = torch.cuda.device_count()
    if workers > available:
        raise ConfigError(f"synthesize.workers={workers} GPU workers, but this machine has {available} GPU(s)")
    spec = {i: {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                          "env": {"CUDA_VISIBLE_DEVICES": str(i)}}} for i in range(workers)}
    return SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                       silence_logs=logging.WARNING)


class _WorkerReport:
    """`report(k)` on a Dask worker: progress events to the client, at most one every _REPORT_EVERY seconds."""

    def __init__(self, topic: str):
        from distributed import get_worker

        self.worker, self.topic = get_worker(), topic
        self.pending, self.last = 0, time.monotonic()

    def __call__(self, k: int) -> None:
        self.pending += k
        if time.monotonic() - self.last >= _REPORT_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.worker.log_event(self.topic, self.pending)
            self.pending, self.last = 0, time.monotonic()


def _dask_task(fn: JobFn, payload: Any, job: Any, topic: str) -> Any:
    report = _WorkerReport(topic)
    try:
        return fn(payload, job, report)
    finally:
        report.flush()
