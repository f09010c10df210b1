"""SAELens-layout folders: ``cfg.json`` + ``sae_weights.safetensors`` + ``sparsity.safetensors``.

Saving folds the training normalisation into the weights (as SAELens' ``fold_activation_norm_scaling_factor``)
so ``W_enc, b_enc, W_dec, b_dec`` act on raw activations, and any SAELens reader gets a working ReLU / TopK SAE.
The exact fastedit state (factors, gates, thresholds, pruning mask) is stored alongside under ``fastedit.*``
keys, and ``cfg.json`` carries a ``fastedit`` section, so our own loader rebuilds every variant exactly.
Loading also accepts plain SAELens folders (architectures ``standard``, ``topk``, ``jumprelu``; hook names
``blocks.{L}.hook_resid_post`` / ``blocks.{L}.hook_mlp_out``, in old flat or new ``metadata`` cfg layouts).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fastedit.atomic import atomic_folder, save_safetensors, write_text
from fastedit.errors import FasteditError
from fastedit.sae.model import SAE, SAEConfig

SITES = {"resid_post": "block", "mlp_out": "mlp"}  # SAELens hook suffix -> registry kind
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|mlp_out)$")


class SAEFormatError(FasteditError):
    """An SAE folder that is not in the SAELens layout, or whose hook / sizes do not fit."""


@dataclass
class SAEInfo:
    """Where an SAE reads from and what it was trained on (the non-weight part of cfg.json)."""

    model_name: str
    layer: int
    site: str = "resid_post"  # "resid_post" (block output) or "mlp_out"
    context_size: int = 128
    prepend_bos: bool = True
    dataset_path: str = ""
    train: dict[str, Any] = field(default_factory=dict)  # resolved training config
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.site}"


def save_sae(
    sae: SAE,
    info: SAEInfo,
    folder: str | Path,
    sparsity: torch.Tensor,
    extra: dict[str, torch.Tensor] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the SAELens layout into ``folder``; ``sparsity`` = log10 firing frequency per feature (d_sae,).

    The files are written into a temp folder renamed into place at the end (an interrupt leaves ``folder``
    as it was); an existing non-empty ``folder`` is replaced only with ``overwrite``.
    """
    folder = Path(folder)
    s = sae.scale.detach()
    with torch.no_grad():
        folded = {
            "W_enc": sae.encoder() / s,
            "b_enc": sae.b_enc.clone(),
            "W_dec": sae.decoder() * s,
            "b_dec": sae.b_dec * s,
        }
        if sae.cfg.arch == "hiercontrastive" or (sae.alive < 1).any():
            folded["b_enc"] = torch.where(sae.alive > 0, sae.b_enc, torch.full_like(sae.b_enc, -1e4))
    state = {f"fastedit.{k}": v for k, v in sae.state_dict().items()}
    cfg = {
        "architecture": {"relu": "standard", "topk": "topk"}.get(sae.cfg.arch, "standard"),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "activation_fn_str": sae.cfg.activation,
        "activation_fn_kwargs": {"k": sae.cfg.k} if sae.cfg.activation == "topk" else {},
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "dtype": "float32",
        "device": "cpu",
        "model_name": info.model_name,
        "hook_name": info.hook_name,
        "hook_layer": info.layer,
        "hook_head_index": None,
        "context_size": info.context_size,
        "prepend_bos": info.prepend_bos,
        "dataset_path": info.dataset_path,
        "fastedit": {"sae": dataclasses.asdict(sae.cfg), "train": info.train, "metrics": info.metrics},
    }
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_safetensors(tmp / "sae_weights.safetensors", {**folded, **state})
        save_safetensors(tmp / "sparsity.safetensors", {"sparsity": sparsity, **(extra or {})})
        write_text(tmp / "cfg.json", json.dumps(cfg, indent=2))
    return folder


