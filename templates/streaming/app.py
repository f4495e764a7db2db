"""__APP_NAME__: an app that streams server-sent events (SSE) from /stream.

Serve it with `fal run __APP_NAME__`, then call it with fal-client, e.g.
fal_client.stream("<owner>/__APP_NAME__", arguments={"text": "hi"}, path="/stream").
"""

import json
from collections.abc import Iterator

from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse

import fal


class Input(BaseModel):
    text: str = Field(default="hello streaming world", description="Words to stream back.")


class Output(BaseModel):
    words: int = Field(description="How many words were streamed.")


def _event(data: dict[str, object]) -> str:
    return f"data: {json.dumps(data)}\n\n"


class __APP_CLASS__(fal.App):
    machine_type = "XS"
    keep_alive = 60

    def setup(self) -> None:
        self.separator = " "

    def _events(self, text: str) -> Iterator[str]:
        words = text.split(self.separator)
        for index, word in enumerate(words):
            yield _event({"index": index, "word": word})
        yield _event({"done": True, "words": len(words)})

    @fal.endpoint("/stream")
    def stream(self, input: Input) -> StreamingResponse:
        return StreamingResponse(self._events(input.text), media_type="text/event-stream")

    @fal.endpoint("/")
    def count(self, input: Input) -> Output:
        return Output(words=len(input.text.split(self.separator)))
