"""Measuring a training run: step times, peak memory, FLOPs and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from tuner.bench.profiling import StepProfiler
from tuner.runtime.device import release_host_memory

# Dense bf16 tensor-core peaks (no sparsity), in FLOP/s, from the vendors' data sheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "H200": 989e12,
    "A100": 312e12,
    "910B": 376e12,  # Ascend 910B2 (the 910B3 is 313e12)
}
RSS_POLL_SECONDS = 0.005


@dataclass
class RunFigures:
    """What one trainer measured; rates are medians over the steps after warm-up."""

    name: str
    steps_per_s: float
    samples_per_s: float
    time_to_first_step_s: float
    peak_memory_mb: float
    memory_kind: str  # "CPU RSS" or "accelerator peak allocated"
    flops_per_step: float | None = None
    mfu: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# Set in a benchmark's own process (tuner/bench/rounds.py): the clock then starts when the process did.
CLOCK_FROM_PROCESS_START = False


def _clock_origin() -> float:
    """Now, or (in a benchmark's own process) the process's start, on the perf_counter scale: a trainer
    that imports lazily is then charged for its imports, as one that imports up front is."""
    if not CLOCK_FROM_PROCESS_START:
        return time.perf_counter()
    return time.perf_counter() - (time.time() - psutil.Process().create_time())


@dataclass
class StepClock:
    """Timestamps taken at the start of every training step (by a wrapped loss function)."""

    started_at: float = field(default_factory=_clock_origin)
    step_starts: list[float] = field(default_factory=list)
    step_samples: list[int] = field(default_factory=list)

    def tick(self, samples: int) -> None:
        self.step_starts.append(time.perf_counter())
        self.step_samples.append(samples)

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the steps after `warmup`, each from its start to the next step's start."""
        starts = self.step_starts
        return [starts[i + 1] - starts[i] for i in range(warmup, len(starts) - 1)]

    def time_to_first_step(self) -> float:
        """From the clock's creation to the end of the first step (the second step's start)."""
        return self.step_starts[1] - self.started_at

    def rates(self, warmup: int) -> tuple[float, float]:
        """(steps/s, samples/s): the median step time's reciprocal, and samples over the same steps."""
        seconds = self.step_seconds(warmup)
        if not seconds:
            raise ValueError(f"need more than {warmup + 1} steps to measure after {warmup} warm-up steps")
        median = statistics.median(seconds)
        samples = self.step_samples[warmup : warmup + len(seconds)]
        return 1.0 / median, statistics.median(s / t for s, t in zip(samples, seconds, strict=True))


class PeakMemory:
    """Peak memory of a phase: CPU RSS sampled by a thread, or the accelerator's peak allocated."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "CPU RSS" if self.device.type == "cpu" else "accelerator peak allocated"

    def __enter__(self) -> PeakMemory:
        release_freed_memory()
        if self.device.type == "cpu":
            process = psutil.Process()
            self.peak_bytes = process.memory_info().rss

            def poll() -> None:
                while not self._stop.wait(RSS_POLL_SECONDS):
                    self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        else:
            _accelerator_module(self.device).reset_peak_memory_stats()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)
        else:
            self.peak_bytes = _accelerator_module(self.device).max_memory_allocated()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def _accelerator_module(device: torch.device):
    return getattr(torch, device.type)


def release_freed_memory() -> None:
    """Hand freed host heap (and the CUDA cache) back, so the next phase's memory starts low: without
    it a second trainer in the same process would be charged for the first one's freed memory."""
    release_host_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCounterMode]:
    """FLOPs of everything run inside (forward and backward), counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        yield counter


def device_peak_flops(device: torch.device) -> float | None:
    """The bf16 dense peak of `device` from PEAK_BF16_FLOPS, or None (CPU, or a device not listed)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "npu":
        name = torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    else:
        return None
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def model_flops_utilisation(flops_per_step: float, steps_per_s: float, device: torch.device) -> float | None:
    peak = device_peak_flops(device)
    return flops_per_step * steps_per_s / peak if peak else None


class TimedLoss:
    """A loss function that ticks `clock` at the start of every call (one call per step at grad_accum 1).

    Step `flops_step` runs under a FlopCounterMode, entered at its start and left at the next call's
    start, so its forward, backward and optimizer step are counted; keep it inside the warm-up.
    `profiler` (a `StepProfiler`) is told of every step before it is timed.
    """

    def __init__(
        self,
        clock: StepClock,
        loss_fn: Callable[..., torch.Tensor],
        samples_of: Callable[[Any], int],
        flops_step: int | None = None,
        profiler: StepProfiler | None = None,
    ) -> None:
        self.clock = clock
        self.profiler = profiler
        self.loss_fn = loss_fn
        self.samples_of = samples_of
        self.flops_step = flops_step
        self.flops: float | None = None
        self._counter: FlopCounterMode | None = None

    def __call__(self, model: torch.nn.Module, batch: Any, **options: Any) -> torch.Tensor:
        self.stop_counting()
        step = len(self.clock.step_starts)
        if self.profiler is not None:
            self.profiler.on_step(step)
        self.clock.tick(self.samples_of(batch))
        if step == self.flops_step:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        return self.loss_fn(model, batch, **options)

    def finish(self) -> None:
        """After training: stop counting and profiling if the run ended before they did."""
        self.stop_counting()
        if self.profiler is not None:
            self.profiler.finish()

    def stop_counting(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = float(self._counter.get_total_flops())
            self._counter = None


def environment_description(device: torch.device) -> dict[str, str]:
    """Device, thread count and library versions, recorded with every figure."""
    import platform

    import diffusers
    import peft
    import transformers

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    elif device.type == "npu":
        device_name = torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    else:
        device_name = f"{platform.processor() or platform.machine()} CPU, {psutil.cpu_count()} cores"
    return {
        "device": device_name,
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
