"""The table of app options: names, expected forms, defaults, validation, "did you mean".

One table serves the three places an option can be written: a ``fal.App`` class attribute or
class keyword, an ``@fal.function(...)`` argument, and a field of ``[tool.fal.apps]`` in
pyproject.toml. Validation is strict (``True`` is not a valid ``keep_alive``) and every error
names the option, the bad value, the expected form and an example.

Machine types (``MACHINE_TYPES``): the CPU sizes XS, S, M, L and the GPU types A100, H100,
H200, B200 of the fal.App class reference, plus RTX4090, RTX5090 and L40 from the serverless
FAQ. ``resolve_options`` returns the ``options`` dict of the bundle manifest (contract 1 of
docs/architecture.md): the runtime options only. ``requirements``, ``local_python_modules``,
``app_name`` and ``python_version`` are validated here too but travel elsewhere in the
manifest, so packaging reads them from the explicit options itself.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from falcli.errors import OptionError

__all__ = [
    "ALIASES",
    "CPU_MACHINE_SPECS",
    "GPU_MACHINE_TYPES",
    "MACHINE_TYPES",
    "MANIFEST_OPTIONS",
    "OPTIONS",
    "OptionSpec",
    "check_known",
    "resolve_options",
    "suggest",
    "validate_option",
]

# name -> (CPU cores, memory in MB), from the fal.App class reference.
CPU_MACHINE_SPECS: dict[str, tuple[float, int]] = {
    "XS": (0.5, 512),
    "S": (1.0, 1024),
    "M": (2.0, 2048),
    "L": (4.0, 15 * 1024),
}
GPU_MACHINE_TYPES: frozenset[str] = frozenset(
    {"GPU-A100", "GPU-H100", "GPU-H200", "GPU-B200", "GPU-RTX4090", "GPU-RTX5090", "GPU-L40"}
)
MACHINE_TYPES: tuple[str, ...] = (
    *CPU_MACHINE_SPECS,
    "GPU-A100",
    "GPU-H100",
    "GPU-H200",
    "GPU-B200",
    "GPU-RTX4090",
    "GPU-RTX5090",
    "GPU-L40",
)
_REGIONS = ("us-west", "us-central", "us-east", "eu-north", "eu-west")
_RETRY_CONDITIONS = ("timeout", "server_error", "connection_error")
_AUTH_MODES = ("private", "public", "shared")
_STRATEGIES = ("rolling", "recreate")
_HEALTH_CHECK_KEYS = (
    "path",
    "start_period_seconds",
    "timeout_seconds",
    "failure_threshold",
    "call_regularly",
)
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PYTHON_VERSION = re.compile(r"3\.\d{1,2}")

# Old or alternative spellings accepted everywhere, normalised to the canonical name.
ALIASES: dict[str, str] = {"app_auth": "auth"}


class _Invalid(Exception):
    """Raised by a checker; ``hint`` is appended to the standard message."""

    def __init__(self, hint: str = "") -> None:
        super().__init__(hint)
        self.hint = hint


@dataclass(frozen=True)
class OptionSpec:
    """One option: ``expected`` and ``example`` make up the fix half of an error message."""

    name: str
    expected: str
    default: Any
    example: str
    check: Callable[[object], object]


# -- checkers: return the normalised value or raise _Invalid ------------------------------


def _int(minimum: int, maximum: int | None = None) -> Callable[[object], object]:
    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid()
        if value < minimum or (maximum is not None and value > maximum):
            raise _Invalid()
        return value

    return check


def _optional(inner: Callable[[object], object]) -> Callable[[object], object]:
    return lambda value: None if value is None else inner(value)


def _bool(value: object) -> object:
    if not isinstance(value, bool):
        raise _Invalid()
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object], object]:
    def check(value: object) -> object:
        if value not in choices:
            raise _Invalid(_did_you_mean(value, choices))
        return value

    return check


def _str_list(item: Callable[[object], object] | None = None) -> Callable[[object], object]:
    """A list (or tuple) of strings, each optionally checked; duplicates dropped in order."""

    def check(value: object) -> object:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _Invalid()
        out: list[str] = []
        for entry in value:
            if not isinstance(entry, str) or not entry:
                raise _Invalid()
            checked = item(entry) if item else entry
            if checked not in out:
                out.append(str(checked))
        return out

    return check


def _regex(pattern: re.Pattern[str]) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _Invalid()
        return value

    return check


def _did_you_mean(value: object, choices: Iterable[str]) -> str:
    if not isinstance(value, str):
        return ""
    match = suggest(value, choices, cutoff=0.6) or suggest(value.upper(), choices, cutoff=0.6)
    return f" (did you mean {match!r}?)" if match else ""


def _requirements(value: object) -> object:
    """A flat list is one layer; a list of lists is several layers (normalised to layers)."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _Invalid()
    if all(isinstance(v, str) for v in value):
        return [_requirement_layer(value)] if value else []
    if all(isinstance(v, list | tuple) and not isinstance(v, str) for v in value):
        return [_requirement_layer(layer) for layer in value]
    raise _Invalid(" (do not mix strings and lists: use all strings or all lists)")


