"""The option table (falcli.options): good and bad values, golden messages, resolution."""

from __future__ import annotations

import pytest

from falcli.errors import OptionError
from falcli.function import ContainerImage
from falcli.options import (
    CPU_MACHINE_SPECS,
    GPU_MACHINE_TYPES,
    MACHINE_TYPES,
    MANIFEST_OPTIONS,
    OPTIONS,
    check_known,
    resolve_options,
    validate_option,
)

WHERE = "class MyApp"

GOOD = [
    ("keep_alive", 0, 0),
    ("keep_alive", 300, 300),
    ("machine_type", "GPU-H100", ["GPU-H100"]),
    ("machine_type", ["GPU-H100", "GPU-H200", "GPU-H100"], ["GPU-H100", "GPU-H200"]),
    ("requirements", ["numpy==2.1.0", " pillow "], [["numpy==2.1.0", "pillow"]]),
    ("requirements", [["torch"], ["."]], [["torch"], ["."]]),
    ("requirements", [], []),
    ("app_auth", "shared", "shared"),
    ("auth", None, None),
    ("concurrency_buffer_perc", 100, 100),
    ("max_multiplexing", 1, 1),
    ("skip_retry_conditions", ["timeout", "connection_error"], ["timeout", "connection_error"]),
    ("regions", ("us-east", "eu-west"), ["us-east", "eu-west"]),
    ("exposed_port", 65535, 65535),
    ("python_version", "3.12", "3.12"),
    ("private_logs", False, False),
    ("local_python_modules", ["pkg.utils"], ["pkg.utils"]),
    ("deployment_strategy", "rolling", "rolling"),
    ("app_name", "image-gen_v2", "image-gen_v2"),
    (
        "health_check",
        {"path": "/health", "timeout_seconds": 2},
        {
            "path": "/health",
            "start_period_seconds": 30,
            "timeout_seconds": 2,
            "failure_threshold": 3,
            "call_regularly": False,
        },
    ),
    ("host_kwargs", {"app_auth": "public", "keep_alive": 7}, {"auth": "public", "keep_alive": 7}),
]

BAD = [
    ("keep_alive", True),
    ("keep_alive", -1),
    ("keep_alive", 1.5),
    ("keep_alive", "10"),
    ("machine_type", "GPU-X1"),
    ("machine_type", []),
    ("requirements", "numpy"),
    ("requirements", [["a"], "b"]),
    ("requirements", [""]),
    ("auth", "secret"),
    ("concurrency_buffer_perc", 101),
    ("max_multiplexing", 0),
    ("max_concurrency", 0),
    ("skip_retry_conditions", ["always"]),
    ("regions", "us-east"),
    ("regions", ["mars"]),
    ("exposed_port", 70000),
    ("health_check", {"timeout_seconds": 2}),
    ("health_check", {"path": "/h", "interval": 2}),
    ("health_check", {"path": "/h", "call_regularly": "yes"}),
    ("python_version", "3"),
    ("python_version", 3.11),
    ("private_logs", 1),
    ("app_name", "has space"),
    ("local_python_modules", ["not-a-module"]),
    ("secrets", [1]),
    ("deployment_strategy", "blue-green"),
    ("host_kwargs", {"keep_alvie": 3}),
    ("host_kwargs", {"host_kwargs": {}}),
    ("image", "python:3.11"),
    ("image", {"dockerfile_str": "FROM x", "build_args": {"A": 1}}),
]


@pytest.mark.parametrize(("name", "value", "expected"), GOOD)
def test_good_values_are_normalised(name: str, value: object, expected: object) -> None:
    assert validate_option(name, value, where=WHERE) == expected


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_values_are_refused_with_where_and_name(name: str, value: object) -> None:
    with pytest.raises(OptionError) as info:
        validate_option(name, value, where=WHERE)
    assert str(info.value).startswith(f"{WHERE}:")
    assert name in str(info.value)


