"""falcli.packaging: options precedence, files, payload pickling, hashes, sdists.

Everything runs for real: fixture projects on disk, cloudpickle, subprocesses for the
cross-process hash check and for unpickling where the user's code is absent, and
``python -m build`` (with uv) for the ``.[extra]`` sdist.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from project_helpers import isolated_imports  # noqa: F401  (autouse: importing applies it)

import falcli.packaging
from falcli.errors import PackagingError
from falcli.packaging import package
from falcli.packaging.files import dockerfile_sources
from falcli.packaging.hashcache import HashCache
from falcli.packaging.manifest import manifest_hash, parse_blob_requirement
from falcli.project import resolve_target

REPO = Path(__file__).resolve().parents[1]
PROJECTS = Path(__file__).parent / "fixtures" / "projects"
OLD = time.time() - 3600  # an mtime safely outside the hash cache's racy window


def _python(code: str, *, cwd: Path, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_public_api_is_exactly_this() -> None:
    assert sorted(falcli.packaging.__all__) == ["Bundle", "package"]


# -- precedence ------------------------------------------------------------------------


def test_options_precedence_cli_over_class_over_pyproject_over_default(tmp_path: Path) -> None:
    target = resolve_target("greeter", PROJECTS / "single")
    options = package(target, overrides={"keep_alive": 99, "auth": None}, cache_dir=tmp_path)
    resolved = options.manifest["options"]
    assert resolved["keep_alive"] == 99  # CLI flag (pyproject 300, class 30)
    assert resolved["request_timeout"] == 120  # class (default 3600)
    assert resolved["max_concurrency"] == 4  # pyproject (default 10)
    assert resolved["auth"] == "private"  # pyproject: a None flag is "not given"
    assert resolved["min_concurrency"] == 0  # default
    assert resolved["machine_type"] == ["M"]
    assert resolved["app_scale_settings"] is False  # from the deprecated no_scale = true
    plain = package(target, cache_dir=tmp_path).manifest["options"]
    assert plain["keep_alive"] == 30


@pytest.mark.parametrize(
    ("ref", "overrides", "expected"),
    [
        ("greeter", {}, "greeter"),  # the app key
        ("greeter", {"app_name": "from-cli"}, "from-cli"),
        ("alpha", {}, "alpha-cls"),  # class app_name beats pyproject name
        ("alpha", {"app_name": "from-cli"}, "from-cli"),
        ("beta", {}, "beta-svc"),  # pyproject name beats the key
    ],
)
def test_app_name_precedence(
    tmp_path: Path, ref: str, overrides: dict[str, str], expected: str
) -> None:
    root = PROJECTS / ("single" if ref == "greeter" else "multi")
    bundle = package(resolve_target(ref, root), overrides=overrides, cache_dir=tmp_path)
    assert bundle.manifest["app_name"] == expected
    assert bundle.manifest["openapi"]["info"]["title"] == expected


def test_app_name_defaults_to_kebab_case_class_name(tmp_path: Path) -> None:
    (tmp_path / "kebab_app.py").write_text("import fal\n\nclass MyGoodApp(fal.App):\n    pass\n")
    bundle = package(resolve_target("kebab_app.py", tmp_path), cache_dir=tmp_path)
    assert bundle.manifest["app_name"] == "my-good-app"
    assert bundle.manifest["kind"] == "app"


def test_a_function_is_packaged_with_its_decorator_options(tmp_path: Path) -> None:
    (tmp_path / "func_app.py").write_text(
        "import fal\n\n@fal.function(keep_alive=42, requirements=['six'])\n"
        "def add(a: int, b: int) -> int:\n    return a + b\n"
    )
    bundle = package(resolve_target("func_app.py::add", tmp_path), cache_dir=tmp_path)
    manifest = bundle.manifest
    assert (manifest["kind"], manifest["app_name"]) == ("function", "add")
    assert manifest["options"]["keep_alive"] == 42
    assert manifest["requirements"] == [["six"]]
    assert list(manifest["openapi"]["paths"]) == ["/"]


def test_requirements_layers_and_manifest_shape(tmp_path: Path) -> None:
    bundle = package(resolve_target("beta", PROJECTS / "multi"), cache_dir=tmp_path)
    manifest = bundle.manifest
    assert manifest["requirements"] == [["pyjokes==0.6.0"], ["six"]]
    assert manifest["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert manifest["hash"] == manifest_hash(dict(manifest))
    payload = bundle.blobs[manifest["payload"]]
    assert isinstance(payload, bytes)
    assert hashlib.sha256(payload).hexdigest() == manifest["payload"]


def test_python_version_mismatch_is_refused(tmp_path: Path) -> None:
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.13"
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = resolve_target("greeter", PROJECTS / "single")
    with pytest.raises(PackagingError) as info:
        package(target, overrides={"python_version": other}, cache_dir=tmp_path)
    assert str(info.value) == (
        f"python_version = '{other}', but this interpreter is Python {local}: the app is "
        "pickled here and must be unpickled by the same minor version. Run fal from a "
        f"Python {other} environment, or set python_version = '{local}'"
    )


# -- files -----------------------------------------------------------------------------


def test_app_files_are_collected_with_ignores(tmp_path: Path) -> None:
    root = PROJECTS / "withfiles"
    bundle = package(resolve_target("files-app", root), cache_dir=tmp_path)
    files = bundle.manifest["files"]
    assert list(files) == ["assets/a.txt", "assets/sub/c.txt", "config.json"]
    for rel, sha in files.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == sha
        assert Path(bundle.blobs[sha]).resolve() == (root / rel).resolve()


def _files_project(tmp_path: Path, app_files: str) -> Path:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pf_app.py").write_text("import fal\n\nclass Pf(fal.App):\n    pass\n")
    (project / "pyproject.toml").write_text(
        f'[tool.fal.apps.pf]\nref = "pf_app.py::Pf"\napp_files = {app_files}\n'
    )
    return project


def test_a_symlink_pointing_outside_the_context_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    project = _files_project(tmp_path, '["data"]')
    (project / "data").mkdir()
    (project / "data" / "leak.txt").symlink_to(secret)
    with pytest.raises(PackagingError) as info:
        package(resolve_target("pf", project), cache_dir=tmp_path / "cache")
    assert str(info.value) == (
        f"[tool.fal.apps.pf] app_files: 'data' leads to {secret}, which is outside the context "
        f"directory {project}: keep app files (and symlink targets) inside it, or set "
        "app_files_context_dir to a directory that contains them"
    )


@pytest.mark.parametrize("entry", ["../secret.txt", "/etc/hostname"])
def test_paths_escaping_the_context_are_refused(tmp_path: Path, entry: str) -> None:
    (tmp_path / "secret.txt").write_text("outside")
    project = _files_project(tmp_path, f'["{entry}"]')
    with pytest.raises(PackagingError, match=r"absolute path|outside the context directory"):
        package(resolve_target("pf", project), cache_dir=tmp_path / "cache")


def test_a_symlink_inside_the_context_keeps_its_own_name(tmp_path: Path) -> None:
    project = _files_project(tmp_path, '["data"]')
    (project / "data").mkdir()
    (project / "real.txt").write_text("inside")
    (project / "data" / "link.txt").symlink_to(project / "real.txt")
    bundle = package(resolve_target("pf", project), cache_dir=tmp_path / "cache")
    assert bundle.manifest["files"] == {"data/link.txt": hashlib.sha256(b"inside").hexdigest()}


def test_dockerfile_sources_are_parsed() -> None:
    text = (PROJECTS / "docker" / "Dockerfile").read_text()
    assert dockerfile_sources(text) == ["requirements.txt", "src/"]
    assert dockerfile_sources('COPY ["a.txt", "b/", "/dst/"]\nADD ./c /d\n') == [
        "a.txt", "b/", "c",
    ]  # fmt: skip


def test_dockerfile_copy_sources_ship_and_the_dockerfile_is_inlined(tmp_path: Path) -> None:
    root = PROJECTS / "docker"
    bundle = package(resolve_target("boxed", root), cache_dir=tmp_path)
    assert list(bundle.manifest["files"]) == ["requirements.txt", "src/server.py"]
    image = bundle.manifest["options"]["image"]
    assert image["dockerfile_str"] == (root / "Dockerfile").read_text()
    assert image["dockerfile"] is None and image["build_args"] == {"CUDA_VERSION": "12.4"}


# -- payload ---------------------------------------------------------------------------

_PACKAGE_AND_PRINT_HASH = """
    import sys
    from pathlib import Path
    from falcli.packaging import package
    from falcli.project import resolve_target
    bundle = package(resolve_target(sys.argv[1], Path.cwd()), cache_dir=Path(sys.argv[2]))
    print(bundle.manifest["hash"])