def _requirement_layer(layer: Iterable[object]) -> list[str]:
    out: list[str] = []
    for req in layer:
        if not isinstance(req, str) or not req.strip():
            raise _Invalid()
        out.append(req.strip())
    return out


def _machine_type(value: object) -> object:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise _Invalid()
    out: list[str] = []
    for item in items:
        if item not in MACHINE_TYPES:
            raise _Invalid(_did_you_mean(item, MACHINE_TYPES))
        if item not in out:
            out.append(str(item))
    return out


def _health_check(value: object) -> object:
    if not isinstance(value, Mapping):
        raise _Invalid()
    unknown = [k for k in value if k not in _HEALTH_CHECK_KEYS]
    if unknown:
        hint = _did_you_mean(unknown[0], _HEALTH_CHECK_KEYS)
        raise _Invalid(f" (unknown key {unknown[0]!r}{hint})")
    path = value.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise _Invalid(" (path is required and must start with '/')")
    checks = {
        "start_period_seconds": (_int(0), 30),
        "timeout_seconds": (_int(1), 5),
        "failure_threshold": (_int(1), 3),
        "call_regularly": (_bool, False),
    }
    out: dict[str, object] = {"path": path}
    for key, (check, default) in checks.items():
        out[key] = check(value[key]) if key in value else default
    return out


def _image(value: object) -> object:
    # Imported here: falcli.function imports this module.
    from falcli.function import ContainerImage

    if isinstance(value, ContainerImage):
        return value.to_dict()
    if isinstance(value, Mapping):
        try:
            return ContainerImage.from_dict(value).to_dict()
        except OptionError as exc:
            raise _Invalid(f" ({exc})") from None
    raise _Invalid()


def _host_kwargs(value: object) -> object:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _Invalid()
    return dict(value)  # entries are validated one by one by the caller, with their names


