"""GPU utilization and memory sampling in a background thread, and the timing loop every part shares.

Utilization comes from NVML (``nvidia-ml-py``) every 100 ms, or from polling ``nvidia-smi`` when
NVML is missing; on a CPU run there is nothing to sample and the summary says ``n/a``.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer read after it covers that work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Nvml:
    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> tuple[float, float]:
        util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        return float(util), used / 2**30


class _Smi:
    def __init__(self, index: int) -> None:
        if shutil.which("nvidia-smi") is None:
            raise RuntimeError("neither pynvml nor nvidia-smi is available")
        self._cmd = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu,memory.used",
                     "--format=csv,noheader,nounits"]

    def read(self) -> tuple[float, float]:
        out = subprocess.run(self._cmd, capture_output=True, text=True, timeout=5, check=True).stdout
        util, used_mib = (float(x) for x in out.strip().splitlines()[0].split(","))
        return util, used_mib / 1024


@dataclass
class GpuStats:
    util_mean: float | None  # percent, over the samples taken while the monitor ran
    util_samples: int
    mem_peak_gib: float | None  # torch's peak allocation in this process
    mem_used_peak_gib: float | None  # device-wide, as NVML / nvidia-smi report it
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"util_mean_pct": None if self.util_mean is None else round(self.util_mean, 1),
                "util_samples": self.util_samples,
                "mem_peak_gib": None if self.mem_peak_gib is None else round(self.mem_peak_gib, 2),
                "mem_used_peak_gib": None if self.mem_used_peak_gib is None else round(self.mem_used_peak_gib, 2),
                "source": self.source}


class GpuMonitor:
    """``with monitor.window() as w: ...`` samples utilization while the block runs; ``w.stats`` after."""

    def __init__(self, device: str, interval: float = 0.1) -> None:
        self.device = device
        self.interval = interval
        self.reader: Any = None
        self.source = "n/a"
        if not device.startswith("cuda"):
            return
        index = torch.device(device).index or 0
        for kind in (_Nvml, _Smi):
            try:
                self.reader = kind(index)
                self.source = "nvml" if kind is _Nvml else "nvidia-smi"
                break
            except Exception:  # noqa: BLE001 - fall back to the next sampler
                continue

    def window(self) -> _Window:
        return _Window(self)


class _Window:
    def __init__(self, monitor: GpuMonitor) -> None:
        self.monitor = monitor
        self.samples: list[tuple[float, float]] = []
        self.stats = GpuStats(None, 0, None, None, monitor.source)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.monitor.interval):
            try:
                self.samples.append(self.monitor.reader.read())
            except Exception:  # noqa: BLE001 - a failed read loses one sample, not the benchmark
                continue

    def __enter__(self) -> _Window:
        if self.monitor.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if self.monitor.reader is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if not self.monitor.device.startswith("cuda"):
            return
        utils = [u for u, _ in self.samples]
        self.stats = GpuStats(
            util_mean=statistics.fmean(utils) if utils else None, util_samples=len(utils),
            mem_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            mem_used_peak_gib=max((m for _, m in self.samples), default=None), source=self.monitor.source)


@dataclass
class Rate:
    units: float  # images, sentences, audio seconds or samples processed in the timed window
    seconds: float
    calls: int

    @property
    def per_s(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else 0.0


def timed(step: Callable[[], float], *, seconds: float, warmup: int, device: str,
          min_calls: int = 1) -> Rate:
    """Run ``step`` (returns units done) ``warmup`` times untimed, then until ``seconds`` have passed."""
    for _ in range(warmup):
        step()
    sync(device)
    units, calls, start = 0.0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        units += step()
        calls += 1
    sync(device)
    return Rate(units, time.perf_counter() - start, calls)


def timed_iter(batches: Iterable[Any], consume: Callable[[Any], float], *, seconds: float, warmup: int,
               device: str) -> Rate:
    """Like ``timed`` over an iterator (a DataLoader): the first ``warmup`` batches start the workers."""
    it = iter(batches)
    for _ in range(warmup):
        consume(next(it))
    sync(device)
    units, calls, start = 0.0, 0, time.perf_counter()
    for batch in it:
        units += consume(batch)
        calls += 1
        if time.perf_counter() - start >= seconds:
            break
    sync(device)
    return Rate(units, time.perf_counter() - start, calls)
