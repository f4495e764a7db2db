"""The Dockerfiles the image builder generates, as pure text (no engine, no files).

Two shapes, both ending in the same *agent layer* so containers run the same runner agent
as local processes (contract 3 of docs/architecture.md):

- requirement apps: ``FROM <base>``, uv, one ``RUN uv pip install`` per requirements layer
  (each its own cached Docker layer), then the agent's pinned dependencies and our packages
  (after the user's, so upgrading the platform never reinstalls torch), then the payload and
  the app's files last (a code-only change rebuilds only those layers);
- Dockerfile apps: the user's Dockerfile verbatim, then the agent layer, installed into a
  venv that sees the image's own site-packages (what the user's Dockerfile installed).

The build context layout both rely on: our inputs under ``CONTEXT_DIR`` (``.fal-build/``),
and, for requirement apps, the app's files under ``app/``; a Dockerfile app's context root
is its bundle files, so its COPY/ADD lines see exactly what was uploaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "AGENT_ROOT",
    "APP_DIR",
    "CONTEXT_DIR",
    "PAYLOAD_PATH",
    "RUNNER_UID",
    "VENV_PYTHON",
    "ReqLayer",
    "requirements_dockerfile",
    "user_dockerfile",
    "uv_image_dockerfile",
]

CONTEXT_DIR = ".fal-build"  # our part of a build context
AGENT_ROOT = "/opt/fal"
VENV = f"{AGENT_ROOT}/venv"
VENV_PYTHON = f"{VENV}/bin/python"
PAYLOAD_PATH = f"{AGENT_ROOT}/payload"
APP_DIR = "/app"
# Containers run as this uid (numeric: it need not exist in the image's /etc/passwd).
RUNNER_UID = 10001
_UV = f"{AGENT_ROOT}/uv"
_UV_INSTALL = f"{_UV} pip install --python {VENV_PYTHON} --no-config --compile-bytecode"
# Why each variable: the CA bundle because this network intercepts TLS; no uv cache inside
# layers (it would only grow the image); HOME somewhere a non-root uid can write.
_ENV = {
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "SSL_CERT_FILE": f"{AGENT_ROOT}/ca.crt",
    "UV_NO_CACHE": "1",
    "UV_PYTHON_DOWNLOADS": "never",
    "HOME": "/tmp",
    "VIRTUAL_ENV": VENV,
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
}


@dataclass(frozen=True)
class ReqLayer:
    """One requirements layer: its file in the context and the sdists it refers to."""

    requirements_file: str  # context-relative, e.g. .fal-build/reqs/layer-0.txt
    sdists: Sequence[str] = field(default_factory=tuple)  # context-relative files


def _env_lines() -> list[str]:
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in _ENV.items())
    return ["LABEL fal.managed=1", f"ENV {pairs}"]


def _copy(sources: Sequence[str], dest: str) -> str:
    # The JSON form: context paths may contain spaces.
    return f"COPY {json.dumps([*sources, dest])}"


def _uv_lines(uv_image: str, python: str, system_site: bool) -> list[str]:
    flags = " --system-site-packages" if system_site else ""
    return [
        # uv (38 MB) comes from a tools image, not the context: contexts are re-sent per build.
        f"COPY --from={uv_image} /uv {_UV}",
        _copy([f"{CONTEXT_DIR}/ca.crt"], f"{AGENT_ROOT}/"),
        f"RUN {_UV} venv --python {python} --no-config{flags} {VENV}",
    ]


def _layer_lines(index: int, layer: ReqLayer) -> list[str]:
    dest = f"{AGENT_ROOT}/reqs/{index}/"
    return [
        _copy([layer.requirements_file, *layer.sdists], dest),
        f"RUN {_UV_INSTALL} -r {dest}requirements.txt",
    ]


def _agent_lines() -> list[str]:
    """Our dependencies (pinned) and packages; a .pth makes them importable from the venv."""
    pth = ("import site; open(site.getsitepackages()[0] + '/_fal_agent.pth', 'w')"
           f".write('{AGENT_ROOT}/agentlib\\n')")
    return [
        _copy([f"{CONTEXT_DIR}/agent-requirements.txt"], f"{AGENT_ROOT}/"),
        f"RUN {_UV_INSTALL} -r {AGENT_ROOT}/agent-requirements.txt"
        f' && {VENV_PYTHON} -c "{pth}"',
        _copy([f"{CONTEXT_DIR}/agentlib"], f"{AGENT_ROOT}/agentlib"),
        # Runners cannot write .pyc files here (not their uid): compile once, now.
        f"RUN {VENV_PYTHON} -m compileall -q {AGENT_ROOT}/agentlib",
    ]


def _runtime_lines(workdir: str | None) -> list[str]:
    # Before the code layers, so a code-only change re-runs nothing but two COPYs. No
    # ENTRYPOINT: the runtime backend names the command (a user's own one is kept).
    return [*([f"WORKDIR {workdir}"] if workdir else []), f"USER {RUNNER_UID}:{RUNNER_UID}"]


def requirements_dockerfile(base: str, uv_image: str, python: str,
                            layers: Sequence[ReqLayer]) -> str:
    """The Dockerfile of a requirement-based app (context layout: see the module docstring)."""
    lines = [f"FROM {base}", *_env_lines(), *_uv_lines(uv_image, python, system_site=False)]
    for index, layer in enumerate(layers):
        lines += _layer_lines(index, layer)
    lines += [*_agent_lines(), *_runtime_lines(APP_DIR),
              _copy([f"{CONTEXT_DIR}/payload"], PAYLOAD_PATH), _copy(["app"], APP_DIR)]
    return "\n".join(lines) + "\n"


def uv_image_dockerfile() -> str:
    """A tools image holding only the uv binary (context: the binary, named ``uv``)."""
    return "FROM scratch\nCOPY uv /uv\n"


def user_dockerfile(text: str, uv_image: str, *, has_payload: bool) -> str:
    """The user's Dockerfile with our agent layer appended.

    ``python3`` of the user's image runs the agent, in a venv that also sees the packages the
    user's Dockerfile installed; its minor version must be the one that pickled the app.
    """
    lines = [
        text.rstrip("\n"),
        "",
        "# --- added by the fal build service: the runner agent ---",
        "USER root",
        *_env_lines(),
        *_uv_lines(uv_image, "python3", system_site=True),
        *_agent_lines(),
        # The user's WORKDIR is kept: their COPY lines put the code where they meant it.
        *_runtime_lines(None),
    ]
    if has_payload:
        lines.append(_copy([f"{CONTEXT_DIR}/payload"], PAYLOAD_PATH))
    return "\n".join(lines) + "\n"
