"""GPU assignment. This machine has no GPU: allocators are emulated (the only mock here);
tests/test_runtime_local.py checks that the ids reach a real runner process."""

from __future__ import annotations

import threading

import pytest

from buildsvc.runtime.gpus import (
    GpuAllocator,
    GpuRequestRefused,
    NoGpuAvailable,
    check_machine_type,
)


def test_allocations_are_distinct_and_released() -> None:
    gpus = GpuAllocator.detect(emulate=4)
    assert gpus.emulated and gpus.total == 4
    a, b = gpus.allocate("a", 2), gpus.allocate("b", 2)
    assert not set(a) & set(b) and len(a + b) == 4
    with pytest.raises(NoGpuAvailable, match="needs 1 GPU.*0 of 4 are free"):
        gpus.allocate("c", 1)
    gpus.release("a")
    assert sorted(gpus.allocate("c", 2)) == sorted(a)
    gpus.release("nobody")  # a no-op


def test_allocate_again_returns_the_same_gpus_and_zero_needs_none() -> None:
    gpus = GpuAllocator([3, 5])
    assert gpus.allocate("a", 1) == gpus.allocate("a", 1) == [3]
    assert gpus.allocate("cpu", 0) == []
    assert gpus.free() == [5]


def test_impossible_requests_are_refused_with_the_fix() -> None:
    with pytest.raises(GpuRequestRefused, match="only 2 GPU.*at most 2"):
        GpuAllocator([0, 1]).allocate("a", 3)
    with pytest.raises(GpuRequestRefused, match="--emulate-gpus"):
        GpuAllocator([]).allocate("a", 1)


def test_never_one_gpu_to_two_runners_under_contention() -> None:
    gpus = GpuAllocator.detect(emulate=8)
    got: dict[str, list[int]] = {}

    def grab(name: str) -> None:
        try:
            got[name] = gpus.allocate(name, 1)
        except NoGpuAvailable:
            pass

    threads = [threading.Thread(target=grab, args=(f"r{i}",)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assigned = [g for ids in got.values() for g in ids]
    assert len(assigned) == 8 and len(set(assigned)) == 8


def test_gpu_machine_type_without_gpus_names_the_type_and_the_fix() -> None:
    none = GpuAllocator([])
    with pytest.raises(GpuRequestRefused, match=r"machine_type = 'GPU-H100'.*--emulate-gpus N"):
        check_machine_type(["GPU-H100"], 1, none)
    check_machine_type(["CPU"], None, none)
    check_machine_type(["GPU-H100", "CPU"], None, none)  # a CPU fallback is acceptable
    with pytest.raises(GpuRequestRefused, match="num_gpus = 4"):
        check_machine_type(["GPU-A100"], 4, GpuAllocator.detect(emulate=2))
    check_machine_type(["GPU-A100"], 2, GpuAllocator.detect(emulate=2))


def test_detect_without_gpus_finds_none_and_bad_input_is_refused() -> None:
    assert GpuAllocator.detect().emulated is False  # real detection: no GPU on this box
    with pytest.raises(ValueError, match="emulate = -1"):
        GpuAllocator.detect(emulate=-1)
    with pytest.raises(ValueError, match="once"):
        GpuAllocator([0, 0])


def test_public_surfaces_of_the_runtime_modules() -> None:
    import buildsvc.builder
    import buildsvc.builder.env
    import buildsvc.runtime.agent
    import buildsvc.runtime.gpus
    import buildsvc.runtime.local

    assert buildsvc.builder.env.__all__ == ["BuildError", "Env", "EnvBuilder", "UvRunner", "run_uv"]
    assert buildsvc.builder.__all__ == ["BuildError", "Env", "EnvBuilder"]
    assert buildsvc.runtime.agent.__all__ == ["main"]
    assert buildsvc.runtime.local.__all__ == ["LocalBackend"]
    assert buildsvc.runtime.gpus.__all__ == [
        "GpuAllocator",
        "GpuError",
        "GpuRequestRefused",
        "NoGpuAvailable",
        "check_machine_type",
        "is_gpu_machine_type",
    ]
