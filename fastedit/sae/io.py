"""SAELens-layout folders: ``cfg.json`` + ``sae_weights.safetensors`` + ``sparsity.safetensors``, loadable by
``sae_lens.SAE.load_from_disk`` as they are, plus ``fastedit_state.safetensors`` with fastedit's own state.

Saving folds the training normalisation into the weights (as SAELens' ``fold_activation_norm_scaling_factor``)
so ``W_enc, b_enc, W_dec, b_dec`` act on raw activations: ``cfg.json`` is the SAELens 6 layout (``metadata`` with
``sae_lens_version``, a TransformerLens hook name, a hub model id) and ``sae_weights.safetensors`` holds exactly
the tensors SAELens' ``standard`` / ``topk`` / ``jumprelu`` SAE expects. The exact fastedit state (factors,
gates, thresholds, pruning mask, cluster statistics) and its JSON config sit in ``fastedit_state.safetensors``,
so our loader rebuilds every variant exactly; SAELens ignores that file.

Loading also accepts plain SAELens folders (``standard``, ``topk``, ``jumprelu``; flat pre-6 or ``metadata``
cfg layouts). Settings are honoured (``apply_b_dec_to_input``, ``rescale_acts_by_decoder_norm`` folded into the
weights) or refused with one line (``normalize_activations`` other than none, ``hook_z`` reshaping, head
indices, fine-tuning scale). Hook names: ``blocks.L.hook_resid_post`` / ``hook_mlp_out`` / ``hook_resid_pre``
(= block L-1's output), or a registry module path (``model.layers.L``, ``model.layers.L.mlp``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastedit.atomic import atomic_folder, save_safetensors, write_text
from fastedit.errors import FasteditError
from fastedit.models import hub_model_id
from fastedit.sae.model import SAE, SAEConfig

SITES = {"resid_post": "block", "mlp_out": "mlp"}  # SAELens hook suffix -> registry kind
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|mlp_out|resid_pre)$")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
STATE_FILE = "fastedit_state.safetensors"  # fastedit's exact state; SAELens never reads it
_STATE_META = "fastedit"
SAELENS_VERSION = "6.0.0"  # the cfg layout written (SAELens >= 6 reads it without its pre-6 conversion)
SAELENS_ARCHS = ("standard", "topk", "jumprelu")


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


@torch.no_grad()
def saelens_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The tensors SAELens' SAE of ``saelens_architecture(sae)`` loads, acting on raw activations.

    Folding the scale s: x/s − b_dec = (x − s·b_dec)/s, so W_enc/s and s·b_dec; x̂ = s(z W_dec + b_dec).
    """
    s = sae.scale.detach()
    folded = {
        "W_enc": sae.encoder() / s,
        "b_enc": sae.b_enc.clone(),
        "W_dec": sae.decoder() * s,
        "b_dec": sae.b_dec * s,
    }
    if sae.cfg.arch == "hiercontrastive" or (sae.alive < 1).any():
        folded["b_enc"] = torch.where(sae.alive > 0, sae.b_enc, torch.full_like(sae.b_enc, -1e4))  # pruned: never fire
    if sae.threshold is not None:
        folded["threshold"] = sae.threshold.clone()
    return {k: v.detach().float().contiguous() for k, v in folded.items()}


def saelens_architecture(sae: SAE) -> str:
    if sae.threshold is not None:
        return "jumprelu"
    return "topk" if sae.cfg.activation == "topk" else "standard"


def saelens_cfg(sae: SAE, info: SAEInfo) -> dict[str, Any]:
    """``cfg.json`` as SAELens 6's ``SAEConfig.to_dict`` writes it (``sae.save_model``)."""
    arch = saelens_architecture(sae)
    cfg: dict[str, Any] = {
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "model_name": hub_model_id(info.model_name),  # SAELens / TransformerLens name models by hub id
            "hook_name": info.hook_name,
            "hook_head_index": None,
            "context_size": info.context_size,
            "prepend_bos": info.prepend_bos,
            "dataset_path": info.dataset_path,
            "trained_with": "fastedit",
        },
    }
    if arch == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    cfg["architecture"] = arch
    return cfg


