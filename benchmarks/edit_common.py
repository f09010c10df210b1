"""Shared helpers of the editing benchmarks: CounterFact flat cases as requests, C0, and a tiny ES/PS/NS scorer.

The scorer follows DESIGN.md: a prompt's score for a target is the mean per-token NLL of " " + target (teacher
forced); ES = share of cases with P(new) > P(true) on the rewrite prompt, PS the same on ``rephrase_prompt``, NS =
share with P(locality_ground_truth) > P(new) on ``locality_prompt``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastedit.atomic import write_text, write_with
from fastedit.data import KNOWN, dataset_path, sha256_of
from fastedit.requests import EditRequest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Data sets by name, from the data directory (`fastedit data add counterfact FILE`, `... wikitext-2 FILE`);
# results record the name and the file's sha256 (`data_ids`), never a path.
COUNTERFACT = "counterfact"
WIKITEXT = "wikitext-2"
RESULTS = Path(__file__).resolve().parent / "results"


def benchmark_parser(
    name: str, doc: str, *, model: str = "smollm2-135m", runs_in_process: bool = True
) -> argparse.ArgumentParser:
    """The options the editing benchmarks share (--model, --requests, --out and, when the benchmark runs the
    model in its own process, --eval-batch-size and --threads); ``name`` names the default result file."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default=model)
    ap.add_argument("--requests", default=COUNTERFACT, help="data set name or requests file")
    ap.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/{name}_<model>.json)")
    if runs_in_process:
        ap.add_argument("--eval-batch-size", type=int, default=16)
        ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.set_defaults(result_name=name)
    return ap


def parse_benchmark_args(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path]:
    """(options, result JSON path) of a `benchmark_parser`; sets the torch threads when --threads is given."""
    args = ap.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS / f"{args.result_name}_{Path(args.model).name}.json"
    return args, out


def load_cases(n: int, start: int = 0) -> tuple[list[EditRequest], list[dict[str, Any]]]:
    records = json.loads(dataset_path(COUNTERFACT).read_text())[start : start + n]
    requests = [
        EditRequest(
            case_id=str(r["case_id"]),
            prompt=r["prompt"].replace(r["subject"], "{}", 1),
            subject=r["subject"],
            target_new=r["target_new"],
            target_true=r["ground_truth"],
        )
        for r in records
    ]
    return requests, records


def stats_for(
    model: Any, tokenizer: Any, layers: list[int], dm: float = 10, corpus: str = WIKITEXT
) -> dict[int, torch.Tensor]:
    """C0 per layer (cached, else computed from ``corpus``: a data-set name or a file)."""
    from fastedit.stats import ensure_stats

    stats = ensure_stats(model, tokenizer, layers, dm=dm, corpus=corpus, progress=False)
    return {layer: stats[layer].mean for layer in layers}


def data_id(name_or_path: str) -> str:
    """How results name an input: a data set as "name sha256:<digest>", anything else as given."""
    if name_or_path in KNOWN:
        return f"{name_or_path} sha256:{sha256_of(dataset_path(name_or_path))}"
    return str(name_or_path)


@torch.no_grad()
def nll(model: Any, tokenizer: Any, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """Mean per-token NLL of " " + target after each prompt, (n,)."""
    out = []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt).input_ids
        t = tokenizer(" " + target, add_special_tokens=False).input_ids
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + t[:-1]])).logits[0].float(), -1)
        out.append(-sum(logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(t)) / len(t))
    return torch.tensor(out)


def score(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> dict[str, float]:
    new = [r["target_new"] for r in records]
    true = [r["ground_truth"] for r in records]
    rewrite = [r["prompt"] for r in records]
    para = [r["rephrase_prompt"] for r in records]
    loc = [r["locality_prompt"] for r in records]
    es = (nll(model, tokenizer, rewrite, new) < nll(model, tokenizer, rewrite, true)).float().mean()
    ps = (nll(model, tokenizer, para, new) < nll(model, tokenizer, para, true)).float().mean()
    loc_true = [r["locality_ground_truth"] for r in records]
    ns = (nll(model, tokenizer, loc, loc_true) < nll(model, tokenizer, loc, new)).float().mean()
    es, ps, ns = (100 * float(x) for x in (es, ps, ns))
    hm = 3 / sum(1 / max(x, 1e-9) for x in (es, ps, ns))
    return {"es": round(es, 1), "ps": round(ps, 1), "ns": round(ns, 1), "score": round(hm, 1)}


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically (``fastedit.atomic``: never a half-written result)."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def values_in_workers(
    model: str, requests: str, n: int, hp: Any, contexts: list[str], workers: int, threads: int
) -> tuple[Any, float]:
    """(v* targets, wall seconds of v* alone) from ``workers`` local processes of ``threads`` torch threads each,
    every one loading ``model`` and the first ``n`` requests of ``requests`` and optimising its share
    (`compute_values` across ranks); the seconds run from a barrier after loading to the gathered targets."""
    from fastedit.editing.workers import run_in_workers

    with tempfile.TemporaryDirectory(prefix="edit-speed-") as folder:
        run_in_workers(_values_job, (model, requests, n, hp, contexts, threads, folder), workers)
        saved = torch.load(Path(folder) / "values.pt", weights_only=False)
    return saved["values"], saved["seconds"]


def _values_job(arg: tuple) -> None:
    import torch.distributed as dist

    from fastedit.arch import arch_for
    from fastedit.editing.values import compute_values, edit_site, site_start_layer
    from fastedit.models import load_model
    from fastedit.requests import load_requests

    name, source, n, hp, contexts, threads, folder = arg
    torch.set_num_threads(threads)
    model, tok = load_model(name)
    spec = arch_for(model)
    requests = load_requests(source, n=n).requests
    dist.barrier()
    start = time.perf_counter()
    values = compute_values(
        model, tok, spec, requests, site=edit_site(spec, hp), layer=site_start_layer(spec, hp), contexts=contexts,
        hp=hp, across_ranks=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        torch.save({"values": values.to("cpu"), "seconds": seconds}, Path(folder) / "values.pt")
