"""Score the shipped hparams files on a set of well-known facts, against the bar the tuning uses.

    python benchmarks/facts_check.py --model gemma3-270m --corpus WIKITEXT.raw --facts FACTS.json

Each method (MEMIT, EMMET's exact solve, AlphaEdit) edits the whole set as one batch with the model's shipped file,
C0 from d_m·d_k WikiText-2 keys (d_m 10), v* from the targets cache, exactly as `benchmarks/tune_split.py` scores
its report sets; nothing is tuned here, so a set no file was chosen on checks whether the choices generalise. The
bar: ES ≥ 90, PS ≥ 70, NS at most 5 points below the unedited model's; "misses by" sums the points short.

Output: a table on stdout, benchmarks/results/facts_check_<model>_<facts file stem>.json (+ .png). Data are named
by file name and sha256, never by path.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from edit_common import RESULTS, save_figure, sha256_of, stats_for, write_json
from tune_split import ES_BAR, METRICS, NS_SLACK, PS_BAR, score_edit, shortfall, unedited_metrics

import fastedit
from fastedit.config import config_to_dict
from fastedit.editing.hparams import load_hparams
from fastedit.editing.targets_cache import cached_targets
from fastedit.models import cache_dir
from fastedit.requests import load_requests
from fastedit.stats.cache import model_slug


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--facts", required=True, help="Facts file (plain layout, e.g. data/well-known-facts-*.json).")
    parser.add_argument("--corpus", required=True, help="C0 corpus file (WikiText-2 raw test).")
    parser.add_argument("--methods", default="memit,emmet,alphaedit")
    parser.add_argument("--dm", type=float, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is).")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/facts_check_...json).")
    args = parser.parse_args()
    facts, corpus = Path(args.facts), Path(args.corpus)
    for path in (facts, corpus):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    requests = load_requests(facts).requests  # checked before the model loads
    methods = args.methods.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = Path(args.out) if args.out else RESULTS / f"facts_check_{args.model}_{facts.stem}.json"

    model, tok = fastedit.load_model(args.model)
    hps = {m: load_hparams(m, model) for m in methods}
    layers = sorted({layer for hp in hps.values() for layer in hp.layers})
    stats = stats_for(model, tok, layers, dm=args.dm, corpus=str(corpus))
    unedited = unedited_metrics(model, tok, requests)
    print(f"{facts.name}: {len(requests)} facts, unedited {unedited}", flush=True)
    record: dict[str, Any] = {
        "config": {
            "model": args.model, "methods": methods, "dm": args.dm, "threads": torch.get_num_threads(),
            "data": {
                "facts": {"file": facts.name, "sha256": sha256_of(facts), "n": len(requests)},
                "corpus": {"file": corpus.name, "sha256": sha256_of(corpus)},
            },
            "bar": {"es": ES_BAR, "ps": PS_BAR, "ns_slack": NS_SLACK},
            "hparams": {m: config_to_dict(hp) for m, hp in hps.items()},
        },
        "unedited": unedited, "results": {}, "values_seconds": {},
    }  # fmt: skip
    folder = cache_dir() / "targets" / model_slug(args.model)
    for method in methods:
        t0 = time.perf_counter()
        values, hit = cached_targets(model, tok, requests, hps[method], folder)
        record["values_seconds"][method] = None if hit else round(time.perf_counter() - t0, 1)
        res = score_edit(model, tok, requests, method, hps[method], stats, values)
        if res["score"] is not None:
            res["misses_by"] = round(shortfall(res, unedited["ns"]), 1)
        record["results"][method] = res
        print(f"{method} {res}", flush=True)
        write_json(out_path, record)

    lines = ["| method | ES | PS | NS | Score | misses the bar by |", "|---|---|---|---|---|---|"]
    lines.append(f"| unedited | {unedited['es']} | {unedited['ps']} | {unedited['ns']} | {unedited['score']} | |")
    for method, r in record["results"].items():
        cells = [method, *(r[k] for k in METRICS), r.get("misses_by", r.get("error"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    record["table"] = "\n".join(lines)
    write_json(out_path, record)
    print(record["table"])
    plot(record, out_path.with_suffix(".png"))


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, r in record["results"].items() if r["score"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.25
    for j, key in enumerate(("es", "ps", "ns")):
        xs = [i + (j - 1) * width for i in range(len(methods))]
        ax.bar(xs, [record["results"][m][key] for m in methods], width, label=key.upper())
    bar_ns = record["unedited"]["ns"] - NS_SLACK
    ax.axhline(ES_BAR, color="C0", ls=":", lw=1)
    ax.axhline(PS_BAR, color="C1", ls=":", lw=1)
    ax.axhline(bar_ns, color="C2", ls=":", lw=1, label=f"NS bar (unedited {record['unedited']['ns']} − {NS_SLACK:g})")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0, 105)
    facts = record["config"]["data"]["facts"]
    ax.set_title(f"{record['config']['model']}: shipped files on {facts['file']} ({facts['n']} facts, one batch)")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
