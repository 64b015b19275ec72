"""worker_map: the same results in order at any worker count, one torch thread per process, nothing left running."""
import os
import re
import signal
import threading
import time

import psutil
import pytest
import torch

from edge_tdmpc.workers import worker_map

_STATE = {}


def _init(offset):
    _STATE.update(offset=offset, inits=_STATE.get("inits", 0) + 1)


def _job(x):
    return x + _STATE["offset"], torch.get_num_threads(), _STATE["inits"], os.getpid()


def test_worker_map_gives_every_result_in_order_at_any_worker_count():
    jobs = list(range(7))
    threads = torch.get_num_threads()
    with worker_map(_job, jobs, 0, _init, (10,)) as results:
        here = list(results)
    assert torch.get_num_threads() == threads  # this process's setting comes back
    with worker_map(_job, jobs, 2, _init, (10,)) as results:
        pooled = list(results)
        workers = psutil.Process().children()
    assert [r[0] for r in here] == [r[0] for r in pooled] == [x + 10 for x in jobs]
    assert {r[1] for r in here + pooled} == {1}  # one torch thread wherever a job runs
    assert {r[2] for r in pooled} == {1}  # init ran once per worker, before its jobs
    assert len({r[3] for r in pooled}) <= 2 and os.getpid() not in {r[3] for r in pooled}
    _, alive = psutil.wait_procs([w for w in workers if w.pid in {r[3] for r in pooled}], timeout=30)
    assert not alive  # stopped when the block exits

    with worker_map(_job, jobs, 2, _init, (0,), ordered=False) as results:
        assert sorted(r[0] for r in results) == jobs
    with worker_map(_job, [], 2, _init, (0,)) as results:  # no jobs: no pool, no init
        assert list(results) == []


def _fail(_):
    raise ValueError("no teacher here")


def _die(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    time.sleep(0.2)
    return x


def _through(jobs, fn, init, out):
    try:
        with worker_map(fn, jobs, 2, init, (0,)) as results:
            out.append(list(results))
    except Exception as e:
        out.append(e)


@pytest.mark.parametrize("fn, init, message", [(_job, _fail, "a worker failed to start: ValueError: no teacher here"),
                                               (_die, _init, "a worker process died")])
def test_a_worker_that_cannot_start_or_dies_is_an_error_not_a_wait(fn, init, message):
    out = []  # a Pool left to itself would wait forever: a daemon thread bounds the test
    thread = threading.Thread(target=_through, args=(list(range(6)), fn, init, out), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert out, "worker_map should have raised, not waited"
    assert isinstance(out[0], RuntimeError) and re.match(message, str(out[0])), out[0]
