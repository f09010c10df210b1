"""Size of a 40-edit patch on SmolLM2-135M: full originals (the old format) vs the revert residue (default).

The factors are random rank-40 matrices at the MEMIT layers of hparams/memit/smollm2-135m.json on the real
weights, scaled so that ‖ΔW‖_F = rel·‖W‖_F per layer: the file size depends on the shapes, the rank and how
many weights the rounding of W + ΔW touches (which grows with rel), not on what the edit teaches. Each patch is
applied and reverted once to check the revert is bit-exact.

    .venv/bin/python benchmarks/patch_size.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fastedit.arch import arch_for, mlp_out_matrix, snapshot_mlp_out
from fastedit.editing.hparams import load_hparams
from fastedit.editing.patch import apply_patch, make_patch, revert_patch
from fastedit.models import load_model

RANK = 40  # 40 edits in one batch give ΔW of rank <= 40
RELATIVE_SIZES = (0.01, 0.1, 0.5)
RESULTS = Path(__file__).resolve().parent / "results" / "patch_size_smollm2-135m.json"


def random_factors(model, layers: list[int], rel: float) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    spec = arch_for(model)
    g = torch.Generator().manual_seed(0)
    factors = {}
    for layer in layers:
        w = mlp_out_matrix(model, spec, layer)  # (d_model, d_k)
        a = torch.randn(w.shape[0], RANK, generator=g)
        b = torch.randn(w.shape[1], RANK, generator=g)
        factors[layer] = (a * (rel * w.norm() / (a @ b.T).norm()), b)
    return factors


def main() -> None:
    model, _ = load_model("smollm2-135m")
    layers = list(load_hparams("memit", model).layers)
    originals = snapshot_mlp_out(model, arch_for(model), layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rel in RELATIVE_SIZES:
            factors = random_factors(model, layers, rel)
            row: dict = {"relative_delta": rel}
            for store in (True, False):
                patch = make_patch(model, factors, originals, store_originals=store, method="memit")
                path = patch.save(Path(tmp) / f"{rel}-{store}.safetensors")
                apply_patch(model, path)
                revert_patch(model, path)
                assert all(torch.equal(mlp_out_matrix(model, arch_for(model), l), originals[l]) for l in layers)
                key = "full_originals" if store else "residue"
                row[f"{key}_mb"] = round(path.stat().st_size / 1e6, 3)
                if not store:
                    n = sum(patch.residue[l][0].numel() for l in layers)
                    row["residue_entries"] = n
                    row["residue_fraction"] = round(n / sum(originals[l].numel() for l in layers), 4)
            rows.append(row)
            print(row)
    factors_mb = sum(a.numel() + b.numel() for a, b in factors.values()) * 4 / 1e6
    result = {"model": "smollm2-135m", "layers": layers, "rank": RANK, "factors_mb": round(factors_mb, 3), "rows": rows}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
