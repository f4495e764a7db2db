"""__APP_NAME__: a small CPU app with a pydantic Input/Output and setup().

Serve it with `fal run __APP_NAME__`, then call it with fal-client, e.g.
fal_client.run("<owner>/__APP_NAME__", arguments={"name": "fal"}).
"""

from pydantic import BaseModel, Field

import fal


class Input(BaseModel):
    name: str = Field(default="world", description="Who to greet.", examples=["fal"])


class Output(BaseModel):
    greeting: str = Field(description="The greeting.")


class __APP_CLASS__(fal.App):
    machine_type = "XS"
    keep_alive = 60

    def setup(self) -> None:
        # Runs once per runner, before the first request: load models and clients here.
        self.template = "Hello, {}!"

    @fal.endpoint("/")
    def greet(self, input: Input) -> Output:
        return Output(greeting=self.template.format(input.name))