"""


def test_same_inputs_give_the_same_hash_across_processes(tmp_path: Path) -> None:
    """Different hash seeds change set order and cloudpickle's class ids; the hash holds."""
    root = PROJECTS / "single"
    code = _PACKAGE_AND_PRINT_HASH.replace("sys.argv[1]", "'greeter'").replace(
        "sys.argv[2]", repr(str(tmp_path))
    )
    first = _python(code, cwd=root, env={"PYTHONHASHSEED": "1"})
    second = _python(code, cwd=root, env={"PYTHONHASHSEED": "2"})
    here = package(resolve_target("greeter", root), cache_dir=tmp_path).manifest["hash"]
    assert first == second == here


def test_user_code_is_pickled_by_value_and_runs_without_the_project(tmp_path: Path) -> None:
    bundle = package(resolve_target("shouter", PROJECTS / "localmod"), cache_dir=tmp_path)
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(bundle.blobs[bundle.manifest["payload"]])  # type: ignore[arg-type]
    out = _python(
        f"""
        import importlib.util, pickle
        cls = pickle.loads(open({str(payload)!r}, "rb").read())
        assert importlib.util.find_spec("helperlib") is None
        print(cls.__name__, cls.run(None, "hey"))
        """,
        cwd=tmp_path,
    )
    assert out == "Shouter {'text': 'HEY!'}"


