"""Environment builds for apps: uv virtualenvs today (``env``), images later."""

from buildsvc.builder.env import BuildError, Env, EnvBuilder

__all__ = ["BuildError", "Env", "EnvBuilder"]
