"""A tiny fal app: greets whoever calls it. No requirements, so it builds in a second."""

from pydantic import BaseModel, Field

import fal


class Input(BaseModel):
    name: str = Field(default="world", description="Who to greet.")


class Output(BaseModel):
    greeting: str
    runner_setup_ms: float = Field(description="How long setup() took on this runner.")


class Hello(fal.App):
    machine_type = "XS"

    def setup(self) -> None:
        import time

        started = time.perf_counter()
        self.template = "Hello, {}!"
        self.setup_ms = (time.perf_counter() - started) * 1000

    @fal.endpoint("/")
    def greet(self, input: Input) -> Output:
        return Output(greeting=self.template.format(input.name), runner_setup_ms=self.setup_ms)
