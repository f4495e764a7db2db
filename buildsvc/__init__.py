"""The build service: API, store, builder, runtime, gateway."""

__version__ = "0.1.0"
