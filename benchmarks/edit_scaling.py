"""Edit throughput against the number of edits: the whole `fastedit edit` run (keys, v*, closed-form solve,
evaluation before and after) for n = 100, 300, 1,000 CounterFact cases, one batch each.

Each n is one `run_edit` (what `fastedit edit FILE --n N --workers W` runs) into a temporary run folder, with
the v* targets cache off so every run optimises its targets. Wall seconds include starting the workers and
loading the model; the covariance statistics come from the cache (run `fastedit precompute` first, else the first
n computes them; reported as stats_s). Reported per n: wall seconds of the whole run, per request, and per part
(edit = v* + keys + solve, evaluation), ES/PS/NS/Score before and after. Targets of the issue this answers:
1,000 edits in <= 20 min (SmolLM2) / 30 min (Gemma 3) on 2 cores with ES >= 90, PS >= 70, NS >= unedited - 5.

    .venv/bin/python benchmarks/edit_scaling.py --model smollm2-135m --workers 2
    .venv/bin/python benchmarks/edit_scaling.py --model gemma3-270m --workers 2 --ns 100,300,1000

Writes benchmarks/results/edit_scaling_<model>.json and .png (or --out PATH.json). ``--add-to EARLIER.json`` keeps
that result's runs of other n (its model, method, workers, data and resolved hparams must be this run's; the
hparams' notes and file name aside), so the sizes of one table can be measured in separate sittings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from edit_common import (
    WIKITEXT,
    benchmark_parser,
    data_id,
    parse_benchmark_args,
    save_figure,
    write_json,
)

from fastedit.config import config_to_dict
from fastedit.editing.hparams import load_hparams
from fastedit.editing.run import EditRunOptions, run_edit

METRICS = ("es", "ps", "ns", "score")


def one_run(args: argparse.Namespace, n: int, folder: Path) -> dict[str, Any]:
    """The whole edit of the first ``n`` cases; its timings, seconds per request and metrics."""
    options = EditRunOptions(
        file=args.requests, model=args.model, method=args.method, hparams=args.hparams, n=n, dm=args.dm,
        corpus=args.corpus, out=str(folder / f"n{n}"), targets_cache="", workers=args.workers,
    )  # fmt: skip
    start = time.perf_counter()
    metrics = run_edit(options).metrics
    wall = time.perf_counter() - start
    t = metrics["timings"]
    evaluation = t.get("eval_pre", 0.0) + t.get("eval_post", 0.0)
    row = {
        "n": metrics["n"],
        "wall_s": round(wall, 1),
        "seconds_per_request": round(wall / metrics["n"], 3),
        "edit_s": round(t["edit"], 1),
        "edit_seconds_per_request": round(t["edit"] / metrics["n"], 3),
        "eval_s": round(evaluation, 1),
        "load_model_s": round(t.get("load_model", 0.0), 1),
        "stats_s": round(t.get("stats", 0.0), 1),
        "pre": {k: metrics["pre"][k] for k in METRICS},
        "post": {k: metrics["post"][k] for k in METRICS},
    }
    print(
        f"n {row['n']:>5}: {wall / 60:6.1f} min  {row['seconds_per_request']:6.2f} s/req (edit "
        f"{row['edit_seconds_per_request']:.2f})  "
        + "  ".join(f"{k.upper()} {row['pre'][k]:.1f}->{row['post'][k]:.1f}" for k in METRICS),
        flush=True,
    )
    return row


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds per request (whole run, edit alone) against n, log x; post-edit ES/PS/NS on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["runs"]
    ns = [r["n"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot(ns, [r["seconds_per_request"] for r in rows], "o-", label="whole run")
    ax.plot(ns, [r["edit_seconds_per_request"] for r in rows], "s--", label="edit (v*, keys, solve)")
    for r in rows:
        ax.annotate(f"{r['wall_s'] / 60:.1f} min", (r["n"], r["seconds_per_request"]), fontsize=8, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("edits (one batch)")
    ax.set_ylabel("wall seconds per request")
    cfg = result["config"]
    ax.set_title(f"{cfg['model']}, {cfg['method']}, {cfg['workers']} worker(s)")
    ax.legend(fontsize=8)
    for key in ("es", "ps", "ns"):
        bx.plot(ns, [r["post"][key] for r in rows], "o-", label=f"{key.upper()} post")
    bx.plot(ns, [r["pre"]["ns"] for r in rows], "k:", label="NS unedited")
    bx.set_xscale("log")
    bx.set_ylim(0, 105)
    bx.set_xlabel("edits (one batch)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _setting(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs comparable: the config without the hparams file's name and notes."""
    hparams = {k: v for k, v in config["hparams"].items() if k != "notes"}
    return {**{k: v for k, v in config.items() if k != "hparams_file"}, "hparams": hparams}


def main() -> None:
    ap = benchmark_parser("edit_scaling", __doc__, runs_in_process=False)
    ap.add_argument("--ns", default="100,300,1000", help="comma-separated numbers of edits")
    ap.add_argument("--method", default="memit", choices=["memit", "emmet", "alphaedit"])
    ap.add_argument("--hparams", default=None, help="hparams file (default: the model's file in hparams/)")
    ap.add_argument("--workers", type=int, default=2, help="processes (fastedit edit --workers)")
    ap.add_argument("--dm", default="10")
    ap.add_argument("--corpus", default=WIKITEXT, help="covariance corpus (default: the wikitext-2 data set)")
    ap.add_argument("--add-to", default=None, help="earlier result JSON of the same setting whose other runs to keep")
    args, out = parse_benchmark_args(ap)
    ns = sorted(int(x) for x in args.ns.split(","))
    hp = load_hparams(args.method, args.model, args.hparams)  # a bad file fails here, not after the runs

    result: dict[str, Any] = {
        "config": {
            "model": args.model,
            "method": args.method,
            "workers": args.workers,
            "requests": data_id(args.requests),
            "dm": args.dm,
            "corpus": data_id(args.corpus),
            "hparams_file": Path(args.hparams).name if args.hparams else "the model's file",
            "hparams": config_to_dict(hp),
        },
        "runs": [],
    }
    if args.add_to:
        earlier = json.loads(Path(args.add_to).read_text())
        if _setting(earlier["config"]) != _setting(result["config"]):
            raise SystemExit(
                f"--add-to {args.add_to}: its model, method, workers, data or hparams differ from this run's; "
                "measure every size again or write a new result"
            )
        result["runs"] = [r for r in earlier["runs"] if r["n"] not in ns]
    png = out.with_suffix(".png")
    with tempfile.TemporaryDirectory(prefix="edit-scaling-") as folder:
        for n in ns:
            result["runs"] = sorted([*result["runs"], one_run(args, n, Path(folder))], key=lambda r: r["n"])
            # Written after every n, so a long run stopped early keeps what it measured.
            write_json(out, result)
            plot(result, png)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
