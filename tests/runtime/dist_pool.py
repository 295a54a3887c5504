"""A pool of gloo ranks that runs one job at a time on every rank, with a deadline.

Starting ranks costs seconds (each imports torch and moec), so a pool is started once per test
module and reused; a job is a module-level function `fn(rank, world_size, *args)` that asserts
inside the ranks. A job that fails on any rank raises here with every rank's traceback; a job
that outlives its deadline kills the pool (the next job starts a fresh one), so a bug never
hangs the suite.
"""
import datetime
import os
import pickle
import queue
import tempfile
import traceback

import torch.multiprocessing as mp


class RankPool:
    # pg_timeout_s: how long a rank waits in a collective for the others. Some tests have one rank
    # compile while the other waits in the layer's all-to-all (test_chunk_tokens' recompile on one
    # rank): on a 2-core machine busy with another job that compile outlasted 20 s (2026-12-06).
    def __init__(self, world_size: int, pg_timeout_s: float = 60.0):
        self.world_size, self.pg_timeout_s = world_size, pg_timeout_s
        self.procs = []

    def run(self, fn, *args, timeout: float = 40.0):
        """Run fn(rank, world_size, *args) on every rank; return the ranks' results in rank order."""
        pickle.dumps((fn, args))   # fail here, not silently in the queue's feeder thread
        if not self.procs:
            self._start()
        for q in self.jobs:
            q.put((fn, args))
        results, errors = {}, []
        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=timeout)
                (results.__setitem__(rank, value) if ok else errors.append(f"--- rank {rank} ---\n{value}"))
        except queue.Empty:
            self.close(graceful=False)
            raise TimeoutError(f"{fn.__name__} did not finish on all {self.world_size} ranks within {timeout}s; "
                               f"finished: {sorted(results)}\n" + "\n".join(errors)) from None
        if errors:
            self.close(graceful=False)   # a failed job may leave the group mid-collective: start afresh
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(sorted(errors)))
        return [results[r] for r in range(self.world_size)]

    def _start(self):
        ctx = mp.get_context("spawn")
        self.store = tempfile.NamedTemporaryFile(prefix="moec_gloo_", delete=False).name
        self.jobs = [ctx.Queue() for _ in range(self.world_size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, self.world_size, self.store, self.pg_timeout_s, self.jobs[r], self.results))
                      for r in range(self.world_size)]
        for p in self.procs:
            p.start()

    def close(self, graceful: bool = True):
        """Stop the ranks; graceful=False kills them at once (for a pool whose group is broken)."""
        for q in getattr(self, "jobs", []) if graceful else []:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5 if graceful else 0)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        if getattr(self, "store", None) and os.path.exists(self.store):
            os.unlink(self.store)


def _worker(rank, world_size, store, pg_timeout_s, jobs, results):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)   # two cores shared by up to four ranks
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    while (job := jobs.get()) is not None:
        fn, args = job
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()