GOLDEN = [
    (
        ("keep_alive", "ten", "class MyApp"),
        "class MyApp: option keep_alive = 'ten' is invalid: expected an integer number of "
        "seconds >= 0, e.g. keep_alive = 300",
    ),
    (
        ("machine_type", "gpu-h100", "class MyApp"),
        "class MyApp: option machine_type = 'gpu-h100' is invalid (did you mean 'GPU-H100'?): "
        "expected a machine type or a list of them, from XS, S, M, L, GPU-A100, GPU-H100, "
        'GPU-H200, GPU-B200, GPU-RTX4090, GPU-RTX5090, GPU-L40, e.g. machine_type = "GPU-H100"',
    ),
    (
        ("private_logs", 1, "[tool.fal.apps.my-app]"),
        "[tool.fal.apps.my-app]: option private_logs = 1 is invalid: expected True or False, "
        "e.g. private_logs = true",
    ),
    (
        ("max_multiplexing", True, "@fal.function on 'f'"),
        "@fal.function on 'f': option max_multiplexing = True is invalid: expected an integer "
        ">= 1, e.g. max_multiplexing = 4",
    ),
]


@pytest.mark.parametrize(("args", "message"), GOLDEN)
def test_golden_messages(args: tuple[str, object, str], message: str) -> None:
    name, value, where = args
    with pytest.raises(OptionError) as info:
        validate_option(name, value, where=where)
    assert str(info.value) == message


def test_unknown_option_suggests_the_closest() -> None:
    with pytest.raises(OptionError) as info:
        check_known(["keep_alvie"], where=WHERE)
    assert (
        str(info.value) == "class MyApp: unknown option 'keep_alvie' — did you mean 'keep_alive'?"
    )


def test_unknown_option_without_a_match_lists_the_known_ones() -> None:
    with pytest.raises(OptionError, match="unknown option 'zzz' — remove it or use one of: .*auth"):
        check_known(["zzz"], where=WHERE)


def test_check_known_accepts_a_custom_table() -> None:
    check_known(["ref", "name"], where="[tool.fal.apps.a]", known=["ref", "name"])
    with pytest.raises(OptionError, match="did you mean 'ref'"):
        check_known(["reff"], where="[tool.fal.apps.a]", known=["ref", "name"])


def test_image_errors_never_echo_registry_credentials() -> None:
    image = {"dockerfile_str": "FROM x", "registries": {"r.io": {"username": "u"}}}
    image["registries"]["r.io"]["token"] = "s3cret-value"  # type: ignore[index]
    with pytest.raises(OptionError) as info:
        validate_option("image", image, where=WHERE)
    assert "s3cret-value" not in str(info.value)
    assert "password" in str(info.value)


def test_machine_tables_are_consistent() -> None:
    assert set(CPU_MACHINE_SPECS) | GPU_MACHINE_TYPES == set(MACHINE_TYPES)
    assert CPU_MACHINE_SPECS["XS"] == (0.5, 512)
    assert {"GPU-A100", "GPU-H100", "GPU-H200", "GPU-B200"} <= GPU_MACHINE_TYPES


def test_every_default_passes_its_own_validation() -> None:
    for name, spec in OPTIONS.items():
        assert validate_option(name, spec.default, where=WHERE) == spec.default


def test_resolve_fills_defaults_for_exactly_the_manifest_keys() -> None:
    resolved = resolve_options({"keep_alive": 300, "requirements": ["numpy"]})
    assert tuple(resolved) == MANIFEST_OPTIONS
    assert resolved["keep_alive"] == 300
    assert resolved["request_timeout"] == 3600
    assert resolved["startup_timeout"] == 600
    assert resolved["machine_type"] == ["S"]
    assert resolved["num_gpus"] == 0
    assert "requirements" not in resolved


def test_resolve_merges_host_kwargs_under_direct_options() -> None:
    resolved = resolve_options(
        {"keep_alive": 1, "host_kwargs": {"keep_alive": 99, "max_multiplexing": 4}}
    )
    assert (resolved["keep_alive"], resolved["max_multiplexing"]) == (1, 4)


def test_resolve_gpu_count_and_image() -> None:
    image = ContainerImage.from_dockerfile_str("FROM python:3.11", build_args={"A": "1"})
    resolved = resolve_options({"machine_type": "GPU-H100", "app_auth": "public", "image": image})
    assert resolved["num_gpus"] == 1
    assert resolved["auth"] == "public"
    assert resolved["image"] == image.to_dict()


def test_resolve_cross_checks() -> None:
    with pytest.raises(OptionError, match="num_gpus = 2 needs a GPU machine_type"):
        resolve_options({"num_gpus": 2, "machine_type": "M"}, where=WHERE)
    with pytest.raises(OptionError, match="min_concurrency = 5 is greater than max_concurrency"):
        resolve_options({"min_concurrency": 5, "max_concurrency": 2}, where=WHERE)
