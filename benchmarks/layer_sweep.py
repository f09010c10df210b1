"""Choose an editor's layers (and λ with them) on the tune sets only, by the rule `tune_split.py` uses.

    python benchmarks/layer_sweep.py --model smollm2-135m --method memit --counterfact CF.json \
        --corpus WIKITEXT.raw --layer-sets 4-8 2-6 1-5 --grid mom2_update_weight=2500,5000,10000

`tune_split.py` varies what the closed form takes and keeps the v* targets; the edited layers move the v* site
(the last edited layer) and need C0 at other layers, so they get this script. For each layer set (the model
file's other settings unchanged) and each grid value, the edit is scored on the tune split of CounterFact
(default cases 1000-1049) and on the tune facts (data/well-known-facts-tune.json); the choice is the row that
meets the bar on both (ES ≥ 90, PS ≥ 70, NS at most 5 below the unedited model's) with the best mean Score, or
misses it by the fewest points (`tune_split.pick`). Nothing here touches the report sets: score the choice on them
with `facts_check.py` and `fastedit edit`. v* targets of each layer set are kept in the targets cache.

Output: a table on stdout, benchmarks/results/layer_sweep_<model>_<method>.json (+ .png). Data are named by file
name and sha256, never by path.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from edit_common import RESULTS, save_figure, sha256_of, stats_for, write_json
from tune_split import ES_BAR, NS_SLACK, PS_BAR, TUNE_FACTS, pick, score_edit, shortfall, unedited_metrics

import fastedit
from fastedit.arch import arch_for
from fastedit.config import config_to_dict
from fastedit.editing.hparams import EditHparams, load_hparams
from fastedit.editing.targets_cache import cached_targets
from fastedit.models import cache_dir
from fastedit.requests import load_requests
from fastedit.stats.cache import model_slug


def layer_set(spec: str) -> list[int]:
    """ "2-6" -> [2, 3, 4, 5, 6]; "2,4,6" -> [2, 4, 6]."""
    lo, dash, hi = spec.partition("-")
    try:
        layers = list(range(int(lo), int(hi) + 1)) if dash else [int(x) for x in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: use a range like 2-6 or a list like 2,4,6") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"{spec!r} names no layer; use a range like 2-6 or a list like 2,4,6")
    return layers


def grid_axis(spec: str) -> tuple[str, list[float]]:
    key, _, values = spec.partition("=")
    if key not in {f.name for f in dataclasses.fields(EditHparams)} or not values:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected KEY=V1,V2 with KEY an hparam (mom2_update_weight=1,2)")
    try:
        return key, [float(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: the values must be numbers") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="memit", choices=("memit", "emmet", "alphaedit"))
    parser.add_argument("--counterfact", required=True, help="Flat CounterFact JSON (fastedit data: counterfact).")
    parser.add_argument("--corpus", required=True, help="C0 corpus file (WikiText-2 raw test).")
    parser.add_argument("--tune", default="1000:1050", help="Tune split, start:end case indices.")
    parser.add_argument("--tune-facts", default=str(TUNE_FACTS), help="Tune facts (default the repository's).")
    parser.add_argument("--layer-sets", nargs="+", type=layer_set, required=True, metavar="A-B")
    parser.add_argument("--grid", action="append", type=grid_axis, default=[], metavar="KEY=V1,V2")
    parser.add_argument("--dm", type=float, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is).")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/layer_sweep_...json).")
    args = parser.parse_args()
    counterfact, corpus, tune_facts = Path(args.counterfact), Path(args.corpus), Path(args.tune_facts)
    for path in (counterfact, corpus, tune_facts):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    try:
        lo, hi = (int(x) for x in args.tune.split(":"))
    except ValueError:
        parser.error(f"--tune {args.tune!r}: expected START:END case indices, e.g. 1000:1050")
    sets = {"tune": load_requests(counterfact).requests[lo:hi], "tune_facts": load_requests(tune_facts).requests}
    axes = dict(args.grid)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = Path(args.out) if args.out else RESULTS / f"layer_sweep_{args.model}_{args.method}.json"

    model, tok = fastedit.load_model(args.model)
    base = load_hparams(args.method, model)
    n_layers = arch_for(model).n_layers(model.config)
    if any(max(layers) >= n_layers for layers in args.layer_sets):
        parser.error(f"--layer-sets: {args.model} has layers 0-{n_layers - 1}")
    unedited = {name: unedited_metrics(model, tok, reqs) for name, reqs in sets.items()}
    print(f"unedited {unedited}", flush=True)
    record: dict[str, Any] = {
        "config": {
            "model": args.model, "method": args.method, "tune": args.tune, "dm": args.dm,
            "layer_sets": args.layer_sets, "grid": axes, "threads": torch.get_num_threads(),
            "data": {
                "counterfact": {"file": counterfact.name, "sha256": sha256_of(counterfact)},
                "corpus": {"file": corpus.name, "sha256": sha256_of(corpus)},
                "tune_facts": {"file": tune_facts.name, "sha256": sha256_of(tune_facts), "n": len(sets["tune_facts"])},
            },
            "bar": {"es": ES_BAR, "ps": PS_BAR, "ns_slack": NS_SLACK},
            "hparams": config_to_dict(base),
        },
        "unedited": unedited, "rows": [], "values_seconds": {},
    }  # fmt: skip
    folder = cache_dir() / "targets" / model_slug(args.model)
    for layers in args.layer_sets:
        hp0 = base.replace(layers=layers)
        stats = stats_for(model, tok, layers, dm=args.dm, corpus=str(corpus))
        values = {}
        for name, reqs in sets.items():
            t0 = time.perf_counter()
            values[name], hit = cached_targets(model, tok, reqs, hp0, folder)
            record["values_seconds"][f"{layers}/{name}"] = None if hit else round(time.perf_counter() - t0, 1)
        for combo in itertools.product(*axes.values()):
            hp = hp0.replace(**dict(zip(axes, combo, strict=True)))
            row: dict[str, Any] = {"layers": layers, **dict(zip(axes, combo, strict=True))}
            row.update(score_edit(model, tok, sets["tune"], args.method, hp, stats, values["tune"]))
            row["tune_facts"] = score_edit(model, tok, sets["tune_facts"], args.method, hp, stats, values["tune_facts"])
            row["misses_by"] = round(
                shortfall(row, unedited["tune"]["ns"]) + shortfall(row["tune_facts"], unedited["tune_facts"]["ns"]), 1
            )
            record["rows"].append(row)
            print(f"{row}", flush=True)
            write_json(out_path, record)
    best = pick(record["rows"], unedited)
    record["chosen"] = {"layers": best["layers"], **{k: best[k] for k in axes}}

    header = ["layers", *axes, "tune ES / PS / NS", "tune facts ES / PS / NS", "misses the bar by"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in record["rows"]:
        mark = "**" if row is best else ""
        f = row["tune_facts"]
        cells = [
            f"{mark}{min(row['layers'])}-{max(row['layers'])}{mark}", *(f"{row[k]:g}" for k in axes),
            f"{row['es']} / {row['ps']} / {row['ns']}", f"{f['es']} / {f['ps']} / {f['ns']}", row["misses_by"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    record["table"] = "\n".join(lines)
    write_json(out_path, record)
    print(f"unedited ES / PS / NS: tune {unedited['tune']}, tune facts {unedited['tune_facts']}")
    print(record["table"])
    print(f"chosen: {record['chosen']}")
    plot(record, out_path.with_suffix(".png"))


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    axes = list(record["config"]["grid"])
    labels = [f"{min(r['layers'])}-{max(r['layers'])}" + "".join(f"\n{r[k]:g}" for k in axes) for r in rows]
    fig, panels = plt.subplots(1, 2, figsize=(max(8, 0.6 * len(rows)), 4), sharey=True)
    for ax, name in zip(panels, ("tune", "tune_facts"), strict=True):
        results = [r if name == "tune" else r["tune_facts"] for r in rows]
        x = torch.arange(len(rows)).float()
        for i, key in enumerate(("es", "ps", "ns")):
            ax.bar((x + (i - 1) * 0.27).tolist(), [res[key] or 0 for res in results], width=0.27, label=key.upper())
        ax.axhline(record["unedited"][name]["ns"] - NS_SLACK, color="k", ls="--", lw=0.8, label="unedited NS − 5")
        ax.axhline(PS_BAR, color="C1", ls=":", lw=0.8)
        ax.axhline(ES_BAR, color="C0", ls=":", lw=0.8)
        ax.set_xticks(x.tolist(), labels, fontsize=6)
        ax.set_xlabel(", ".join(["layers", *axes]), fontsize=7)
        ax.set_title(f"{record['config']['model']} {record['config']['method']}: {name}", fontsize=9)
    panels[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
