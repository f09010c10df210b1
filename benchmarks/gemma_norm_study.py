"""The Gemma post-norm study: treatments of Gemma's post-MLP norm, each scored on the same CounterFact cases.

A treatment is a named set of hparams overrides on top of the model's MEMIT/EMMET hparams file (layers, λ,
clamp, v* step, ``post_norm``: "project" / "ignore" / "output_site"). v* targets are optimised once per
distinct (site, v* setting) and shared by treatments that only differ in the closed form (λ, post_norm
mapping, method), so a λ grid costs one v* pass. Every run merges its rows into the JSON record (keyed by
treatment, method and n), so the record of what was tried grows across invocations.

    .venv/bin/python benchmarks/gemma_norm_study.py --n 30 --treatments output_site,ignore,project
    .venv/bin/python benchmarks/gemma_norm_study.py --treatments project --set lam5k='{"mom2_update_weight": 5000}'

Writes benchmarks/results/gemma_norm_study.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from edit_common import COUNTERFACT, RESULTS, WIKITEXT, write_json

from fastedit.arch import arch_for, restored_after
from fastedit.editing.api import evaluate
from fastedit.editing.context import context_templates
from fastedit.editing.engine import apply_edit
from fastedit.editing.hparams import EditHparams, load_hparams
from fastedit.editing.values import ValueResult, compute_values, edit_site, site_start_layer, values_key
from fastedit.models import load_model
from fastedit.requests import load_requests
from fastedit.stats import ensure_stats

METRICS = ("es", "ps", "ns", "score")

# name -> hparams overrides. Kept as the record of what was tried (the JSON holds the scores).
TREATMENTS: dict[str, dict[str, Any]] = {
    "output_site": {"post_norm": "output_site"},  # δ on layer 7's mlp_out output, spread as-is
    "ignore": {"post_norm": "ignore"},  # δ on the residual, ΔM = r (the norm ignored)
    "project": {"post_norm": "project"},  # δ on the residual, r mapped to the nearest reachable ΔM
    "per_layer": {"post_norm": "per_layer"},  # one δ per layer on its mlp_out output, every norm in the loop
    "per_layer_lam5k": {"post_norm": "per_layer", "mom2_update_weight": 5000},
    "per_layer_lam50k": {"post_norm": "per_layer", "mom2_update_weight": 50000},
    "per_layer_lr0.2": {"post_norm": "per_layer", "v_lr": 0.2},
    # λ against d_k: one key's realised share is a/(1+a), a = kᵀ(λC0)⁻¹k ≈ d_k/λ (2048/15000 ≈ 0.14 on Gemma 3)
    "per_layer_lam1k": {"post_norm": "per_layer", "mom2_update_weight": 1000},
    "per_layer_lam300": {"post_norm": "per_layer", "mom2_update_weight": 300},
    "per_layer_lam100": {"post_norm": "per_layer", "mom2_update_weight": 100},
    "per_layer_lam3k": {"post_norm": "per_layer", "mom2_update_weight": 3000},
}


def parse_treatments(names: str, extra: list[str]) -> dict[str, dict[str, Any]]:
    chosen = {name: TREATMENTS[name] for name in names.split(",") if name}
    for item in extra:
        name, _, text = item.partition("=")
        chosen[name] = json.loads(text)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--methods", default="memit")
    ap.add_argument("--treatments", default="output_site,ignore,project", help=f"from {', '.join(TREATMENTS)}")
    ap.add_argument("--set", action="append", default=[], help="extra treatment NAME='{json overrides}'")
    ap.add_argument("--dm", type=float, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "gemma_norm_study.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"rows": {}, "unedited": {}}

    model, tok = load_model(args.model)
    spec = arch_for(model)
    requests = load_requests(COUNTERFACT, n=args.n).requests
    treatments = parse_treatments(args.treatments, args.set)
    pre = evaluate(model, tok, requests).summary
    record["unedited"][f"{args.model}/n{args.n}"] = {k: pre[k] for k in METRICS}
    print(f"unedited n={args.n}: " + " ".join(f"{k} {pre[k]:.1f}" for k in METRICS), flush=True)

    values: dict[str, ValueResult] = {}
    for method in args.methods.split(","):
        base = load_hparams(method, model)
        for name, overrides in treatments.items():
            hp: EditHparams = base.replace(**{k: tuple(v) if k == "layers" else v for k, v in overrides.items()})
            layers = list(hp.layers)
            stats = ensure_stats(model, tok, layers, dm=args.dm, corpus=WIKITEXT, progress=False)
            covs = {layer: stats[layer].mean for layer in layers}
            site = edit_site(spec, hp)
            key = values_key(spec, hp)
            t0 = time.perf_counter()
            if key not in values:
                contexts = context_templates(
                    model, tok, seeds=hp.context_seeds, length=hp.context_length, seed=hp.context_seed
                )
                values[key] = compute_values(
                    model, tok, spec, requests, site=site, layer=site_start_layer(spec, hp), contexts=contexts, hp=hp
                )
            t_values = time.perf_counter() - t0
            with restored_after(model, spec, layers):
                result = apply_edit(model, tok, requests, method=method, hparams=hp, stats=covs, values=values[key])
                post = evaluate(model, tok, requests).summary
            info = values[key].info
            row = {
                "treatment": name,
                "overrides": overrides,
                "method": method,
                "n": args.n,
                "dm": args.dm,
                **{k: round(post[k], 1) for k in METRICS},
                "unedited": {k: round(pre[k], 1) for k in METRICS},
                "v_nll_end": round(sum(i["nll_end"] for i in info) / len(info), 3),
                "v_delta_over_h": round(sum(i["delta_over_h"] for i in info) / len(info), 4),
                "layers": result.info["layers"],
                "seconds_values": round(t_values, 1),
            }
            record["rows"][f"{args.model}/{method}/{name}/n{args.n}"] = row
            write_json(out, record)
            reached = " ".join(
                f"{layer}:{d['reached']:.2f}" for layer, d in result.info["layers"].items() if "reached" in d
            )
            realised = " ".join(f"{layer}:{d['realised']:.2f}" for layer, d in result.info["layers"].items())
            print(
                f"{method:>6} {name:<28} ES {row['es']:5.1f} PS {row['ps']:5.1f} NS {row['ns']:5.1f} "
                f"Score {row['score']:5.1f} | v* nll {row['v_nll_end']:.2f} |δ|/|h| {row['v_delta_over_h']:.3f}"
                f" | realised {realised}" + (f" | reached {reached}" if reached else ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
