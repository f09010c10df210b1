"""How long `load_model` takes in a fresh process, for each packaged model (cold = GGUF parse + conversion when
the cache is empty, warm = the converted safetensors cache). Prints a table and writes JSON.

    .venv/bin/python benchmarks/load_model.py [--cache-dir DIR]   # an empty DIR measures the cold path too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import time, json, sys
t0 = time.perf_counter()
import torch, transformers  # noqa: F401
t1 = time.perf_counter()
from fastedit.models import load_model
model, tok = load_model(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def measure(alias: str, env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, alias], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", help="FASTEDIT_CACHE_DIR for the runs (default: the usual cache)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_model.json"))
    args = parser.parse_args()
    env = dict(os.environ)
    if args.cache_dir:
        env["FASTEDIT_CACHE_DIR"] = args.cache_dir
    rows = []
    for alias in ("smollm2-135m", "gemma3-270m"):
        first = measure(alias, env)
        second = measure(alias, env)
        rows.append({"model": alias, "first": first, "second": second})
    print(f"{'model':<14} {'1st load s':>10} {'2nd load s':>10} {'2nd process s':>14}")
    for row in rows:
        print(
            f"{row['model']:<14} {row['first']['load_s']:>10.1f} {row['second']['load_s']:>10.1f} "
            f"{row['second']['process_s']:>14.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
