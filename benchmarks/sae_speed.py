"""SAE pipeline speed on a real model: activation capture (tok/s), training step time, one clamp-config evaluation.

    .venv/bin/python benchmarks/sae_speed.py --model gemma3-270m --layer 6 --width 5120

Prints a table and writes benchmarks/results/sae_speed-<model>.json. Use it to size `fastedit unlearn` runs:
a run costs ≈ (questions scoring per clamp config) × (unique configs, ≤ 32 per SAE) + frequency passes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastedit.models import load_model
from fastedit.sae.activations import read_corpus, stream_activations
from fastedit.sae.io import SAEInfo
from fastedit.sae.questions import accuracy_flags, read_counterfact
from fastedit.sae.train import TrainConfig, Trainer
from fastedit.sae.unlearn import _Mask, clamp_features


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--width", type=int, default=5120)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--questions", type=int, default=50)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    text = read_corpus(part="train")

    t = time.perf_counter()
    acts = torch.cat(list(stream_activations(model, tok, text, args.layer, max_tokens=args.tokens, progress=False)))
    capture_s = time.perf_counter() - t

    trainer = Trainer(TrainConfig(arch="topk", width=args.width), acts.shape[1], acts, 100)
    t = time.perf_counter()
    for i in range(5):
        trainer.train_step(acts[i * 1024 % max(1, len(acts) - 1024) :][:1024])
    step_s = (time.perf_counter() - t) / 5

    qs = read_counterfact()[: args.questions]
    t = time.perf_counter()
    accuracy_flags(model, tok, qs)
    plain_s = time.perf_counter() - t
    sae, mask = trainer.sae.eval().requires_grad_(False), _Mask()
    t = time.perf_counter()
    with clamp_features(model, sae, SAEInfo(args.model, args.layer), torch.arange(20), torch.full((20,), 50.0), mask):
        accuracy_flags(model, tok, qs, set_mask=mask.set)
    clamp_s = time.perf_counter() - t

    rows = {
        "capture_tokens_per_s": len(acts) / capture_s,
        "train_step_s (batch 1024)": step_s,
        f"score {len(qs)} questions, s": plain_s,
        f"score {len(qs)} questions with clamp hook, s": clamp_s,
    }
    for k, v in rows.items():
        print(f"{k:45s} {v:10.2f}")
    out = Path(__file__).parent / "results" / f"sae_speed-{args.model}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "layer": args.layer, "width": args.width, **rows}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
