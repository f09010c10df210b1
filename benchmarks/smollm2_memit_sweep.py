"""Small documented sweep that chose SmolLM2-135M's MEMIT hparams (hparams/memit/smollm2-135m.json).

For each v* setting (clamp, lr, steps) the v* targets are optimised once and reused for every λ (λ does not
enter v*). Metrics on the first --n flat CounterFact cases, edited as one batch: ES/PS/NS (edit_common.score).

    .venv/bin/python benchmarks/smollm2_memit_sweep.py --n 20
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
from edit_common import RESULTS, load_cases, score, stats_for, write_json

from fastedit.arch import arch_for, restore_mlp_out, snapshot_mlp_out
from fastedit.editing.context import context_templates
from fastedit.editing.engine import apply_edit
from fastedit.editing.hparams import load_hparams
from fastedit.editing.values import compute_values, edit_site, site_start_layer
from fastedit.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--lams", type=float, nargs="+", default=[2000, 5000, 15000])
    ap.add_argument("--clamps", type=float, nargs="+", default=[4.0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.5])
    ap.add_argument("--steps", type=int, nargs="+", default=[25])
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--out", default=str(RESULTS / "smollm2_memit_sweep.json"))
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    base = load_hparams("memit", model).replace(v_mode=args.mode)
    spec = arch_for(model)
    stats = stats_for(model, tok, list(base.layers))
    requests, records = load_cases(args.n)
    rows = [{"setting": "unedited", **score(model, tok, records)}]
    print(rows[0], flush=True)
    contexts = context_templates(model, tok, seeds=base.context_seeds, length=base.context_length)
    site = edit_site(spec, base)
    snapshot = snapshot_mlp_out(model, spec, base.layers)
    for clamp, lr, steps in itertools.product(args.clamps, args.lrs, args.steps):
        hp = base.replace(clamp_norm_factor=clamp, v_lr=lr, v_num_grad_steps=steps)
        t0 = time.perf_counter()
        values = compute_values(
            model, tok, spec, requests, site=site, layer=site_start_layer(spec, hp), contexts=contexts, hp=hp
        )
        v_seconds = time.perf_counter() - t0
        for lam in args.lams:
            hp_l = hp.replace(mom2_update_weight=lam)
            apply_edit(model, tok, requests, method="memit", hparams=hp_l, stats=stats, values=values)
            row = {"lambda": lam, "clamp": clamp, "lr": lr, "steps": steps, **score(model, tok, records)}
            row["v_seconds_per_request"] = round(v_seconds / len(requests), 2)
            restore_mlp_out(model, spec, snapshot)
            rows.append(row)
            print(row, flush=True)
    result = {"model": "smollm2-135m", "n": args.n, "mode": args.mode, "layers": list(base.layers), "rows": rows}
    out = RESULTS / os.path.basename(args.out)
    write_json(out, result)
    print(f"{'λ':>7} {'clamp':>5} {'lr':>4} {'steps':>5} {'ES':>5} {'PS':>5} {'NS':>5} {'Score':>5}")
    for r in rows[1:]:
        print(
            f"{r['lambda']:>7.0f} {r['clamp']:>5} {r['lr']:>4} {r['steps']:>5} "
            f"{r['es']:>5} {r['ps']:>5} {r['ns']:>5} {r['score']:>5}"
        )
    print(f"unedited NS {rows[0]['ns']}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
