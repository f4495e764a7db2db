"""__APP_NAME__: proxy app mode, a typed API in front of a server that setup() starts.

setup() starts an existing HTTP server as a subprocess on a free local port (here a tiny
stand-in, `_SERVER`; put your own server's command line in `_server_command`). Each endpoint
validates its input with pydantic, forwards it to that server and shapes the answer, so the
app gets a typed schema while the server keeps its own protocol. teardown() stops the server.
Serve it with `fal run __APP_NAME__`.
"""

import json
import subprocess
import sys
import urllib.request

from pydantic import BaseModel, Field

import fal

# The stand-in for "your existing server": it binds a free port, prints it, then answers
# POST /upper with JSON. Any server works if the app learns its port.
_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        size = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(size) or b"{}")
        raw = json.dumps({"upper": body.get("text", "").upper(), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class Input(BaseModel):
    text: str = Field(default="hello proxy", description="Text for the server to shout.")


class Output(BaseModel):
    text: str = Field(description="The server's answer.")
    server_path: str = Field(description="The path the server was called on.")


def _server_command() -> list[str]:
    return [sys.executable, "-c", _SERVER]


class __APP_CLASS__(fal.App):
    machine_type = "XS"
    keep_alive = 60

    def setup(self) -> None:
        self.server = subprocess.Popen(_server_command(), stdout=subprocess.PIPE, text=True)
        assert self.server.stdout is not None
        # The server prints its port once it listens: no polling needed.
        port = self.server.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the proxied server did not start (said {port!r})")
        self.base_url = f"http://127.0.0.1:{port}"

    def teardown(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=10)

    def _call(self, path: str, payload: dict[str, object]) -> dict[str, object]:
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return dict(json.load(response))

    @fal.endpoint("/")
    def upper(self, input: Input) -> Output:
        answer = self._call("/upper", {"text": input.text})
        return Output(text=str(answer["upper"]), server_path=str(answer["path"]))
