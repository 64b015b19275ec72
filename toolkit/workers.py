"""Worker processes that never outlive their parent: a killed `bench` or `data collect` leaves none behind."""
import os
import threading
import time


def die_with_parent(parent: int, interval: float = 0.2):
    """Call first thing in a worker process, with the pid of the process that started it (its own view: a parent
    killed while the worker was still importing is gone already): the worker exits as soon as that process is
    gone (kill -9 included: the worker is re-parented, so its parent pid changes), instead of computing on."""

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
