"""The whole chain over TLS: `fal deploy` to an https service, then the unmodified fal-client.

fal-client always speaks https and reads ``FAL_RUN_HOST`` at import, so it runs in a child
process with ``SSL_CERT_FILE`` trusting a self-signed certificate made here. The CLI trusts
the same file through httpx's ``SSL_CERT_FILE`` support.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from service_helpers import ServiceProcess
from stack_helpers import self_signed
from test_e2e import cli_env, fal, make_project

pytestmark = pytest.mark.slow

CALLER = """
import json, fal_client
print(json.dumps(fal_client.run("{app}", arguments={{"text": "over tls"}})))
"""


def test_cli_deploy_over_tls_then_fal_client_run(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    cert, key = self_signed(tmp_path)
    svc = service_factory("--tls-cert", str(cert), "--tls-key", str(key))
    assert svc.url.startswith("https://")
    project = make_project(tmp_path / "proj", "tls-echo")
    env = {**cli_env(tmp_path, svc), "SSL_CERT_FILE": str(cert)}
    deployed = fal(["deploy", "tls-echo"], project, env)
    assert deployed.returncode == 0, deployed.stderr
    owner = json.loads(fal(["keys", "list", "--json"], project, env).stdout)["keys"][0]["owner"]
    caller_env = {**env, "FAL_RUN_HOST": svc.url.removeprefix("https://")}
    proc = subprocess.run(
        [sys.executable, "-c", CALLER.format(app=f"{owner}/tls-echo")],
        env=caller_env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"text": "echo: over tls"}
