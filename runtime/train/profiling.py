"""[profiling]: torch.profiler traces and CUDA memory snapshots, per rank (torchtitan's keys).

    profiler = StepProfiler(cfg.profiling, dump_folder, rank, device, start_step).start()
    try:     each training step: ...; profiler.step()
    except torch.OutOfMemoryError: profiler.dump_oom_snapshot(failing_step); raise
    finally: profiler.close()
(or `with StepProfiler(...) as profiler:`, which does the same).

Traces: a torch.profiler schedule of `profile_freq` steps per cycle (wait, then
`profiler_warmup` steps traced and discarded, so that lazy initialisation does not dominate,
then `profiler_active` steps recorded); at the end of each cycle every rank writes
    <dump_folder>/<save_traces_folder>/iteration_N/rankR_trace.json
(N = the last recorded training step, a multiple of profile_freq, resumed or not; open it in
https://ui.perfetto.dev or chrome://tracing). A cycle cut short by the end of the run is dropped.

Memory snapshots (CUDA only; elsewhere a warning): the allocator's history is recorded from the
start of the loop, and every `profile_freq` steps each rank writes
    <dump_folder>/<save_memory_snapshot_folder>/iteration_N/rankR_memory_snapshot.pickle
and, when step N runs out of memory, iteration_N_oom/ before the error propagates (drag the
file into https://pytorch.org/memory_viz). The file is torch's own pickle format: written
here, never read by the runtime.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

# Allocation/free events kept by the allocator's ring buffer: bounds snapshot size and cost.
MEMORY_SNAPSHOT_MAX_ENTRIES = 100_000


class StepProfiler:
    def __init__(self, cfg, dump_folder: str, rank: int, device: torch.device, start_step: int,
                 log: Callable[[str], None] = print):
        """cfg: the [profiling] section; start_step: the step the run continues after;
        log: a rank-0 printer (every rank writes its own files)."""
        self.cfg = cfg
        self.rank = rank
        self.device = device
        self.step_num = start_step  # the last finished training step
        self.log = log
        self.trace_dir = Path(dump_folder) / cfg.save_traces_folder
        self.snapshot_dir = Path(dump_folder) / cfg.save_memory_snapshot_folder
        self._torch_profiler = None
        self._recording_memory = False
        self._dumped = False  # a file was written during the current step() call
        self._closing = False

    # ------------------------------------------------------------------ lifetime
    def start(self) -> StepProfiler:
        if self.cfg.enable_profiling:
            self._start_traces()
        if self.cfg.enable_memory_snapshot:
            if self.device.type == "cuda":
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_SNAPSHOT_MAX_ENTRIES)
                self._recording_memory = True
                self.log(f"memory snapshots every {self.cfg.profile_freq} steps (and on OOM) "
                         f"in {self.snapshot_dir}")
            else:
                self.log(f"warning: profiling.enable_memory_snapshot: memory snapshots need "
                         f"CUDA (device is {self.device.type}); none will be written")
        return self

    def close(self) -> None:
        if self._torch_profiler is not None:
            # Stopping mid-cycle makes torch hand over the partial cycle: drop it (an
            # iteration_N trace holds the steps of a whole cycle).
            self._closing = True
            self._torch_profiler.__exit__(None, None, None)
            self._torch_profiler = None
        if self._recording_memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording_memory = False

    def __enter__(self) -> StepProfiler:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
                self.dump_oom_snapshot(self.step_num + 1)
        finally:
            self.close()
        return False  # never swallow an error

    # ------------------------------------------------------------------ per step
    def step(self) -> bool:
        """Call after each training step. True when a file was written during the call
        (its time is not the step's: callers reset their step timer)."""
        self._dumped = False
        self.step_num += 1
        if self._torch_profiler is not None:
            self._torch_profiler.step()  # at the end of a cycle: _write_trace
        if self._recording_memory and self.step_num % self.cfg.profile_freq == 0:
            self._dump_snapshot(f"iteration_{self.step_num}")
        return self._dumped

    def dump_oom_snapshot(self, failing_step: int) -> None:
        """The allocator history up to an out-of-memory error in `failing_step` (if recording)."""
        if self._recording_memory:
            self._dump_snapshot(f"iteration_{failing_step}_oom")

    # ------------------------------------------------------------------ traces
    def _start_traces(self) -> None:
        c = self.cfg
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # One cycle per profile_freq steps: wait, warm up, record (config checks wait >= 0).
        cycle = torch.profiler.schedule(
            wait=c.profile_freq - c.profiler_warmup - c.profiler_active,
            warmup=c.profiler_warmup, active=c.profiler_active)
        # The profiler counts its own steps from 0 (its step n runs global step start + n + 1):
        # shift them so that cycles end on multiples of profile_freq, resumed or not.
        start = self.step_num
        self._torch_profiler = torch.profiler.profile(
            activities=activities, schedule=lambda n: cycle(start + n),
            on_trace_ready=self._write_trace, record_shapes=True)
        self._torch_profiler.__enter__()
        self.log(f"profiling: {c.profiler_active} step(s) traced every {c.profile_freq} "
                 f"(after {c.profiler_warmup} warmup) into {self.trace_dir}")

    def _write_trace(self, prof) -> None:
        if self._closing:
            return
        folder = self.trace_dir / f"iteration_{self.step_num}"  # the step just finished
        folder.mkdir(parents=True, exist_ok=True)
        begin = time.perf_counter()
        prof.export_chrome_trace(str(folder / f"rank{self.rank}_trace.json"))
        self._dumped = True
        self.log(f"profiler trace of step {self.step_num} written to {folder} "
                 f"in {time.perf_counter() - begin:.2f}s")

    # ------------------------------------------------------------------ memory
    def _dump_snapshot(self, name: str) -> None:
        folder = self.snapshot_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        begin = time.perf_counter()
        torch.cuda.memory._dump_snapshot(str(folder / f"rank{self.rank}_memory_snapshot.pickle"))
        self._dumped = True
        self.log(f"memory snapshot written to {folder} in {time.perf_counter() - begin:.2f}s")
