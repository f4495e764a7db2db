"""Settings: the precedence flag > env > config file > default, and the config file itself."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from falcli import settings
from falcli.errors import ConfigError


def _write(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    settings.config_path(home).write_text(text)


def test_default_is_embedded_server_under_home(tmp_path: Path) -> None:
    cfg = settings.load(env={"FALCLI_HOME": str(tmp_path)})
    assert cfg.home == tmp_path
    assert cfg.embedded and cfg.server_url is None and cfg.server_source == "embedded"
    assert cfg.key is None
    assert cfg.data_dir == tmp_path / "server"


def test_home_defaults_to_dot_falcli() -> None:
    assert settings.home_dir({}) == Path.home() / ".falcli"


def test_precedence_flag_over_env_over_config(tmp_path: Path) -> None:
    _write(tmp_path, 'server_url = "http://config:1"\nkey = "cid:csecret"\n')
    env = {"FALCLI_HOME": str(tmp_path)}
    assert settings.load(env=env).server_url == "http://config:1"
    assert settings.load(env=env).server_source == "config"
    env["FAL_SERVER_URL"] = "http://env:2/"
    assert settings.load(env=env).server_url == "http://env:2"  # trailing slash dropped
    flagged = settings.load(server="http://flag:3", env=env)
    assert (flagged.server_url, flagged.server_source) == ("http://flag:3", "flag")


def test_key_env_beats_config_and_both_forms_work(tmp_path: Path) -> None:
    _write(tmp_path, 'key = "cid:csecret"\n')
    env = {"FALCLI_HOME": str(tmp_path)}
    assert settings.load(env=env).key == "cid:csecret"
    assert settings.load(env={**env, "FAL_KEY_ID": "a", "FAL_KEY_SECRET": "b"}).key == "a:b"
    assert settings.load(env={**env, "FAL_KEY": "x:y", "FAL_KEY_ID": "a"}).key == "x:y"


def test_half_a_key_pair_is_an_error_naming_the_missing_half() -> None:
    with pytest.raises(ConfigError, match="FAL_KEY_SECRET"):
        settings.key_from_env({"FAL_KEY_ID": "abc"})


def test_bad_url_names_its_origin_and_an_example(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'ftp://x' \(from FAL_SERVER_URL\).*http://127"):
        settings.load(env={"FALCLI_HOME": str(tmp_path), "FAL_SERVER_URL": "ftp://x"})


def test_broken_config_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    _write(tmp_path, "server_url = \n")
    with pytest.raises(ConfigError, match=r"config\.toml: not valid TOML.*delete it"):
        settings.load(env={"FALCLI_HOME": str(tmp_path)})


def test_wrong_type_in_config_is_rejected(tmp_path: Path) -> None:
    _write(tmp_path, "key = 12\n")
    with pytest.raises(ConfigError, match=r"key = 12: expected a non-empty string"):
        settings.load(env={"FALCLI_HOME": str(tmp_path)})


def test_embedded_record_round_trip_keeps_user_keys_and_mode_0600(tmp_path: Path) -> None:
    _write(tmp_path, 'key = "cid:csecret"\n')
    settings.record_embedded(tmp_path, settings.EmbeddedRecord(url="http://127.0.0.1:5", pid=42))
    config = settings.read_config(tmp_path)
    assert settings.embedded_record(config) == settings.EmbeddedRecord("http://127.0.0.1:5", 42)
    assert config["key"] == "cid:csecret"
    mode = stat.S_IMODE(settings.config_path(tmp_path).stat().st_mode)
    assert mode == 0o600
    settings.forget_embedded(tmp_path)
    assert settings.embedded_record(settings.read_config(tmp_path)) is None
    assert settings.read_config(tmp_path)["key"] == "cid:csecret"
