"""Worker processes that never outlive their parent: a killed `bench` or `data collect` leaves none behind."""
import multiprocessing as mp
import os
import threading
import time
import traceback
from contextlib import contextmanager
from functools import partial

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


_INIT_ERROR = []


def _start(parent, init, initargs):
    die_with_parent(parent)
    torch.set_num_threads(1)
    try:
        init(*initargs)
    except BaseException as e:  # raised here, a Pool would start a new worker forever; the jobs report it instead
        _INIT_ERROR.append((traceback.format_exception_only(e)[-1].strip(), traceback.format_exc()))


def _call(fn, job):
    if _INIT_ERROR:
        line, trace = _INIT_ERROR[0]
        raise RuntimeError(f"a worker failed to start: {line}\n{trace}")
    return fn(job)


def _watched(results, pool, pids):
    """`results`, raising once a worker process is gone: a Pool replaces a dead worker (killed for memory, say)
    and the job it held never returns, so waiting on would wait forever."""
    while True:
        try:
            yield results.next(timeout=1.0)
        except StopIteration:
            return
        except mp.TimeoutError:
            if {p.pid for p in pool._pool} != pids:
                raise RuntimeError("a worker process died (e.g. killed for memory); finished work is kept: rerun "
                                   "the command to resume") from None


@contextmanager
def worker_map(fn, jobs, workers: int, init, initargs=(), *, ordered=True):
    """An iterator of fn(job) over `jobs`, from `workers` spawned processes, or from this process when workers is 0.

    Each process runs init(*initargs) once before its first job (fn and init: module-level functions), with one
    torch thread: the parallelism comes from processes, and one thread everywhere makes a result the same at any
    worker count. Spawn, not fork: fork would copy torch's thread pools and any CUDA context. The workers die with
    this process (`die_with_parent`) and are stopped when the block exits. `ordered=False` yields results as they
    finish. A worker that fails to start or dies raises here, instead of the wait going on forever."""
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
        pids = {p.pid for p in pool._pool}
        yield _watched((pool.imap if ordered else pool.imap_unordered)(partial(_call, fn), jobs), pool, pids)
    finally:
        pool.terminate()
        pool.join()
