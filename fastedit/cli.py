"""The `fastedit` command line: each command parses its options and calls one library function."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from fastedit import __version__
from fastedit.editing.hparams import METHODS
from fastedit.errors import FasteditError
from fastedit.models import DEFAULT_MODEL
from fastedit.sae.model import ARCHS as SAE_ARCHS


class _Group(click.Group):
    """A group that turns fastedit's own errors into one line on stderr and exit code 1 (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FasteditError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastedit")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only, no progress bars.")
def cli(verbose: int, quiet: bool) -> None:
    """Edit facts in language models with minimal precomputation (ROME, MEMIT, EMMET, AlphaEdit)."""
    from fastedit.progress import set_enabled

    # fastedit's own info lines by default (what runs, where results go); -q: warnings only and no bars;
    # -v: other libraries' info too; -vv: debug everywhere
    root = logging.WARNING if quiet or verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=root, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastedit").setLevel(logging.WARNING if quiet else min(root, logging.INFO))
    set_enabled(not quiet)
    if quiet:
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if verbose < 2:
        for noisy in ("transformers", "huggingface_hub", "datasets", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def placement_options(command: Any) -> Any:
    """--device and --dtype, for every command that loads a model."""
    command = click.option(
        "--dtype",
        type=click.Choice(["float32", "bfloat16", "float16", "float64"]),
        help="Weights' dtype (default float32; bfloat16 halves the memory of large models).",
    )(command)
    return click.option("--device", help="auto (default: CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.")(command)


# ---- arch ----------------------------------------------------------------------------------------------


@cli.group()
def arch() -> None:
    """The layer-hook registry: where each model family keeps its modules."""


@arch.command("list")
def arch_list() -> None:
    """List the registered model families and their module templates."""
    from fastedit.arch.describe import describe_registry

    click.echo(describe_registry())


@arch.command("show")
@click.argument("model")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run (hub models).")
def arch_show(model: str, trust_remote_code: bool) -> None:
    """Resolve MODEL's module paths and sizes from its config (weights are not loaded)."""
    from fastedit.arch.describe import describe_model

    click.echo(describe_model(model, trust_remote_code=trust_remote_code))


# ---- edit ----------------------------------------------------------------------------------------------


@cli.command("edit")
@click.argument("file")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model alias, hub id, folder or .gguf.")
@click.option("--method", type=click.Choice(list(METHODS)), default="memit", show_default=True)
@click.option(
    "--hparams",
    type=click.Path(dir_okay=False),
    help="Hparams JSON (default: hparams/<method>/<model>), or a shipped variant of that file by name (e.g. fast).",
)
@click.option("--n", type=click.IntRange(min=1), help="Edit only the first N valid requests.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Requests per closed-form solve (default: all).")
@click.option("--dm", default="10", show_default=True, help="Covariance keys per layer N = dm·d_k, or 'full'.")
@click.option("--corpus", help="Covariance corpus if not cached: file, folder, data set, HF name:config, 'model'.")
@click.option("--stats-dir", type=click.Path(file_okay=False), help="Covariance cache folder (default: cache).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: runs/<time>-<model>-<method>).")
@click.option("--save-patch", type=click.Path(dir_okay=False), help="Also write the patch here (.safetensors).")
@click.option("--save-model", type=click.Path(file_okay=False), help="Write the edited model (save_pretrained).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out run folder and --save-patch file.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--skip-invalid", is_flag=True, help="Drop invalid records (listed in run.json) instead of failing.")
@click.option("--fluency", is_flag=True, help="Also measure generation fluency (n-gram entropy; slow).")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run (hub models).")
@click.option(
    "--targets-cache", type=click.Path(file_okay=False), help="Folder of cached v* targets (default: fastedit cache)."
)
@click.option("--no-targets-cache", is_flag=True, help="Always optimise v*; neither read nor write cached targets.")
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Local processes sharing the v* requests and the evaluation (each with cores/N threads).",
)
@placement_options
def edit_cmd(file: str, model: str, no_targets_cache: bool, **options: Any) -> None:
    """Edit the facts in FILE (CounterFact, zsRE or plain JSON, or a data-set name such as counterfact),
    evaluate before/after, write the run folder. Under torchrun the ranks share the work the same way."""
    from fastedit.editing.run import EditRunOptions, run_edit

    if no_targets_cache:
        options["targets_cache"] = ""
    report = run_edit(EditRunOptions(file=file, model=model, **options))
    if report.table:  # rank 0 of a process group prints; the other ranks stay silent
        click.echo(report.table)


