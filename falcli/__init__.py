"""falcli: the client half of a self-hostable, fal-compatible serverless platform."""

__version__ = "0.1.0"
