"""App names: the kebab-case default derived from a class or function name.

``MyGoodApp`` -> ``my-good-app``, ``HTTPServer`` -> ``http-server``, ``my_func`` ->
``my-func``. An explicit ``app_name`` option always wins.
"""

from __future__ import annotations

import re

__all__ = ["app_name_of", "kebab_case"]

# "HTTPServer": split an acronym from the capitalised word that follows it.
_ACRONYM_END = re.compile(r"([A-Z]+)([A-Z][a-z])")
# "myApp", "app2Go": split a lowercase letter or digit from the capital after it.
_WORD_START = re.compile(r"([a-z0-9])([A-Z])")
_SEPARATORS = re.compile(r"[\s_\-.]+")


def kebab_case(name: str) -> str:
    """``name`` in lowercase words joined by '-'."""
    spaced = _WORD_START.sub(r"\1-\2", _ACRONYM_END.sub(r"\1-\2", name))
    return _SEPARATORS.sub("-", spaced).strip("-").lower()


def app_name_of(obj: object) -> str:
    """The app name of a ``fal.App`` subclass or a ``FalFunction``: explicit or kebab."""
    options = getattr(obj, "__fal_options__", {}) or {}
    explicit = options.get("app_name")
    if isinstance(explicit, str) and explicit:
        return explicit
    return kebab_case(getattr(obj, "__name__", type(obj).__name__))