# ---- precompute ----------------------------------------------------------------------------------------


def _parse_layers(_ctx: Any, _param: Any, value: str | None) -> list[int] | None:
    """ "4,5,6" or "4-8" (or a mix) -> [4, 5, 6, ...]."""
    if value is None:
        return None
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in value.split(","))):
            lo, sep, hi = part.partition("-")
            if not sep:
                layers.append(int(part))
                continue
            if not lo or not hi:
                raise ValueError
            if int(lo) > int(hi):
                raise click.BadParameter(f"{value!r}: the range {part} is reversed; write {hi}-{lo}")
            layers += list(range(int(lo), int(hi) + 1))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use layer indices like 4,5,6 or a range like 4-8") from None
    if not layers:
        raise click.BadParameter(f"{value!r} names no layer; use layer indices like 4,5,6 or a range like 4-8")
    return layers


@cli.command("precompute")
@click.option(
    "--model", "model", default=DEFAULT_MODEL, show_default=True, help="Model alias, hub id, folder or .gguf."
)
@click.option("--dm", default="10", show_default=True, help="Keys per layer N = dm·d_k (2-10 typical), or 'full'.")
@click.option(
    "--layers", callback=_parse_layers, help="Layers, e.g. 4,5,6 or 4-8 (default: the family's MEMIT layers)."
)
@click.option("--hparams", type=click.Path(dir_okay=False), help="Take the layers from this hparams JSON file.")
@click.option(
    "--corpus",
    help="Local .txt/.jsonl/.parquet file or folder, data set (wikitext-2), HF dataset name:config, or 'model' "
    "(default: the wikitext-2 data set if present, else text sampled from the model).",
)
@click.option(
    "--eps", type=float, help="Also report cond(C0 + ε·I), ε = EPS × C0's mean eigenvalue (the editors' rel_eps)."
)
@click.option("--batch-tokens", type=click.IntRange(min=1), default=4096, show_default=True, help="Tokens per forward.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per row.")
@click.option("--seed", type=int, default=0, show_default=True, help="Corpus order / sampling seed.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the cache files (default: fastedit cache).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its partial sums.")
@placement_options
def precompute_cmd(
    model: str,
    dm: str,
    layers: list[int] | None,
    hparams: str | None,
    corpus: str | None,
    eps: float | None,
    batch_tokens: int,
    seq_len: int,
    seed: int,
    out: str | None,
    resume: bool,
    device: str | None,
    dtype: str | None,
) -> None:
    """Precompute the key second moments C0 of MODEL's MLP output projections (cached per layer)."""
    from fastedit.stats.command import precompute

    report = precompute(
        model, dm=dm, layers=layers, hparams=hparams, corpus=corpus, eps=eps, batch_tokens=batch_tokens,
        seq_len=seq_len, out=out, resume=resume, seed=seed, device=device, dtype=dtype,
    )  # fmt: skip
    if report.summary():
        click.echo(report.summary())


# ---- patch / export ---------------------------------------------------------------------------------------

_OUT_HELP = "Folder to write (refused if it exists, unless --overwrite)."
_DTYPE = click.Choice(["float32", "bfloat16", "float16"])


@cli.group()
def patch() -> None:
    """Edit patches (.safetensors from `fastedit edit`): show, apply to a model, revert."""


@patch.command("show")
@click.argument("patch_file", type=click.Path(dir_okay=False))
def patch_show(patch_file: str) -> None:
    """Summarise PATCH_FILE: method, model, requests, layers, ranks and ΔW norms."""
    from fastedit.export import describe_patch

    click.echo(describe_patch(patch_file))


