"""Worker processes that never outlive their parent: a killed `bench` or `data collect` leaves none behind."""
import multiprocessing as mp
import os
import threading
import time
from contextlib import contextmanager

import torch


def die_with_parent(parent: int, interval: float = 0.2):
    """Call first thing in a worker process, with the pid of the process that started it (its own view: a parent
    killed while the worker was still importing is gone already): the worker exits as soon as that process is
    gone (kill -9 included: the worker is re-parented, so its parent pid changes), instead of computing on."""

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _start(parent, init, initargs):
    die_with_parent(parent)
    torch.set_num_threads(1)
    init(*initargs)


@contextmanager
def worker_map(fn, jobs, workers: int, init, initargs=(), *, ordered=True):
    """An iterator of fn(job) over `jobs`, from `workers` spawned processes, or from this process when workers is 0.

    Each process runs init(*initargs) once before its first job (fn and init: module-level functions), with one
    torch thread: the parallelism comes from processes, and one thread everywhere makes a result the same at any
    worker count. Spawn, not fork: fork would copy torch's thread pools and any CUDA context. The workers die with
    this process (`die_with_parent`) and are stopped when the block exits. `ordered=False` yields results as they
    finish."""
    jobs = list(jobs)
    if not jobs:
        yield iter(())
        return
    if workers == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            init(*initargs)
            yield map(fn, jobs)
        finally:
            torch.set_num_threads(threads)
        return
    pool = mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_start,
                                        initargs=(os.getpid(), init, tuple(initargs)))
    try:
        yield (pool.imap if ordered else pool.imap_unordered)(fn, jobs)
    finally:
        pool.terminate()
        pool.join()
