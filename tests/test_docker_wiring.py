"""The Docker runtime's wiring that needs no engine: settings, the store's image column (and
its migration from a version-1 database), which apps get an image, what a container runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from buildsvc.config import ConfigError, ServerConfig
from buildsvc.records import AppRecord, RevisionRecord
from buildsvc.runtime.base import RunnerSpec, RunnerStartError
from buildsvc.runtime.containers import ContainerRuntime
from buildsvc.runtime.docker import ContainerPlan
from buildsvc.store import SCHEMA_VERSION, SQLiteStore

# The revisions table as schema version 1 created it (before images).
_V1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE revisions (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, app TEXT NOT NULL, bundle_hash TEXT NOT NULL,
    manifest TEXT NOT NULL, env_key TEXT NOT NULL, python TEXT NOT NULL, workdir TEXT NOT NULL,
    payload TEXT NOT NULL, message TEXT NOT NULL, created_at REAL NOT NULL
);
INSERT INTO revisions VALUES ('r1', 'alice', 'old', 'h', '{}', 'env', '/py', '/w', '/p', 'm', 1.0);
"""


def _revision(rid: str, tag: str = "", **options: object) -> RevisionRecord:
    return RevisionRecord(rid, "alice", "app", "h", {"options": options}, "k", "", "/w", "/p",
                          image=tag)


def test_a_version_1_database_gains_the_image_column_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    with sqlite3.connect(path) as db:
        db.executescript(_V1)
    store = SQLiteStore(path)
    try:
        old = store.get_revision("r1")
        assert old is not None and old.image == "" and old.env_key == "env"
        app = AppRecord("alice", "app", "private", False, None)
        store.commit_revision(app, _revision("r2", tag="fal-app:abc"))
        assert store.get_revision("r2").image == "fal-app:abc"  # type: ignore[union-attr]
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("runtime", "podman", "runtime = 'podman': expected one of local, docker"),
    ("registry", "https://r.example", "registry = 'https://r.example': expected host[:port]"),
    ("docker_cpu_base", "", "docker_cpu_base = '': expected an image reference"),
])
def test_bad_docker_settings_name_the_fix(tmp_path: Path, field: str, value: str,
                                          message: str) -> None:
    config = ServerConfig(data_dir=tmp_path, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="e.g. --") as failure:
        config.validate()
    assert str(failure.value).startswith(message)


def _runtime(tmp_path: Path, revisions: dict[str, RevisionRecord], everything: bool = False
             ) -> ContainerRuntime:
    return ContainerRuntime(tmp_path, blob_path=lambda sha: tmp_path / sha,
                            revision_of=revisions.get, everything=everything)


def test_which_apps_run_in_an_image(tmp_path: Path) -> None:
    image = {"dockerfile_str": "FROM x\n"}
    local, docker = _runtime(tmp_path, {}), _runtime(tmp_path, {}, everything=True)
    assert local.wanted({"options": {"image": image}}) and not local.wanted({"options": {}})
    assert docker.wanted({"options": {"image": None}})


def _spec(revision_id: str) -> RunnerSpec:
    return RunnerSpec("r-1", "app", revision_id, Path(), Path(), Path())


def test_plan_reads_image_machine_type_port_and_command_off_the_revision(
        tmp_path: Path) -> None:
    image = {"dockerfile_str": "FROM x\n", "entrypoint": "python -m server", "cmd": ["--v"]}
    revisions = {
        "plain": _revision("plain", "fal-app:1", machine_type=["S", "M"]),
        "direct": _revision("direct", "fal-app:2", exposed_port=8000, image=image),
        "no-image": _revision("no-image"),
    }
    runtime = _runtime(tmp_path, revisions)
    assert runtime.plan_for(_spec("plain")) == ContainerPlan("fal-app:1", "S")
    assert runtime.plan_for(_spec("direct")) == ContainerPlan(
        "fal-app:2", "XS", 8000, ["python", "-m", "server", "--v"])
    with pytest.raises(RunnerStartError, match="has no image; deploy the app again"):
        runtime.plan_for(_spec("no-image"))