# fmt: off
def _option_table() -> dict[str, OptionSpec]:
    specs = [
        OptionSpec("requirements", "a list of pip requirement strings, or a list of such lists "
                   "(layers)", [], '["numpy==2.1.0", "pillow"]', _requirements),
        OptionSpec("local_python_modules", "a list of importable module names", [],
                   '["my_utils"]', _str_list(_regex(_MODULE_NAME))),
        OptionSpec("machine_type", "a machine type or a list of them, from "
                   + ", ".join(MACHINE_TYPES), ["S"], '"GPU-H100"', _machine_type),
        OptionSpec("num_gpus", "an integer >= 1 (with a GPU machine_type)", None, "1",
                   _optional(_int(1))),
        OptionSpec("request_timeout", "an integer number of seconds >= 1", 3600, "300",
                   _int(1)),
        OptionSpec("startup_timeout", "an integer number of seconds >= 1", 600, "900", _int(1)),
        OptionSpec("auth", "one of 'private', 'public', 'shared' or None", None, '"private"',
                   _optional(_choice(_AUTH_MODES))),
        OptionSpec("app_name", "a name of letters, digits, '-' and '_' (at most 64)", None,
                   '"image-generator"', _optional(_regex(_APP_NAME))),
        OptionSpec("keep_alive", "an integer number of seconds >= 0", 10, "300", _int(0)),
        OptionSpec("min_concurrency", "an integer >= 0", 0, "1", _int(0)),
        OptionSpec("max_concurrency", "an integer >= 1", 10, "10", _int(1)),
        OptionSpec("concurrency_buffer", "an integer >= 0", 0, "1", _int(0)),
        OptionSpec("concurrency_buffer_perc", "an integer percentage from 0 to 100", 0, "20",
                   _int(0, 100)),
        OptionSpec("max_multiplexing", "an integer >= 1", 1, "4", _int(1)),
        OptionSpec("scaling_delay", "an integer number of seconds >= 0", 0, "5", _int(0)),
        OptionSpec("termination_grace_period_seconds", "an integer number of seconds >= 0", 5,
                   "30", _int(0)),
        OptionSpec("skip_retry_conditions", "a list drawn from " + ", ".join(_RETRY_CONDITIONS),
                   [], '["timeout"]', _str_list(_choice(_RETRY_CONDITIONS))),
        OptionSpec("health_check", "a table with a required 'path' and optional "
                   + ", ".join(_HEALTH_CHECK_KEYS[1:]), None, '{"path": "/health"}',
                   _optional(_health_check)),
        OptionSpec("exposed_port", "an integer port from 0 to 65535", None, "8080",
                   _optional(_int(0, 65535))),
        OptionSpec("regions", "a list drawn from " + ", ".join(_REGIONS), [], '["us-east"]',
                   _str_list(_choice(_REGIONS))),
        OptionSpec("secrets", "a list of secret names", [], '["HF_TOKEN"]', _str_list()),
        OptionSpec("data_mounts", "a list of paths", [], '["/data"]', _str_list()),
        OptionSpec("private_logs", "True or False", False, "True", _bool),
        OptionSpec("python_version", "a version string '3.X'", None, '"3.11"',
                   _optional(_regex(_PYTHON_VERSION))),
        OptionSpec("image", "a fal.ContainerImage or a table with dockerfile_str or "
                   "dockerfile", None, 'fal.ContainerImage.from_dockerfile("Dockerfile")',
                   _optional(_image)),
        OptionSpec("host_kwargs", "a dict of option names to values", {},
                   '{"keep_alive": 300}', _host_kwargs),
        OptionSpec("deployment_strategy", "one of 'rolling', 'recreate'", "recreate",
                   '"rolling"', _choice(_STRATEGIES)),
        OptionSpec("app_scale_settings", "True or False", False, "True", _bool),
    ]
    return {spec.name: spec for spec in specs}
# fmt: on


OPTIONS: dict[str, OptionSpec] = _option_table()

# The keys of the manifest's ``options`` (contract 1), in documentation order.
MANIFEST_OPTIONS: tuple[str, ...] = (
    "auth", "machine_type", "num_gpus", "keep_alive", "min_concurrency", "max_concurrency",
    "concurrency_buffer", "concurrency_buffer_perc", "max_multiplexing", "scaling_delay",
    "request_timeout", "startup_timeout", "termination_grace_period_seconds",
    "skip_retry_conditions", "health_check", "exposed_port", "regions", "secrets",
    "data_mounts", "private_logs", "image", "deployment_strategy", "app_scale_settings",
)  # fmt: skip


# -- public API ---------------------------------------------------------------------------


