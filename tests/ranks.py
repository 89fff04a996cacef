"""Run a test function on several gloo ranks, each in a fresh process: the tests that compare DDP with one process.

The ranks meet through a file (no port to race for), every collective has a timeout, and a rank that dies or hangs
fails the test with a message that says which rank and how, instead of a hang or a bare SIGABRT."""

import faulthandler
import os
import signal
import tempfile
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from common import compute_cleanup


def _rank_main(fn, rank, world_size, init_file, args):
    faulthandler.enable()  # a rank that dies on a signal prints its Python stack to the captured stderr
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    fn(rank, world_size, *args)
    # every rank finishes its collectives before any rank tears down its connections, as the stages do (run_stage)
    dist.barrier()
    compute_cleanup()


def _describe(code):
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def run_ranks(fn, world_size, *args, timeout=180):
    """fn(rank, world_size, *args) on world_size processes with a gloo process group; results go through files."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "rendezvous")
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, init_file, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one rank died: the others would wait for it until their collective timeout
            time.sleep(0.1)
        failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        if failed:
            pytest.fail("; ".join(f"rank {r} of {world_size} died with {_describe(c)}" for r, c in failed) +
                        " (its traceback, if any, is in the captured stderr)")
        if hung:
            pytest.fail(f"ranks {hung} of {world_size} did not finish within {timeout} s")
