"""ServerConfig validation and the entry point's flags: TLS, bad settings, the ready file."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from service_helpers import ServiceProcess

from buildsvc.config import ConfigError, ServerConfig


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="--tls-cert was given without --tls-key"):
        ServerConfig(tmp_path / "d", tls_cert=cert).validate()
    with pytest.raises(ConfigError, match="--tls-key .*not readable"):
        ServerConfig(tmp_path / "d", tls_cert=cert, tls_key=tmp_path / "nope.pem").validate()


def test_data_dir_must_be_creatable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot be created"):
        ServerConfig(blocker / "data").validate()


@pytest.mark.parametrize(("field", "value"), [("port", 70000), ("emulate_gpus", -1)])
def test_out_of_range_numbers_are_refused(tmp_path: Path, field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"{field} = {value}"):
        ServerConfig(tmp_path / "d", **{field: value}).validate()  # type: ignore[arg-type]


def test_urls(tmp_path: Path) -> None:
    cfg = ServerConfig(tmp_path, host="0.0.0.0", port=8443, tls_cert=Path("c"), tls_key=Path("k"))
    assert cfg.listen_url() == "https://127.0.0.1:8443" == cfg.base_url()
    cfg.public_url = "https://fal.example.com/"
    assert cfg.base_url() == "https://fal.example.com"


def test_entry_point_reports_bad_flags(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "buildsvc", "--data-dir", str(tmp_path), "--tls-cert", "x"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: TLS needs both a certificate and a key" in done.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_serves_https_with_tls_flags(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    svc = service_factory("--tls-cert", str(cert), "--tls-key", str(key))
    assert svc.url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
        assert client.get(f"{svc.url}/v1/health").json() == {"version": "0.1.0"}
