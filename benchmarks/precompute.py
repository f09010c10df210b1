"""Benchmark of `fastedit precompute` on the two real models at d_m 2 and 10.

For each (model, d_m): tokens, wall seconds of the whole precomputation (`run_stats` into an empty folder:
tokenising, the pass, κ(C0), writing), the pass alone (one early-stopped forward per batch + Σ k kᵀ: a float32
product per batch summed in float64), a bare forward over the same batches stopped at the same module (no
capture, no accumulation), their ratio (target <= 1.15), the accumulation time alone, the same pass with every
product in float64 (the old path) and its ratio, the largest relative Frobenius distance between the two C0
(target <= 1e-6), and the process's peak RSS so far. ``--n`` caps the keys per layer (a quick check).
With --with-full: κ(C0) at one SmolLM2 layer for d_m 2, 10 and the whole WikiText-2 test file (~3.5 min).

    .venv/bin/python benchmarks/precompute.py [--with-full] [--models smollm2-135m,gemma3-270m] [--n 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from fastedit.arch import arch_for, mlp_out_matrix, model_device, stop_after
from fastedit.data import dataset_path, sha256_of
from fastedit.models import load_model
from fastedit.stats import default_layers, run_stats
from fastedit.stats.accumulate import SecondMoment, accumulate
from fastedit.stats.corpus import resolve_corpus
from fastedit.stats.precompute import DEFAULT_BATCH_TOKENS, DEFAULT_SEQ_LEN, n_keys
from fastedit.stats.tokens import make_batches, plan_rows

WIKITEXT = "wikitext-2"  # the data set (`fastedit data add wikitext-2 FILE`)
RESULTS = Path(__file__).resolve().parent / "results" / "precompute.json"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def bare_forward(model, spec, layer: int, batches) -> float:
    device = model_device(model)
    start = time.perf_counter()
    for batch in batches:
        with stop_after(model, spec.path("mlp_out", layer)):
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    return time.perf_counter() - start


def timed_pass(model, spec, layers: list[int], d_k: int, n: int, batches, exact: bool) -> tuple[dict, float, float]:
    """(moments, seconds of the pass, seconds of the accumulation alone)."""
    moments = {layer: SecondMoment(d_k, n, exact=exact) for layer in layers}
    start = time.perf_counter()
    accumulate(model, spec, moments, batches, progress=False)
    return moments, time.perf_counter() - start, sum(m.seconds for m in moments.values())


def bench(name: str, dms: list[float], cap: int | None = None) -> list[dict]:
    model, tok = load_model(name)
    spec = arch_for(model)
    layers, source = default_layers(model, spec, name)
    d_k = int(mlp_out_matrix(model, spec, layers[0]).shape[1])
    rows_out = []
    for dm in dms:
        n = n_keys(dm, d_k) if cap is None else min(cap, n_keys(dm, d_k))
        rows = plan_rows(tok, resolve_corpus(WIKITEXT, model, tok).documents(0), n, DEFAULT_SEQ_LEN)
        batches = make_batches(rows, DEFAULT_BATCH_TOKENS, DEFAULT_SEQ_LEN, tok.pad_token_id or 0)
        bare_forward(model, spec, max(layers), batches[:1])  # warm-up
        bare = bare_forward(model, spec, max(layers), batches)
        moments, pass_s, acc = timed_pass(model, spec, layers, d_k, n, batches, exact=False)
        exact, pass64_s, acc64 = timed_pass(model, spec, layers, d_k, n, batches, exact=True)
        agreement = max(float((moments[l].sum - exact[l].sum).norm() / exact[l].sum.norm()) for l in layers)
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            run_dm = dm if cap is None else n / d_k  # N = n keys
            run = run_stats(model, tok, layers, dm=run_dm, corpus=WIKITEXT, out=out, model_name=name, progress=False)
            wall = time.perf_counter() - start
        conds = {layer: float(run.stats[layer].metadata["condition_number"]) for layer in layers}
        row = {
            "model": name,
            "layers": layers,
            "layers_from": source.replace(str(Path(__file__).resolve().parents[1]) + "/", ""),  # no machine paths
            "d_k": d_k,
            "dm": dm,
            "tokens": n,
            "wall_s": round(wall, 2),
            "tokens_per_s": round(n / wall, 1),
            "pass_s": round(pass_s, 2),
            "bare_forward_s": round(bare, 2),
            "ratio_pass_to_bare": round(pass_s / bare, 3),
            "accumulate_s": round(acc, 2),
            "accumulate_share_of_pass": round(acc / pass_s, 3),
            "float64_pass_s": round(pass64_s, 2),
            "float64_ratio_pass_to_bare": round(pass64_s / bare, 3),
            "float64_accumulate_s": round(acc64, 2),
            "c0_rel_frobenius_float32_vs_float64": float(f"{agreement:.3g}"),
            "peak_rss_mb": round(peak_rss_mb()),
            "condition_numbers": {str(k): float(f"{v:.4g}") for k, v in conds.items()},
        }
        rows_out.append(row)
        print(
            f"{name:14} d_m {dm:>4g}  N {n:>6}  wall {wall:6.1f} s  {n / wall:7.0f} tok/s  pass {pass_s:6.1f} s  "
            f"bare {bare:6.1f} s  ratio {pass_s / bare:5.2f} (all-float64 {pass64_s / bare:5.2f})  "
            f"accumulate {acc:5.1f} s ({acc / pass_s:4.0%})  C0 f32 vs f64 {agreement:.1e}  "
            f"RSS {peak_rss_mb():6.0f} MB",
            flush=True,
        )
    return rows_out


def full_vs_dm(name: str = "smollm2-135m", layer: int = 4) -> dict:
    """κ(C0) at one layer for d_m 2, 10 and the whole file, and each C0's distance to the full one."""
    model, tok = load_model(name)
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        stats = {}
        for dm in (2, 10, "full"):
            start = time.perf_counter()
            stats[dm] = run_stats(model, tok, [layer], dm=dm, corpus=WIKITEXT, out=folder, progress=False).stats[layer]
            out[str(dm)] = {
                "tokens": stats[dm].count,
                "condition_number": float(stats[dm].metadata["condition_number"]),
                "seconds": round(time.perf_counter() - start, 1),
            }
        full = stats["full"].mean
        for dm in (2, 10):
            out[str(dm)]["rel_diff_to_full"] = float((stats[dm].mean - full).norm() / full.norm())
    for dm, row in out.items():
        print(
            f"{name} layer {layer} d_m {dm:>4}: N {row['tokens']:>7}  cond(C0) {row['condition_number']:.3g}",
            flush=True,
        )
    return {"model": name, "layer": layer, "by_dm": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--dms", default="2,10")
    parser.add_argument("--with-full", action="store_true", help="also κ(C0) on the whole WikiText-2 test file")
    parser.add_argument("--n", type=int, help="at most this many keys per layer (a quick check of the script)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file to write")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows += bench(name, [float(x) for x in args.dms.split(",")], args.n)
    result = {
        "threads": torch.get_num_threads(),
        "corpus": f"{WIKITEXT} sha256:{sha256_of(dataset_path(WIKITEXT))}",
        "runs": rows,
    }
    if args.with_full:
        result["full_vs_dm"] = full_vs_dm()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
