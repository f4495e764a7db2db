"""GPU inventory and assignment: which runner owns which GPU on this machine.

A GPU belongs to at most one runner at a time; the runner sees only its own GPUs through
``CUDA_VISIBLE_DEVICES`` (set by the local backend from ``RunnerSpec.gpu_ids``). On a machine
without GPUs, ``detect(emulate=N)`` fakes N of them so GPU apps can be developed (the app
then runs on the CPU, but scheduling and isolation behave as on a GPU machine).

    GpuError
    ├── NoGpuAvailable     every GPU is busy right now (retry when a runner stops)
    └── GpuRequestRefused  the request can never be met on this machine
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

__all__ = [
    "GpuAllocator",
    "GpuError",
    "GpuRequestRefused",
    "NoGpuAvailable",
    "check_machine_type",
    "is_gpu_machine_type",
]

_NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)
_SMI_TIMEOUT_S = 10


class GpuError(Exception):
    """A GPU request that cannot be served."""


class NoGpuAvailable(GpuError):
    pass


class GpuRequestRefused(GpuError):
    pass


def is_gpu_machine_type(machine_type: str) -> bool:
    """fal names GPU machines "GPU-H100", "GPU-A100", ...; everything else is a CPU size."""
    return machine_type.upper().startswith("GPU")


class GpuAllocator:
    """Hands out distinct GPU ids to runners. Thread-safe."""

    def __init__(self, gpu_ids: list[int], *, emulated: bool = False) -> None:
        if len(set(gpu_ids)) != len(gpu_ids):
            raise ValueError(f"gpu_ids = {gpu_ids}: each GPU id may appear once")
        self.gpu_ids = list(gpu_ids)
        self.emulated = emulated
        self._owners: dict[int, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def detect(cls, *, emulate: int = 0) -> GpuAllocator:
        """The GPUs of this machine; ``emulate=N`` fakes N GPUs instead, for development."""
        if emulate < 0:
            raise ValueError(f"emulate = {emulate}: expected a number of GPUs >= 0")
        if emulate:
            return cls(list(range(emulate)), emulated=True)
        return cls(_detect_gpu_ids())

    @property
    def total(self) -> int:
        return len(self.gpu_ids)

    def free(self) -> list[int]:
        with self._lock:
            return [g for g in self.gpu_ids if g not in self._owners]

    def allocate(self, runner_id: str, count: int) -> list[int]:
        """Reserve ``count`` GPUs for ``runner_id`` (its existing ones if it already has them)."""
        if count <= 0:
            return []
        self._refuse_impossible(count)
        with self._lock:
            held = sorted(g for g, owner in self._owners.items() if owner == runner_id)
            if held:
                return held
            free = [g for g in self.gpu_ids if g not in self._owners]
            if len(free) < count:
                raise NoGpuAvailable(
                    f"runner {runner_id} needs {count} GPU(s) but only {len(free)} of "
                    f"{self.total} are free; it can start when another runner stops "
                    "(lower max_concurrency to queue instead)")
            for gpu in free[:count]:
                self._owners[gpu] = runner_id
            return free[:count]

    def release(self, runner_id: str) -> None:
        """Give back every GPU ``runner_id`` holds (a no-op if it holds none)."""
        with self._lock:
            for gpu in [g for g, owner in self._owners.items() if owner == runner_id]:
                del self._owners[gpu]

    def _refuse_impossible(self, count: int) -> None:
        if self.total == 0:
            raise GpuRequestRefused(
                f"num_gpus = {count}: this machine has no GPUs; use a CPU machine_type, or "
                "start the server with --emulate-gpus N to develop GPU apps here")
        if count > self.total:
            raise GpuRequestRefused(
                f"num_gpus = {count}: this machine has only {self.total} GPU(s); "
                f"set num_gpus to at most {self.total}")


def check_machine_type(machine_types: list[str], num_gpus: int | None,
                       allocator: GpuAllocator) -> None:
    """Refuse, before building anything, an app this machine can never run."""
    gpu_types = [m for m in machine_types if is_gpu_machine_type(m)]
    if not gpu_types or len(gpu_types) < len(machine_types):
        return  # a CPU type is acceptable, so a fallback exists
    if allocator.total == 0:
        raise GpuRequestRefused(
            f"machine_type = {gpu_types[0]!r}: this server has no GPUs; use "
            "machine_type = 'CPU', or for development start the server with "
            "--emulate-gpus N to emulate N GPUs")
    count = num_gpus or 1
    if count > allocator.total:
        raise GpuRequestRefused(
            f"num_gpus = {count} (machine_type = {gpu_types[0]!r}): this server has only "
            f"{allocator.total} GPU(s); set num_gpus to at most {allocator.total}")


def _detect_gpu_ids() -> list[int]:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True,
                                 timeout=_SMI_TIMEOUT_S, check=True).stdout
            return sorted(int(n) for n in _SMI_LINE.findall(out))
        except (OSError, subprocess.SubprocessError):
            pass  # a broken driver install: fall back to what the kernel module reports
    if _NVIDIA_PROC.is_dir():
        return list(range(len(list(_NVIDIA_PROC.iterdir()))))
    return []