def fastedit_state(
    sae: SAE, info: SAEInfo, stats: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """fastedit's own record: JSON (SAE config, model alias, training config, metrics) and tensors (the exact
    state dict under ``sae.*``, extra per-feature statistics under ``stats.*``)."""
    meta = {
        "format": "fastedit-sae/1",
        "sae": dataclasses.asdict(sae.cfg),
        "model_name": info.model_name,
        "layer": info.layer,
        "site": info.site,
        "train": info.train,
        "metrics": info.metrics,
    }
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    if sae.threshold is not None:
        tensors["sae.threshold"] = sae.threshold
    tensors.update({f"stats.{k}": v for k, v in (stats or {}).items()})
    return meta, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def write_sae_files(
    sae: SAE, info: SAEInfo, folder: Path, sparsity: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the four files into an existing ``folder`` (``cfg.json`` last: without it a folder is incomplete)."""
    meta, state = fastedit_state(sae, info, extra)
    save_safetensors(folder / WEIGHTS_FILE, saelens_tensors(sae))
    save_safetensors(folder / SPARSITY_FILE, {"sparsity": sparsity.detach().float()})
    save_safetensors(folder / STATE_FILE, state, metadata={_STATE_META: json.dumps(meta, default=str)})
    write_text(folder / CFG_FILE, json.dumps(saelens_cfg(sae, info), indent=2))


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
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_sae_files(sae, info, tmp, sparsity, extra)
    return folder


def _read_cfg(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise SAEFormatError(f"SAE folder {str(folder)!r} does not exist")
    missing = [n for n in (CFG_FILE, WEIGHTS_FILE) if not (folder / n).exists()]
    if missing:
        raise SAEFormatError(
            f"{folder} is not an SAE folder in the SAELens layout: missing {', '.join(missing)} "
            "(expected cfg.json + sae_weights.safetensors [+ sparsity.safetensors])"
        )
    try:
        cfg = json.loads((folder / CFG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{folder}/cfg.json is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{folder}/cfg.json must hold a mapping")
    # SAELens >= 6 nests model/hook fields under "metadata"; before 6 the hook was "hook_point".
    merged = {**(cfg.get("metadata") or {}), **cfg}
    if "hook_name" not in merged and "hook_point" in merged:
        merged["hook_name"] = merged["hook_point"]
    return merged


def _registry_hooks() -> list[tuple[re.Pattern[str], str]]:
    """(pattern, site) for every registered family's block and MLP module paths."""
    from fastedit.arch.registry import get_arch, known_model_types

    seen: dict[str, str] = {}
    for model_type in known_model_types():
        spec = get_arch(model_type)
        for site, kind in SITES.items():
            seen.setdefault(getattr(spec, kind), site)
    return [(re.compile(re.escape(t).replace(r"\{i\}", r"(\d+)") + "$"), site) for t, site in seen.items()]


def parse_hook(name: str, where: str = "cfg.json") -> tuple[int, str]:
    """(layer, site) of a SAELens / TransformerLens hook name or a registry module path."""
    hook = _HOOK.match(name)
    if hook is not None:
        layer, kind = int(hook.group(1)), hook.group(2)
        if kind != "resid_pre":
            return layer, kind
        if layer == 0:
            raise SAEFormatError(f"{where}: hook_name {name!r} reads the embeddings, which fastedit does not hook")
        return layer - 1, "resid_post"  # the residual before block L is block L-1's output
    for pattern, site in _registry_hooks():
        match = pattern.match(name)
        if match:
            return int(match.group(1)), site
    raise SAEFormatError(
        f"{where}: hook_name {name!r} is not supported; use blocks.<layer>.hook_resid_post, hook_resid_pre or "
        "hook_mlp_out, or a block / MLP module path of a registered family (e.g. model.layers.<layer>.mlp)"
    )


def _read_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_STATE_META)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise SAEFormatError(f"{path} is unreadable ({exc}); delete it to load the SAELens weights alone") from None
    if raw is None:
        raise SAEFormatError(f"{path} has no fastedit metadata; delete it to load the SAELens weights alone")
    return json.loads(raw), tensors


def _rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> SAE:
    """The exact fastedit SAE from its config and state dict (``threshold``: loaded JumpReLU SAEs)."""
    sae = SAE(SAEConfig(**meta))
    threshold = state.pop("threshold", None)
    sae.load_state_dict(state)
    sae.threshold = threshold
    if sae.cfg.arch == "featureforget":
        sae.gating = True
    return sae.eval().requires_grad_(False)


def load_sae(folder: str | Path) -> tuple[SAE, SAEInfo]:
    """Load an SAE folder written by fastedit (exact state) or by SAELens (settings honoured or refused)."""
    folder = Path(folder)
    cfg = _read_cfg(folder)
    layer, site = parse_hook(str(cfg.get("hook_name", "")), f"{folder}/cfg.json")
    weights = _read_tensors(folder / WEIGHTS_FILE)
    state = _read_state(folder)
    legacy = cfg.get("fastedit") if isinstance(cfg.get("fastedit"), dict) else None  # fastedit < SAELens-6 layout
    ours: dict[str, Any] = state[0] if state else (legacy or {})
    info = SAEInfo(
        model_name=str(ours.get("model_name") or cfg.get("model_name", "")),
        layer=layer,
        site=site,
        context_size=int(cfg.get("context_size") or 128),
        prepend_bos=bool(cfg.get("prepend_bos", True)),
        dataset_path=str(cfg.get("dataset_path") or ""),
        train=ours.get("train", {}),
        metrics=ours.get("metrics", {}),
    )
    if state is not None:
        tensors = {k.removeprefix("sae."): v for k, v in state[1].items() if k.startswith("sae.")}
        return _rebuild(state[0]["sae"], tensors), info
    if legacy is not None and any(k.startswith("fastedit.") for k in weights):
        tensors = {k.removeprefix("fastedit."): v for k, v in weights.items() if k.startswith("fastedit.")}
        return _rebuild(legacy["sae"], tensors), info
    return _load_saelens(folder, cfg, weights), info


def _refuse_unsupported(folder: Path, cfg: dict[str, Any]) -> None:
    """Every SAELens setting fastedit cannot honour is a one-line error, never silently ignored."""
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise SAEFormatError(
            f"{folder}: normalize_activations={norm!r} is not supported (fastedit applies SAEs to raw activations); "
            "fold the normalisation into the weights in SAELens (e.g. fold_activation_norm_scaling_factor) and save"
        )
    if (cfg.get("reshape_activations") or "none") != "none" or cfg.get("hook_head_index") is not None:
        raise SAEFormatError(f"{folder}: per-head SAEs (reshape_activations / hook_head_index) are not supported")
    if cfg.get("finetuning_scaling_factor"):
        raise SAEFormatError(f"{folder}: finetuning_scaling_factor SAEs are not supported; fold the scale and save")


def _load_saelens(folder: Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> SAE:
    arch = cfg.get("architecture", "standard")
    need = {"W_enc", "W_dec", "b_enc", "b_dec"}
    if arch not in SAELENS_ARCHS or not need <= set(weights):
        raise SAEFormatError(
            f"{folder}: unknown SAE layout (architecture {arch!r}, tensors {sorted(weights)}); "
            "supported: SAELens standard / topk / jumprelu with W_enc, W_dec, b_enc, b_dec"
        )
    _refuse_unsupported(folder, cfg)
    d_in, d_sae = weights["W_enc"].shape
    if weights["W_dec"].shape != (d_sae, d_in):
        raise SAEFormatError(f"{folder}: W_dec shape {tuple(weights['W_dec'].shape)} != ({d_sae}, {d_in})")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    topk = arch == "topk" or act == "topk"
    if not topk and act != "relu":
        raise SAEFormatError(f"{folder}: activation {act!r} is not supported (relu, topk or jumprelu)")
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, arch="topk" if topk else "relu", activation="topk" if topk else "relu"))
    if topk:
        sae.cfg.k = int(kwargs.get("k", cfg.get("k", 100)))  # SAELens' TopKSAEConfig default k is 100
    w_enc, b_enc = weights["W_enc"].double(), weights["b_enc"].double()
    w_dec, b_dec = weights["W_dec"].double(), weights["b_dec"].double()
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x W_enc + b_enc  ==  (x − b_dec) W_enc + (b_enc + b_dec W_enc)
        b_enc = b_enc + b_dec @ w_enc
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens: z = TopK(pre·n), x̂ = (z/n) W_dec + b_dec with n_i = ‖W_dec[i]‖; the same SAE with W_enc·n,
        # b_enc·n and unit-norm decoder rows (its fold_W_dec_norm).
        norms = w_dec.norm(dim=-1)
        w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    with torch.no_grad():
        for name, value in (("W_enc", w_enc), ("W_dec", w_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value.float())
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
    """``sparsity`` (log10 firing frequency) and fastedit's extra per-feature statistics, when present."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    if (folder / SPARSITY_FILE).exists():
        out.update(_read_tensors(folder / SPARSITY_FILE))
    state = _read_state(folder)
    if state is not None:
        out.update({k.removeprefix("stats."): v for k, v in state[1].items() if k.startswith("stats.")})
    return out
