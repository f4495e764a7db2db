"""The uv env builder, with real uv: caching, locking, failures, blob and fal requirements."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from runtime_helpers import RecordingUv, make_sdist

from buildsvc.builder.env import BuildError, Env, EnvBuilder

OWN = f"{sys.version_info.major}.{sys.version_info.minor}"


def _no_blobs(sha: str) -> Path:
    raise AssertionError(f"unexpected blob lookup {sha}")


def _builder(root: Path, uv: RecordingUv, blobs: Path | None = None) -> EnvBuilder:
    blob_path = (lambda sha: blobs / sha) if blobs else _no_blobs
    return EnvBuilder(root, blob_path=blob_path, runner=uv)


def _py(env: Env, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env.python), "-c", code], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Env, RecordingUv]:
    root = tmp_path_factory.mktemp("envs")
    uv = RecordingUv()
    env = asyncio.run(_builder(root, uv).ensure(OWN, []))
    return root, env, uv


def test_empty_env_has_the_agent_layer_but_not_the_services_packages(built) -> None:
    _, env, uv = built
    assert [c[1] for c in uv.calls] == ["venv", "pip"]
    assert env.python == env.path / "bin" / "python"
    ok = _py(env, "import buildsvc.runtime.agent, falcli, cloudpickle, uvicorn, starlette")
    assert ok.returncode == 0, ok.stderr
    hidden = _py(env, "import typer")  # installed in the service, not in the app's env
    assert "No module named 'typer'" in hidden.stderr


def test_cache_hit_runs_no_uv_even_from_another_builder(built) -> None:
    root, env, _ = built
    uv = RecordingUv()
    again = asyncio.run(_builder(root, uv).ensure(OWN, []))
    assert again == env
    assert uv.calls == []


def test_no_cache_rebuilds_with_refresh(tmp_path: Path) -> None:
    uv = RecordingUv()
    builder = _builder(tmp_path, uv)
    asyncio.run(builder.ensure(OWN, [["cloudpickle"]]))
    env = asyncio.run(builder.ensure(OWN, [["cloudpickle"]], no_cache=True))
    assert [c[1] for c in uv.calls] == ["venv", "pip", "venv", "pip"]
    assert all("--refresh" in c for c in uv.calls[2:])
    assert _py(env, "import cloudpickle").returncode == 0


def test_concurrent_ensure_builds_once_across_builders(tmp_path: Path) -> None:
    """Two builders on separate loops/threads stand for two service processes (fcntl lock)."""
    uv = RecordingUv()
    results: list[Env] = []

    async def three_at_once() -> None:
        builder = _builder(tmp_path, uv)
        envs = await asyncio.gather(*(builder.ensure(OWN, [["pydantic"]]) for _ in range(3)))
        results.extend(envs)

    threads = [threading.Thread(target=asyncio.run, args=(three_at_once(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert len(results) == 6 and len(set(results)) == 1
    assert [c[1] for c in uv.calls] == ["venv", "pip"]


def test_unresolvable_requirement_fails_with_uvs_message_and_leaves_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    builder = _builder(tmp_path, RecordingUv())
    bad = [["surely-not-a-real-package-fal-test-9f3a==1.0"]]
    with pytest.raises(BuildError) as info:
        asyncio.run(builder.ensure(OWN, bad, log=lines.append))
    assert "surely-not-a-real-package-fal-test-9f3a" in info.value.detail
    assert info.value.detail.splitlines()[-1] in lines  # streamed live, then kept verbatim
    assert not builder.env_for(builder.key_for(OWN, bad)).path.exists()


def test_missing_python_version_names_it_and_the_fix(tmp_path: Path) -> None:
    builder = _builder(tmp_path, RecordingUv())
    with pytest.raises(BuildError, match=r"no Python 3\.99.*install Python 3\.99"):
        asyncio.run(builder.ensure("3.99", []))
    assert list((tmp_path / "envs").glob("*")) == []


def test_keys_depend_on_python_and_layers(tmp_path: Path) -> None:
    builder = _builder(tmp_path, RecordingUv())
    keys = {
        builder.key_for(OWN, []),
        builder.key_for("3.12", []),
        builder.key_for(OWN, [["numpy"]]),
        builder.key_for(OWN, [["numpy"], ["scipy"]]),
    }
    assert len(keys) == 4
    assert builder.key_for(OWN, [["numpy"]]) == builder.key_for(OWN, [["numpy"]])


@pytest.mark.slow
def test_blob_requirement_with_extra_installs_and_fal_is_dropped(tmp_path: Path) -> None:
    sdist = make_sdist(tmp_path / "pkg")
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.copy(sdist, blobs / sha)  # the blob store names files by hash only
    uv, lines = RecordingUv(), []
    builder = _builder(tmp_path / "root", uv, blobs)
    layers = [["fal==1.0.0"], [f"/blob:{sha}:{sdist.name}[extra]"]]
    env = asyncio.run(builder.ensure(OWN, layers, log=lines.append))
    install = uv.calls[-1]
    assert not any(arg.startswith("fal==") for arg in install)
    assert any("skipping requirement 'fal==1.0.0'" in line for line in lines)
    assert any(arg.endswith(f"{sha}/{sdist.name}[extra]") for arg in install)
    ok = _py(env, "import tinypkg; print(tinypkg.__version__)")
    assert ok.stdout.strip() == "0.1.0", ok.stderr


def test_blob_missing_from_store_is_a_clear_error(tmp_path: Path) -> None:
    builder = _builder(tmp_path / "root", RecordingUv(), tmp_path)
    with pytest.raises(BuildError, match="not in the blob store"):
        asyncio.run(builder.ensure(OWN, [[f"/blob:{'0' * 64}:x-1.0.tar.gz"]]))
