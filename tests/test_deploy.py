"""Deploys end to end: real service, real uv builds, real runner processes, over HTTP."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from service_helpers import ServiceProcess, deploy, make_bundle, upload, wait_until

pytestmark = pytest.mark.slow


def _deploy(svc: ServiceProcess, tmp: Path, name: str, **kw: Any) -> list[dict[str, Any]]:
    files = kw.pop("files", None)
    bundle = make_bundle(tmp_dir=tmp, app_name=name, files=files)
    with svc.client() as client:
        return list(deploy(client, bundle, **kw))


def _key_for(svc: ServiceProcess, owner: str) -> str:
    with svc.client() as admin:
        return str(admin.post("/v1/keys", json={"owner": owner}).json()["key"])


def test_deploy_streams_build_log_then_done(module_service: ServiceProcess, tmp_path: Path) -> None:
    events = _deploy(module_service, tmp_path, "first", message="v1")
    kinds = [e["event"] for e in events]
    assert events[0] == {"event": "stage", "stage": "build"}
    assert kinds.count("done") == 1 and kinds[-1] == "done", events[-1]
    logs = [e for e in events if e["event"] == "log"]
    assert logs and all(e["source"] == "build" for e in logs)
    assert kinds.index("log") < kinds.index("done")
    done = events[-1]
    base = module_service.url
    assert done["urls"] == {"sync": f"{base}/root/first", "queue": f"{base}/queue/root/first"}
    assert done["revision"]["message"] == "v1"
    with module_service.client() as client:
        app = client.get("/v1/apps/first").json()
        assert app["revision"] == done["revision"]["id"] and app["auth"] == "private"
        log_text = client.get("/v1/apps/first/logs").text
    assert any(json.loads(line)["source"] == "build" for line in log_text.splitlines())


def test_unchanged_redeploy_is_a_fast_second_revision(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_dir=tmp_path, app_name="twice")
    with module_service.client() as client:
        first = list(deploy(client, bundle))[-1]
        upload(client, bundle.blobs)
        started = time.perf_counter()
        second = list(deploy(client, bundle))[-1]
        elapsed = time.perf_counter() - started
        revisions = client.get("/v1/apps/twice/revisions").json()["revisions"]
    assert first["event"] == second["event"] == "done"
    assert [r["id"] for r in revisions] == [first["revision"]["id"], second["revision"]["id"]]
    assert revisions[0]["env_key"] == revisions[1]["env_key"]
    assert elapsed < 0.5, f"an unchanged redeploy took {elapsed:.3f}s"


def test_unchanged_redeploy_keeps_warm_runners_and_a_change_replaces_them(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    import httpx

    def runners(client: httpx.Client) -> list[dict[str, Any]]:
        found = client.get("/v1/runners", params={"app": "warm"}).json()["runners"]
        return [r for r in found if r["state"] not in ("TERMINATED", "FAILED")]

    same = make_bundle(tmp_dir=tmp_path, app_name="warm", options={"keep_alive": 300})
    changed = make_bundle(tmp_dir=tmp_path, app_name="warm", options={"keep_alive": 301})
    with module_service.client() as client:
        list(deploy(client, same, auth="public", strategy="recreate"))
        url = f"{module_service.url}/root/warm"
        assert httpx.post(url, json={"text": "a"}, timeout=60).status_code == 200
        (before,) = runners(client)
        second = list(deploy(client, same, auth="public", strategy="recreate"))[-1]
        (after,) = runners(client)
        assert after["pid"] == before["pid"], "an unchanged redeploy keeps the warm runner"
        assert after["revision"] == second["revision"]["id"]
        assert httpx.post(url, json={"text": "b"}, timeout=60).json() == {"text": "echo: b"}
        upload(client, changed.blobs)
        list(deploy(client, changed, auth="public", strategy="recreate"))
        wait_until(lambda: not _alive(before["pid"]), 20, "the old runner to stop")
        assert httpx.post(url, json={"text": "c"}, timeout=60).status_code == 200
        assert [r["pid"] for r in runners(client)] != [before["pid"]]


def test_unresolvable_requirement_fails_the_build_and_creates_nothing(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    bad = "fal-selfhost-no-such-package-xyz==0.0.1"
    events = _deploy(module_service, tmp_path, "broken", requirements=None)
    assert events[-1]["event"] == "done"  # the app exists with one good revision
    bundle = make_bundle(tmp_dir=tmp_path, app_name="broken", requirements=[[bad]])
    with module_service.client() as client:
        failed = list(deploy(client, bundle))
        revisions = client.get("/v1/apps/broken/revisions").json()["revisions"]
        fresh = make_bundle(tmp_dir=tmp_path, app_name="never", requirements=[[bad]])
        assert list(deploy(client, fresh))[-1]["error_type"] == "build_failed"
        assert client.get("/v1/apps/never").status_code == 404
    assert failed[-1]["event"] == "error" and failed[-1]["error_type"] == "build_failed"
    assert "fal-selfhost-no-such-package-xyz" in failed[-1]["detail"]
    assert len(revisions) == 1


def test_ephemeral_run_starts_a_runner_and_delete_stops_it(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    events = _deploy(module_service, tmp_path, "runme", ephemeral=True, auth="public")
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["build", "start", "ready"] and events[-1]["event"] == "done"
    assert events[-1]["app"]["ephemeral"] is True and events[-1]["app"]["runners"] == 1
    with module_service.client(key="") as anon:  # public: no key needed
        resp = anon.post("/root/runme", json={"text": "hi"})
    assert resp.status_code == 200 and resp.json() == {"text": "echo: hi"}
    with module_service.client() as client:
        runners = client.get("/v1/runners", params={"app": "runme"}).json()["runners"]
        assert len(runners) == 1
        assert client.delete("/v1/apps/runme").status_code == 200
        assert client.get("/v1/runners", params={"app": "runme"}).json()["runners"] == []
    wait_until(lambda: not _alive(runners[0]["pid"]), 10, "the runner process to exit")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_setup_failure_reports_the_traceback(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    events = _deploy(
        module_service, tmp_path, "crashy", ephemeral=True, files={"crash-in-setup": b""}
    )
    assert [e.get("stage") for e in events if e["event"] == "stage"] == ["build", "start"]
    assert events[-1]["event"] == "error" and events[-1]["error_type"] == "setup_failed"
    assert "setup exploded on purpose" in events[-1]["detail"]
    assert "Traceback" in events[-1]["detail"]


def test_run_refuses_to_replace_a_deployed_app(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    assert _deploy(module_service, tmp_path, "kept")[-1]["event"] == "done"
    refused = _deploy(module_service, tmp_path, "kept", ephemeral=True)
    assert refused == [refused[0]] and refused[0]["status"] == 409
    assert refused[0]["error_type"] == "app_conflict"


def test_gateway_enforces_app_auth(module_service: ServiceProcess, tmp_path: Path) -> None:
    assert _deploy(module_service, tmp_path, "secret")[-1]["event"] == "done"
    bob = _key_for(module_service, "bob")
    key_id = module_service.admin_key.split(":")[0]
    with module_service.client(key="") as anon:
        missing = anon.post("/root/secret", json={"text": "x"})
    with module_service.client(key=f"{key_id}:wrong") as wrong:
        invalid = wrong.post("/root/secret", json={"text": "x"})
    with module_service.client(key=bob) as other:
        forbidden = other.post("/root/secret", json={"text": "x"})
    with module_service.client() as owner:
        ok = owner.post("/root/secret", json={"text": "x"})
    assert missing.status_code == 401 and "missing Authorization" in missing.json()["detail"]
    assert invalid.status_code == 401 and invalid.json()["detail"] == "invalid API key"
    assert forbidden.status_code == 403 and "root/secret" in forbidden.json()["detail"]
    assert ok.status_code == 200 and ok.json() == {"text": "echo: x"}


def test_logs_follow_streams_live_records(module_service: ServiceProcess, tmp_path: Path) -> None:
    assert _deploy(module_service, tmp_path, "followed")[-1]["event"] == "done"
    seen: list[dict[str, Any]] = []
    with module_service.client() as client:
        with client.stream("GET", "/v1/apps/followed/logs", params={"follow": "1"}) as resp:
            assert resp.status_code == 200  # headers are out: the follower is subscribed
            # The env may be cached (no build lines), so a cold start makes the live records.
            caller = threading.Thread(
                target=client.post, args=("/root/followed",), kwargs={"json": {"text": "x"}}
            )
            caller.start()
            for line in resp.iter_lines():
                seen.append(json.loads(line))
                if seen[-1]["runner_id"]:
                    break
            caller.join()
        assert client.get("/v1/health").status_code == 200  # disconnect left it healthy
    assert seen[-1]["source"] != "build" and seen[-1]["runner_id"]
    assert set(seen[-1]) == {"timestamp", "level", "source", "runner_id", "request_id", "message"}


def test_restart_keeps_apps_revisions_keys_and_drops_ephemeral(
    service: ServiceProcess, tmp_path: Path
) -> None:
    kept = _deploy(service, tmp_path, "durable")[-1]
    assert _deploy(service, tmp_path, "scratch", ephemeral=True)[-1]["event"] == "done"
    bob = _key_for(service, "bob")
    admin_key = service.admin_key
    service.restart()
    assert service.admin_key == admin_key
    with service.client() as client:
        assert client.get("/v1/apps/durable").json()["revision"] == kept["revision"]["id"]
        assert len(client.get("/v1/apps/durable/revisions").json()["revisions"]) == 1
        assert client.get("/v1/apps/scratch").status_code == 404
        assert client.post("/root/durable", json={"text": "again"}).json() == {
            "text": "echo: again"
        }
    with service.client(key=bob) as client:
        assert client.get("/v1/whoami").json()["owner"] == "bob"


def test_queue_paths_reach_the_queue(module_service: ServiceProcess, tmp_path: Path) -> None:
    assert _deploy(module_service, tmp_path, "queued")[-1]["event"] == "done"
    with module_service.client() as client:
        submitted = client.post("/queue/root/queued", json={"text": "q"})
        assert submitted.status_code in (200, 202), submitted.text
        body = submitted.json()
        assert {"request_id", "response_url", "status_url", "cancel_url"} <= set(body)
        wait_until(
            lambda: client.get(body["status_url"]).json()["status"] == "COMPLETED",
            60, "the queued request to complete",
        )  # fmt: skip
        assert client.get(body["response_url"]).json() == {"text": "echo: q"}