def _read_cfg(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise SAEFormatError(f"SAE folder {str(folder)!r} does not exist")
    missing = [n for n in ("cfg.json", "sae_weights.safetensors") if not (folder / n).exists()]
    if missing:
        raise SAEFormatError(
            f"{folder} is not an SAE folder in the SAELens layout: missing {', '.join(missing)} "
            "(expected cfg.json + sae_weights.safetensors [+ sparsity.safetensors])"
        )
    try:
        cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{folder}/cfg.json is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{folder}/cfg.json must hold a mapping")
    # New SAELens (>= 6) nests model/hook fields under "metadata".
    return {**cfg.get("metadata", {}), **cfg}


def load_sae(folder: str | Path) -> tuple[SAE, SAEInfo]:
    """Load an SAE folder written by fastedit or by SAELens."""
    folder = Path(folder)
    cfg = _read_cfg(folder)
    hook = _HOOK.match(str(cfg.get("hook_name", "")))
    if hook is None:
        raise SAEFormatError(
            f"{folder}/cfg.json: hook_name {cfg.get('hook_name')!r} is not supported; "
            "use blocks.<layer>.hook_resid_post or blocks.<layer>.hook_mlp_out"
        )
    weights = _read_tensors(folder / "sae_weights.safetensors")
    ours = cfg.get("fastedit")
    fe = ours.get("train", {}) if isinstance(ours, dict) else {}
    info = SAEInfo(
        model_name=str(cfg.get("model_name", "")),
        layer=int(hook.group(1)),
        site=hook.group(2),
        context_size=int(cfg.get("context_size") or 128),
        prepend_bos=bool(cfg.get("prepend_bos", True)),
        dataset_path=str(cfg.get("dataset_path", "")),
        train=fe,
        metrics=ours.get("metrics", {}) if isinstance(ours, dict) else {},
    )
    try:
        if isinstance(ours, dict) and any(k.startswith("fastedit.") for k in weights):
            sae = SAE(SAEConfig(**ours["sae"]))
            state = {k.removeprefix("fastedit."): v for k, v in weights.items() if k.startswith("fastedit.")}
            sae.load_state_dict(state)
            if sae.cfg.arch == "featureforget":
                sae.gating = True
            return sae.eval().requires_grad_(False), info
        return _load_saelens(folder, cfg, weights), info
    except (TypeError, KeyError, ValueError, RuntimeError) as exc:  # cfg.json and weights disagree
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SAEFormatError(f"{folder}: cfg.json and sae_weights.safetensors do not fit ({reason})") from None


def _load_saelens(folder: Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> SAE:
    arch = cfg.get("architecture", "standard")
    need = {"W_enc", "W_dec", "b_enc", "b_dec"}
    if arch not in ("standard", "topk", "jumprelu") or not need <= set(weights):
        raise SAEFormatError(
            f"{folder}: unknown SAE layout (architecture {arch!r}, tensors {sorted(weights)}); "
            "supported: SAELens standard / topk / jumprelu with W_enc, W_dec, b_enc, b_dec"
        )
    d_in, d_sae = weights["W_enc"].shape
    if weights["W_dec"].shape != (d_sae, d_in):
        raise SAEFormatError(f"{folder}: W_dec shape {tuple(weights['W_dec'].shape)} != ({d_sae}, {d_in})")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    topk = arch == "topk" or cfg.get("activation_fn_str") == "topk"
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, arch="topk" if topk else "relu", activation="topk" if topk else "relu"))
    if topk:
        sae.cfg.k = int(kwargs.get("k", cfg.get("k", 32)))
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(weights[name].float())
        if not cfg.get("apply_b_dec_to_input", True):
            # pre = x W_enc + b_enc  ==  (x − b_dec) W_enc + (b_enc + b_dec W_enc)
            sae.b_enc += weights["b_dec"].float() @ weights["W_enc"].float()
    if arch == "jumprelu":
        if "threshold" not in weights:
            raise SAEFormatError(f"{folder}: jumprelu SAE without a 'threshold' tensor")
        sae.threshold = weights["threshold"].float()
    return sae.eval().requires_grad_(False)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise SAEFormatError(f"{path} is not a readable safetensors file ({exc}); re-train or re-save it") from None


def load_sparsity(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / "sparsity.safetensors"
    return _read_tensors(path) if path.exists() else {}
