#!/usr/bin/env bash
# The README's first command: install, deploy examples/hello on the embedded local server
# (started in the background on first use), and call it once with curl.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
cd examples/hello
url=$(fal deploy hello --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["urls"]["sync"])')
echo "deployed: $url" >&2
curl -sS -X POST "$url" -H 'content-type: application/json' -d '{"name": "fal"}'
echo
