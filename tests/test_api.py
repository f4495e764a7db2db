"""The management API over HTTP against the real service: auth, keys, blobs, validation.

Deploys that build envs and start runners are in tests/test_deploy.py.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
from service_helpers import ServiceProcess, deploy, make_bundle, tar_of, upload

from falcli.packaging.manifest import seal

MISSING = "missing Authorization header: send 'Authorization: Key <key_id>:<secret>'"


def _make_key(svc: ServiceProcess, owner: str, **extra: object) -> str:
    with svc.client() as admin:
        resp = admin.post("/v1/keys", json={"owner": owner, **extra})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["key"])


def test_health_needs_no_key_and_whoami_needs_one(module_service: ServiceProcess) -> None:
    with module_service.client(key="") as anon:
        assert anon.get("/v1/health").json() == {"version": "0.1.0"}
        resp = anon.get("/v1/whoami")
        assert resp.status_code == 401
        assert resp.json() == {"detail": MISSING, "error_type": "unauthorized"}
    with module_service.client() as admin:
        assert admin.get("/v1/whoami").json()["admin"] is True


@pytest.mark.parametrize("path", ["/v1/apps", "/v1/runners", "/v1/keys", "/v1/apps/x/logs"])
def test_wrong_key_is_401(module_service: ServiceProcess, path: str) -> None:
    key_id = module_service.admin_key.split(":")[0]
    with module_service.client(key=f"{key_id}:not-the-secret") as wrong:
        resp = wrong.get(path)
    assert resp.status_code == 401
    assert resp.json()["detail"] == "invalid API key"


def test_keys_are_scoped_to_their_owner(module_service: ServiceProcess) -> None:
    bob = _make_key(module_service, "bob", name="ci")
    with module_service.client(key=bob) as client:
        assert client.get("/v1/whoami").json()["owner"] == "bob"
        assert client.post("/v1/keys", json={"owner": "carol"}).status_code == 403
        assert client.post("/v1/keys", json={"admin": True}).status_code == 403
        own = client.post("/v1/keys", json={"name": "second"}).json()
        assert own["owner"] == "bob"
        listed = client.get("/v1/keys").json()["keys"]
        assert {k["owner"] for k in listed} == {"bob"} and len(listed) >= 2
        assert all("key" not in k and "hash" not in k for k in listed)
        admin_id = module_service.admin_key.split(":")[0]
        assert client.delete(f"/v1/keys/{admin_id}").status_code == 404  # not bob's
        assert client.delete(f"/v1/keys/{own['key_id']}").json()["revoked"] is True
    with module_service.client(key=own["key"]) as revoked:
        assert revoked.get("/v1/whoami").status_code == 401


@pytest.mark.parametrize("owner", ["v1", "Queue", "a b"])
def test_reserved_or_bad_owner_is_refused(module_service: ServiceProcess, owner: str) -> None:
    with module_service.client() as admin:
        resp = admin.post("/v1/keys", json={"owner": owner})
    assert resp.status_code == 400 and resp.json()["error_type"] == "invalid_owner"


def test_blob_upload_roundtrip_and_refusals(module_service: ServiceProcess) -> None:
    data = b"some file content"
    sha = hashlib.sha256(data).hexdigest()
    with module_service.client() as client:
        assert client.post("/v1/blobs/missing", json={"hashes": [sha]}).json() == {"missing": [sha]}
        assert upload(client, {sha: data}) == [sha]
        assert client.post("/v1/blobs/missing", json={"hashes": [sha]}).json()["missing"] == []
        wrong = client.post("/v1/blobs", content=tar_of({"0" * 64: b"not zeros"}))
        assert wrong.status_code == 400 and wrong.json()["error_type"] == "invalid_upload"
        assert "content hashes to" in wrong.json()["detail"]
        bad = client.post("/v1/blobs/missing", json={"hashes": ["../etc"]})
        assert bad.status_code == 400 and bad.json()["error_type"] == "bad_hash"


def _refused(svc: ServiceProcess, manifest: dict, blobs: dict, **request: object) -> dict:
    from service_helpers import Bundle

    with svc.client() as client:
        events = list(deploy(client, Bundle(manifest, blobs), **request))
    assert len(events) == 1 and events[0]["event"] == "error", events
    return events[0]


def test_deploy_validation_refuses_before_building(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_dir=tmp_path)
    tampered = copy.deepcopy(bundle.manifest)
    tampered["options"]["keep_alive"] = 1
    err = _refused(module_service, tampered, bundle.blobs)
    assert (err["status"], err["error_type"]) == (400, "invalid_manifest")
    assert "does not match its content" in err["detail"]

    bad_name = _refused(module_service, bundle.manifest, bundle.blobs, app_name="Bad_Name")
    assert bad_name["error_type"] == "invalid_app_name"

    no_blob = seal({**bundle.manifest, "files": {"a.py": "f" * 64}})
    missing = _refused(module_service, dict(no_blob), bundle.blobs)
    assert missing["error_type"] == "missing_blobs" and "f" * 64 in missing["detail"]

    escape = seal({**bundle.manifest, "files": {"../evil.py": bundle.manifest["payload"]}})
    assert "'..'" in _refused(module_service, dict(escape), bundle.blobs)["detail"]

    sdist = f"/blob:{bundle.manifest['payload']}:../../evil.tar.gz"
    bad_req = seal({**bundle.manifest, "requirements": [[sdist]]})
    assert "sdist file name" in _refused(module_service, dict(bad_req), bundle.blobs)["detail"]

    odd_owner = _refused(module_service, bundle.manifest, bundle.blobs, owner=5)
    assert (odd_owner["status"], odd_owner["error_type"]) == (400, "invalid_owner")
    with module_service.client() as client:
        assert client.get("/v1/apps/echo").status_code == 404  # nothing was created


def test_gpu_app_is_refused_on_a_machine_without_gpus(
    module_service: ServiceProcess, tmp_path: Path
) -> None:
    # No GPU here: this checks the refusal, the one GPU behaviour that needs none.
    bundle = make_bundle(tmp_dir=tmp_path, options={"machine_type": "GPU-H100"})
    err = _refused(module_service, bundle.manifest, bundle.blobs)
    assert (err["status"], err["error_type"]) == (400, "invalid_machine_type")
    assert "GPU-H100" in err["detail"] and "--emulate-gpus" in err["detail"]
    with module_service.client() as client:
        assert client.get("/v1/apps/echo").status_code == 404


def test_unknown_app_is_404_with_the_contract_shape(module_service: ServiceProcess) -> None:
    with module_service.client() as client:
        resp = client.get("/v1/apps/nope")
        assert resp.status_code == 404
        assert resp.json()["error_type"] == "not_found" and "nope" in resp.json()["detail"]
        assert client.get("/v1/apps/nope/revisions").status_code == 404
        assert client.delete("/v1/apps/nope").status_code == 404


def test_non_admin_cannot_act_for_another_owner(module_service: ServiceProcess) -> None:
    dave = _make_key(module_service, "dave")
    with module_service.client(key=dave) as client:
        resp = client.get("/v1/apps", params={"owner": "root"})
    assert resp.status_code == 403 and "admin" in resp.json()["detail"]
