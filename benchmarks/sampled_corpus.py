"""Does C0 from text the model samples itself edit as well as C0 from WikiText? MEMIT with each, same v*.

For one model: C0 at the hparams' layers from d_m·d_k keys of (a) the wikitext-2 data set and (b) text sampled from
the model (`--corpus model`, the default when no data set is present); v* targets for the first --n flat
CounterFact cases are computed once; MEMIT is solved with each C0 (the hparams' λ) and ES/PS/NS/Score measured
after each edit (weights restored in between). Prints a table and writes JSON + PNG to
benchmarks/results/sampled_corpus_<model>.*.

    .venv/bin/python benchmarks/sampled_corpus.py --model gemma3-270m --n 100 --threads 1
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from dm_sweep import compute_all_values
from edit_common import (
    WIKITEXT,
    benchmark_parser,
    data_id,
    parse_benchmark_args,
    save_figure,
    write_json,
)

from fastedit.arch import arch_for, restored_after
from fastedit.config import config_to_dict
from fastedit.editing.api import evaluate
from fastedit.editing.engine import apply_edit
from fastedit.editing.hparams import load_hparams
from fastedit.models import load_model
from fastedit.requests import load_requests
from fastedit.stats import condition_number, run_stats

METRICS = ("es", "ps", "ns", "score")


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["unedited", *result["rows"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        scores = result["unedited"] if label == "unedited" else result["rows"][label]["metrics"]
        xs = [j + i * width for j in range(len(METRICS))]
        ax.bar(xs, [scores[m] or 0 for m in METRICS], width, label=label)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(METRICS))], [m.upper() for m in METRICS])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    cfg = result["config"]
    ax.set_title(f"MEMIT on {cfg['model']}, {cfg['n']} CounterFact cases, C0 at d_m {cfg['dm']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    ap = benchmark_parser("sampled_corpus", __doc__, model="gemma3-270m")
    ap.add_argument("--n", type=int, default=100, help="first N cases of --requests")
    ap.add_argument("--dm", type=float, default=10)
    ap.add_argument("--corpora", default=f"{WIKITEXT},model", help="comma list of corpora to compare")
    ap.add_argument("--seed", type=int, default=0, help="corpus order / sampling seed")
    ap.add_argument("--stats-dir", default=None, help="stats cache folder (default: the fastedit cache)")
    args, out = parse_benchmark_args(ap)
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    t_start = time.perf_counter()

    model, tok = load_model(args.model)
    spec = arch_for(model)
    requests = load_requests(args.requests, n=args.n).requests
    hp = load_hparams("memit", model)
    layers = list(hp.layers)
    print(f"{args.model}: {len(requests)} cases, layers {layers}, corpora {corpora}, d_m {args.dm:g}", flush=True)
    before = evaluate(model, tok, requests, batch_size=args.eval_batch_size).summary
    unedited = {k: before[k] for k in METRICS}
    values, values_record = compute_all_values(model, tok, requests, {"memit": hp})

    rows: dict[str, Any] = {}
    for corpus in corpora:
        t0 = time.perf_counter()
        run = run_stats(model, tok, layers, dm=args.dm, corpus=corpus, seed=args.seed, out=args.stats_dir)
        stats_seconds = time.perf_counter() - t0
        assert run.corpus is not None
        with restored_after(model, spec, layers):
            apply_edit(model, tok, requests, method="memit", hparams=hp,
                       stats={layer: run.stats[layer].mean for layer in layers}, values=values["memit"])  # fmt: skip
            summary = evaluate(model, tok, requests, batch_size=args.eval_batch_size).summary
        rows[corpus] = {
            "corpus_id": run.corpus.id if run.corpus.kind == "model" else data_id(corpus),
            "keys": int(run.stats[layers[0]].count),
            "seq_len": run.stats[layers[0]].metadata.get("seq_len"),
            "stats_seconds": round(stats_seconds, 1),  # ~0 on a cache hit
            "cond": {str(layer): float(condition_number(run.stats[layer].mean)) for layer in layers},
            "metrics": {k: summary[k] for k in METRICS},
        }
        print(corpus, rows[corpus]["metrics"], f"(C0 {stats_seconds:.1f} s)", flush=True)

    result = {
        "config": {
            "model": args.model,
            "n": len(requests),
            "requests": data_id(args.requests),
            "dm": args.dm,
            "seed": args.seed,
            "layers": layers,
            "hparams": config_to_dict(hp),
            "threads": torch.get_num_threads(),
        },
        "unedited": unedited,
        "values": values_record,
        "rows": rows,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    write_json(out, result)
    png = plot(result, out.with_suffix(".png"))
    print(f"\n{'C0 from':16}" + "".join(f"{m.upper():>7}" for m in METRICS))
    print(f"{'unedited':16}" + "".join(f"{unedited[m]:7.1f}" for m in METRICS))
    for corpus, row in rows.items():
        print(f"{corpus:16}" + "".join(f"{row['metrics'][m]:7.1f}" for m in METRICS))
    print(f"\nwrote {out} and {png} ({result['seconds_total']:.0f} s)")


if __name__ == "__main__":
    main()
