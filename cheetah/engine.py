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
fails that job only — unless it is one of `fatal`, which stops the whole fan-out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cheetah.config import ConfigError

log = logging.getLogger(__name__)

Report = Callable[[int], None]
JobFn = Callable[[Any, Any, Report], Any]
_REPORT_EVERY = 0.5  # seconds between a worker's progress events


def fan_out(fn: JobFn, payload: Any, jobs: Sequence[Any], *, executor: str, workers: int = 1,
            address: str | None = None, gpu: bool = False, report: Report = lambda k: None, name: str = "job",
            fatal: tuple[type[BaseException], ...] = ()) -> list[tuple[Any, Any, BaseException | None]]:
    """Run `fn(payload, job, report)` for every job; returns `(job, result, None)` or `(job, None, error)` per job,
    in the order of `jobs`. Jobs that fail do not stop the others (except an exception of a `fatal` type)."""
    if not jobs:
        return []
    if executor == "local":
        out = []
        for job in jobs:
            try:
                out.append((job, fn(payload, job, report), None))
            except fatal:
                raise
            except Exception as e:  # noqa: BLE001 - the caller reports which job failed and why
                out.append((job, None, e))
        return out
    if executor != "dask":
        raise ConfigError(f"executor must be 'local' or 'dask', got {executor!r}")
    with dask_client(address, workers, gpu) as client:
        return _run_on_dask(client, fn, payload, jobs, gpu=gpu, report=report, name=name, fatal=fatal)


# ---------------------------------------------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def dask_client(address: str | None, workers: int, gpu: bool) -> Iterator[Any]:
    """A client of the cluster at `address`, or of a local cluster started (and stopped) here."""
    from distributed import Client

    if address:
        try:
            client = Client(address, timeout="30s")
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


def _run_on_dask(client: Any, fn: JobFn, payload: Any, jobs: Sequence[Any], *, gpu: bool, report: Report, name: str,
                 fatal: tuple[type[BaseException], ...]) -> list[tuple[Any, Any, BaseException | None]]:
    from distributed import as_completed

    topic = f"cheetah-{name}-{time.time_ns()}"
    client.subscribe_topic(topic, lambda event: report(int(event[1])))
    try:
        shared = client.scatter(payload, broadcast=True, hash=False)  # sent to every worker once
        futures = {client.submit(_dask_task, fn, shared, job, topic, key=f"{name}-{i}-{time.time_ns()}",
                                 resources={"GPU": 1} if gpu else None, priority=-i, pure=False): i
                   for i, job in enumerate(jobs)}
        outcome: dict[int, tuple[Any, Any, BaseException | None]] = {}
        for future in as_completed(futures):
            i = futures[future]
            try:
                outcome[i] = (jobs[i], future.result(), None)
            except fatal:
                client.cancel(list(futures))
                raise
            except Exception as e:  # noqa: BLE001 - reported per job by the caller (KilledWorker included)
                outcome[i] = (jobs[i], None, e)
        return [outcome[i] for i in range(len(jobs))]
    finally:
        client.unsubscribe_topic(topic)