def test_pydantic_models_are_rebuilt_on_the_runner(tmp_path: Path) -> None:
    bundle = package(resolve_target("greeter", PROJECTS / "single"), cache_dir=tmp_path)
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(bundle.blobs[bundle.manifest["payload"]])  # type: ignore[arg-type]
    out = _python(
        f"""
        import pickle
        cls = pickle.loads(open({str(payload)!r}, "rb").read())
        model = cls.greet.__annotations__["input"]
        print(model.model_validate({{"name": "fal"}}).name, end=" ")
        try:
            model.model_validate({{"name": 3}})
        except Exception as exc:
            print(type(exc).__name__)
        """,
        cwd=tmp_path,
    )
    assert out == "fal ValidationError"


def test_an_unpicklable_class_attribute_is_explained(tmp_path: Path) -> None:
    (tmp_path / "locked_app.py").write_text(
        "import threading\nimport fal\n\nclass Locked(fal.App):\n    guard = threading.Lock()\n"
    )
    with pytest.raises(PackagingError) as info:
        package(resolve_target("locked_app.py", tmp_path), cache_dir=tmp_path)
    assert str(info.value) == (
        "cannot pickle Locked: TypeError: cannot pickle '_thread.lock' object. Move the "
        "unpicklable object (open file, lock, client, ...) into setup() so it is created on "
        "the runner"
    )


# -- hash cache ------------------------------------------------------------------------


def test_hash_cache_hits_when_unchanged_and_rehashes_when_changed(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"aaaa")
    os.utime(data, (OLD, OLD))
    cold = HashCache(tmp_path / "cache")
    assert cold.sha256(data) == hashlib.sha256(b"aaaa").hexdigest()
    cold.save()
    warm = HashCache(tmp_path / "cache")
    assert warm.sha256(data) == hashlib.sha256(b"aaaa").hexdigest()
    assert (warm.hits, warm.misses) == (1, 0)
    data.write_bytes(b"bbbb")  # same size, new mtime
    assert warm.sha256(data) == hashlib.sha256(b"bbbb").hexdigest()
    assert warm.misses == 1


def test_hash_cache_does_not_trust_a_just_written_file(tmp_path: Path) -> None:
    data = tmp_path / "fresh.bin"
    data.write_bytes(b"new")
    cache = HashCache(tmp_path / "cache")
    cache.sha256(data)
    cache.save()
    assert not (tmp_path / "cache" / "file-hashes.json").exists()


# -- sdists ----------------------------------------------------------------------------


@pytest.mark.slow
def test_dot_extra_requirement_becomes_a_cached_sdist_blob(tmp_path: Path) -> None:
    project = tmp_path / "extra"
    shutil.copytree(PROJECTS / "extra", project)
    cache = tmp_path / "cache"
    bundle = package(resolve_target("extra", project), cache_dir=cache)
    layer = bundle.manifest["requirements"][0]
    parsed = parse_blob_requirement(layer[0])
    assert parsed is not None and layer[1:] == ["six"]
    sha, filename, extras = parsed
    assert (filename, extras) == ("extra_demo-0.1.0.tar.gz", "[fast]")
    sdist = Path(bundle.blobs[sha])  # type: ignore[arg-type]
    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == sha
    stamp = sdist.stat().st_mtime_ns
    again = package(resolve_target("extra", project), cache_dir=cache)
    assert again.manifest["requirements"] == bundle.manifest["requirements"]
    assert sdist.stat().st_mtime_ns == stamp  # reused, not rebuilt
    # The entry point package travels in the sdist, so the payload refers to it by name.
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(bundle.blobs[bundle.manifest["payload"]])  # type: ignore[arg-type]
    code = f"import pickle; print(pickle.loads(open({str(payload)!r}, 'rb').read()).__module__)"
    assert _python(code, cwd=tmp_path, env={"PYTHONPATH": f"{REPO}:{project}/src"}) == (
        "extra_demo.server"
    )


def test_manifest_is_canonical_json_serialisable(tmp_path: Path) -> None:
    bundle = package(resolve_target("files-app", PROJECTS / "withfiles"), cache_dir=tmp_path)
    text = json.dumps(bundle.manifest, sort_keys=True)
    assert json.loads(text)["hash"] == bundle.manifest["hash"]
