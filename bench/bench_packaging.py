"""Time packaging of a generated 200-file project, cold and warm (file hash cache).

Run: ``python bench/bench_packaging.py [--files 200] [--size 4096] [--runs 5]``.
Cold = an empty cache directory (every file read and hashed); warm = the same cache again
(files stat()ed only). Target: warm < 300 ms for 200 files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from falcli.packaging import package
from falcli.project import resolve_target

_APP = """import fal


class Bench(fal.App):
    keep_alive = 30

    @fal.endpoint("/")
    def run(self, n: int = 1) -> dict:
        return {"n": n}
"""
_OLD = time.time() - 3600  # outside the cache's racy window, like a real checkout


def _make_project(root: Path, files: int, size: int) -> None:
    (root / "bench_app.py").write_text(_APP)
    (root / "pyproject.toml").write_text(
        '[tool.fal.apps.bench]\nref = "bench_app.py::Bench"\napp_files = ["data"]\n'
    )
    for index in range(files):
        path = root / "data" / f"dir{index % 10}" / f"file{index}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        os.utime(path, (_OLD, _OLD))


def _time_ms(root: Path, cache: Path) -> tuple[float, int]:
    start = time.perf_counter()
    bundle = package(resolve_target("bench", root), cache_dir=cache)
    return (time.perf_counter() - start) * 1000, len(bundle.manifest["files"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--size", type=int, default=4096, help="bytes per file")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "project", Path(tmp) / "cache"
        root.mkdir()
        _make_project(root, args.files, args.size)
        resolve_target("bench", root)  # import the app once: we time packaging, not import
        cold, count = _time_ms(root, cache)
        warm = [_time_ms(root, cache)[0] for _ in range(args.runs)]
    rows = [
        ("cold (empty hash cache)", cold),
        (f"warm median of {args.runs}", statistics.median(warm)),
        (f"warm best of {args.runs}", min(warm)),
    ]
    print(f"packaging {count} files x {args.size} B, Python {sys.version.split()[0]}")
    print(f"{'run':<28}{'ms':>10}")
    for label, value in rows:
        print(f"{label:<28}{value:>10.1f}")
    verdict = "OK" if statistics.median(warm) < 300 else "OVER"
    print(f"target warm < 300 ms: {verdict}")


if __name__ == "__main__":
    main()