@patch.command("apply")
@click.argument("patch_file", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="The model the patch was made for (alias, hub id, folder, .gguf).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help=_OUT_HELP)
@click.option("--dtype", type=_DTYPE, default="float32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def patch_apply(patch_file: str, model: str, out: str, dtype: str, overwrite: bool) -> None:
    """Apply PATCH_FILE to MODEL and save the edited model folder (transformers save_pretrained)."""
    from fastedit.export import apply_to_folder

    click.echo(f"written: {apply_to_folder(patch_file, model, out, dtype=dtype, overwrite=overwrite)}")


@patch.command("revert")
@click.argument("patch_file", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="A model carrying the patch (e.g. a folder from `patch apply`).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help=_OUT_HELP)
@click.option("--dtype", type=_DTYPE, default="float32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def patch_revert(patch_file: str, model: str, out: str, dtype: str, overwrite: bool) -> None:
    """Revert PATCH_FILE from MODEL (bit-exact) and save the restored model folder."""
    from fastedit.export import revert_to_folder

    click.echo(f"written: {revert_to_folder(patch_file, model, out, dtype=dtype, overwrite=overwrite)}")


@cli.command("export")
@click.argument("patch_file", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="The model the patch was made for (alias, hub id, folder, .gguf).",
)
@click.option("--out", required=True, type=click.Path(), help="Output folder (or a .gguf file for --format gguf).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "peft", "gguf"]),
    default="hf",
    show_default=True,
    help="hf: edited transformers folder; peft: LoRA adapter for the unedited model; gguf: edited GGUF copy.",
)
@click.option("--dtype", type=_DTYPE, default="float32", show_default=True, help="Weights dtype (hf, peft).")
@click.option(
    "--gguf-f32", is_flag=True, help="gguf: store edited tensors as F32 (exact) instead of the file's own type."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def export_cmd(patch_file: str, model: str, out: str, fmt: str, dtype: str, gguf_f32: bool, overwrite: bool) -> None:
    """Export the edit in PATCH_FILE for transformers, peft or llama.cpp (GGUF)."""
    from fastedit.export import export_patch

    written = export_patch(
        patch_file, model, out, format=fmt, dtype=dtype, requantize=not gguf_f32, overwrite=overwrite
    )
    click.echo(f"written: {written}")


# ---- sae / unlearn (SAE features and unlearning) ---------------------------------------------------------


@cli.group()
def sae() -> None:
    """Sparse autoencoders on the registry's hooks (SAELens layout)."""


@sae.command("train")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model alias, hub id, folder or .gguf.")
@click.option("--layer", type=int, required=True, help="Residual stream after this block (or its MLP output).")
@click.option(
    "--arch",
    type=click.Choice(list(SAE_ARCHS)),
    default="topk",
    show_default=True,
)
@click.option("--width", type=click.IntRange(min=1), help="Number of features (default 8 × d_model).")
@click.option("--tokens", type=click.IntRange(min=1), default=100_000, show_default=True, help="Training tokens.")
@click.option("--k", type=click.IntRange(min=1), default=32, show_default=True, help="Active features (TopK).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--l1", type=float, default=0.04, show_default=True, help="L1 coefficient (ReLU activations).")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Passes over the tokens.")
@click.option("--site", type=click.Choice(["resid_post", "mlp_out"]), default="resid_post", show_default=True)
@click.option(
    "--corpus",
    help="Text corpus: .txt/.jsonl/.parquet file or folder, datasets folder, data-set name, HF name:config "
    "(default: the wikitext-2 data set).",
)
@click.option("--forget-topic", help="CounterFact topic whose statements feed the variants' forget objectives.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the SAELens-layout SAE.")
@click.option("--overwrite", is_flag=True, help="Replace an existing SAE folder at --out.")
@placement_options
def sae_train_cmd(
    model: str,
    layer: int,
    arch: str,
    width: int | None,
    tokens: int,
    k: int,
    lr: float,
    l1: float,
    epochs: int,
    site: str,
    corpus: str | None,
    forget_topic: str | None,
    out: str,
    overwrite: bool,
    device: str | None,
    dtype: str | None,
) -> None:
    """Train an SAE on MODEL's activations at LAYER and save it to OUT (cfg.json + safetensors)."""
    import json

    from fastedit.sae.api import train_sae

    result = train_sae(
        model,
        layer,
        out,
        arch=arch,
        width=width,
        tokens=tokens,
        site=site,
        corpus=corpus,
        forget_topic=forget_topic,
        k=k,
        lr=lr,
        l1=l1,
        epochs=epochs,
        overwrite=overwrite,
        device=device,
        dtype=dtype,
    )
    result.pop("train", None)
    click.echo(json.dumps(result, indent=2))


@sae.command("eval")
@click.argument("folder", type=click.Path())
@click.option("--model", help="Override the model named in cfg.json.")
@click.option("--corpus", help="Text corpus as for sae train; its held-out 10% of documents is used.")
@click.option("--tokens", type=click.IntRange(min=1), default=20_000, show_default=True)
@placement_options
def sae_eval_cmd(
    folder: str, model: str | None, corpus: str | None, tokens: int, device: str | None, dtype: str | None
) -> None:
    """L0, explained variance and CE-loss recovered of the SAE in FOLDER (fastedit or SAELens layout)."""
    import json

    from fastedit.sae.api import eval_sae

    result = eval_sae(folder, model=model, corpus=corpus, tokens=tokens, device=device, dtype=dtype)
    click.echo(json.dumps(result, indent=2))


@cli.command("unlearn")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model alias, hub id, folder or .gguf.")
@click.option("--sae", "saes", multiple=True, required=True, type=click.Path(), help="SAE folder (repeatable).")
@click.option("--forget-topic", default="languages", show_default=True, help="CounterFact topic to forget.")
@click.option("--editors", default="memit,emmet", show_default=True, help="Editing rows (comma list, '' for none).")
@click.option(
    "--editor-hparams",
    "editor_hparams",
    multiple=True,
    metavar="METHOD=FILE",
    help="Hparams file of an editing row (repeatable; default: the model's file in hparams/).",
)
@click.option("--max-forget", type=click.IntRange(min=1), default=40, show_default=True)
@click.option(
    "--retain-questions",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Retain questions, spread evenly over the other topics.",
)
@click.option(
    "--retain-max-drop",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.01,
    show_default=True,
    help="Retain gate: share of retain answers that may flip (0.01 of 300 = 3).",
)
@click.option(
    "--candidates", type=click.IntRange(min=1), default=200, show_default=True, help="Most cases scored per topic."
)
@click.option("--counterfact", help="Flat CounterFact file or data-set name (default: the counterfact data set).")
@click.option(
    "--corpus", help="Retain corpus (file, folder, datasets folder, data-set name, HF name:config; default wikitext-2)."
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for unlearning.json + plot.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier result in --out.")
@placement_options
def unlearn_cmd(
    model: str,
    saes: tuple[str, ...],
    forget_topic: str,
    editors: str,
    editor_hparams: tuple[str, ...],
    max_forget: int,
    retain_questions: int,
    retain_max_drop: float,
    candidates: int,
    counterfact: str | None,
    corpus: str | None,
    out: str,
    overwrite: bool,
    device: str | None,
    dtype: str | None,
) -> None:
    """Compare SAE feature clamping with MEMIT/EMMET edits at forgetting one CounterFact topic."""
    from fastedit.sae.unlearn import UnlearnConfig, run_unlearning

    files = {}
    for item in editor_hparams:
        method, sep, path = item.partition("=")
        if not sep or not path:
            raise click.BadParameter(
                f"{item!r}: write METHOD=FILE, e.g. memit=hparams.json", param_hint="--editor-hparams"
            )
        files[method] = path
    cfg = UnlearnConfig(
        forget_topic=forget_topic,
        editors=[e for e in editors.split(",") if e],
        editor_hparams=files,
        max_forget=max_forget,
        retain_questions=retain_questions,
        retain_max_drop=retain_max_drop,
        candidates_per_topic=candidates,
        counterfact=counterfact or "",
        corpus=corpus or "",
    )
    result = run_unlearning(model, list(saes), out, config=cfg, overwrite=overwrite, device=device, dtype=dtype)
    written = ", ".join(f"{out}/{name}" for name in ("unlearning.json", "table.md", "unlearning.png"))
    click.echo(f"{result['split']['summary']}\n\n{result['table']}\n\nwritten: {written}")


# ---- data ----------------------------------------------------------------------------------------------


@cli.group()
def data() -> None:
    """Data sets by name (counterfact, counterfact-original, zsre, wikitext-2) in $FASTEDIT_DATA."""


@data.command("list")
def data_list() -> None:
    """Every known data set: present (size, sha256) or missing (how to get it)."""
    from fastedit.data import describe, list_datasets

    click.echo(describe(list_datasets()))


@data.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(dir_okay=False))
def data_add(name: str, path: str) -> None:
    """Copy the local file PATH into the data directory as data set NAME (its layout is checked first)."""
    from fastedit.data import add_dataset, describe

    click.echo(describe([add_dataset(name, path)], header=False))


@data.command("fetch")
@click.argument("name")
def data_fetch(name: str) -> None:
    """Download data set NAME from its public source (needs the network)."""
    from fastedit.data import describe, fetch_dataset

    click.echo(describe([fetch_dataset(name)], header=False))


def main() -> None:
    cli(prog_name="fastedit")


if __name__ == "__main__":
    main()