def suggest(name: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The closest of ``choices`` to ``name`` (difflib), or None."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def validate_option(name: str, value: object, *, where: str) -> object:
    """Check one option and return its normalised value; raise OptionError naming the fix.

    ``name`` may be an alias (``app_auth``); ``host_kwargs`` entries are validated too.
    """
    canonical = ALIASES.get(name, name)
    check_known([name], where=where)
    spec = OPTIONS[canonical]
    try:
        normalised = spec.check(value)
    except _Invalid as exc:
        raise OptionError(_invalid_message(name, value, spec, where, exc.hint)) from None
    if canonical == "host_kwargs":
        assert isinstance(normalised, dict)
        return _validate_host_kwargs(normalised, where)
    return normalised


def check_known(names: Iterable[str], *, where: str, known: Iterable[str] = OPTIONS) -> None:
    """Raise OptionError for the first name that is neither an option nor an alias."""
    known_names = set(known) | (set(ALIASES) if known is OPTIONS else set())
    for name in names:
        if name in known_names:
            continue
        match = suggest(name, sorted(known_names))
        if match:
            raise OptionError(f"{where}: unknown option {name!r} — did you mean {match!r}?")
        raise OptionError(
            f"{where}: unknown option {name!r} — remove it or use one of: "
            + ", ".join(sorted(known_names))
        )


def resolve_options(
    explicit: Mapping[str, object], *, where: str = "app options"
) -> dict[str, object]:
    """The manifest's ``options``: ``explicit`` validated, host_kwargs merged, defaults filled.

    Keys outside ``MANIFEST_OPTIONS`` (requirements, app_name, ...) are validated but left
    out. An option set both directly and in host_kwargs keeps the direct value.
    """
    flat: dict[str, object] = {}
    for name, value in explicit.items():
        checked = validate_option(name, value, where=where)
        if ALIASES.get(name, name) == "host_kwargs":
            assert isinstance(checked, dict)
            flat = {**checked, **flat}
        else:
            flat[ALIASES.get(name, name)] = checked
    resolved = {key: flat.get(key, OPTIONS[key].default) for key in MANIFEST_OPTIONS}
    _check_consistency(resolved, where)
    return resolved


# -- helpers ------------------------------------------------------------------------------


def _validate_host_kwargs(entries: dict[str, object], where: str) -> dict[str, object]:
    inner_where = f"{where}: host_kwargs"
    out: dict[str, object] = {}
    for key, value in entries.items():
        if ALIASES.get(key, key) == "host_kwargs":
            raise OptionError(f"{inner_where}: host_kwargs cannot be nested — move its entries up")
        out[ALIASES.get(key, key)] = validate_option(key, value, where=inner_where)
    return out


def _invalid_message(name: str, value: object, spec: OptionSpec, where: str, hint: str) -> str:
    # An image may carry registry credentials: never echo it.
    shown = "<image>" if spec.name == "image" else repr(value)
    return (
        f"{where}: option {name} = {shown} is invalid{hint}: expected {spec.expected}, "
        f"e.g. {name} = {_example(spec.example, where)}"
    )


def _example(example: str, where: str) -> str:
    """Examples are Python syntax; pyproject locations get TOML booleans."""
    if where.startswith("[tool."):
        return {"True": "true", "False": "false"}.get(example, example)
    return example


def _check_consistency(options: dict[str, object], where: str) -> None:
    machines = options["machine_type"]
    assert isinstance(machines, list)
    has_gpu = any(m in GPU_MACHINE_TYPES for m in machines)
    if options["num_gpus"] is None:
        options["num_gpus"] = 1 if has_gpu else 0
    elif not has_gpu:
        raise OptionError(
            f"{where}: option num_gpus = {options['num_gpus']!r} needs a GPU machine_type, "
            f'but machine_type is {machines!r}: set machine_type = "GPU-H100" (or another '
            "GPU type) or remove num_gpus"
        )
    low, high = options["min_concurrency"], options["max_concurrency"]
    assert isinstance(low, int) and isinstance(high, int)
    if low > high:
        raise OptionError(
            f"{where}: option min_concurrency = {low} is greater than max_concurrency = "
            f"{high}: raise max_concurrency to at least {low} or lower min_concurrency"
        )
