"""Edit patches: the low-rank factors of an edit in one safetensors file, applied and reverted exactly.

A patch holds, per edited layer l, factors A_l (d_model, r) and B_l (d_k, r) with ΔW_l = A_l B_lᵀ (W is the
(d_model, d_k) ``mlp_out`` matrix, keys are columns, r ≤ number of requests), plus JSON metadata: the model
fingerprint, method, hparams, the requests' case ids and the covariance statistics used.

Bit-exact revert. W + ΔW − ΔW in float32 is not W (rounding), so the patch also stores each touched matrix's
original parameter exactly (same dtype and layout); `revert_patch` copies it back after checking, by hash, that
the model carries exactly the patched weights. Applying is deterministic: ΔW is computed in float64 and rounded
once to the weight's dtype, then added elementwise, so the patched weights (and their hash, stored at creation)
are the same on every machine.

Refusals: `apply_patch` checks the fingerprint (hash of the config and of the edited layers' original weights):
another model, another checkpoint, or a model that already carries the patch is refused before anything changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastedit.arch import add_to_mlp_out, arch_for, mlp_out_param
from fastedit.arch.spec import ArchSpec
from fastedit.errors import PatchError

PATCH_FORMAT = "fastedit-patch/1"
_META_KEY = "fastedit_patch"

# Config entries that change with where/how a model was loaded or saved, not with what it computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "quantization_config", "name_or_path"}


# ---- hashes ----------------------------------------------------------------------------------------------


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (dtype- and shape-tagged, so equal hashes mean torch.equal tensors)."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stable_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(k): _stable_config(v)
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
            if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def config_sha256(model: torch.nn.Module) -> str:
    """Hash of the model's config without load-time entries (path, transformers version, dtype)."""
    config = _stable_config(model.config.to_dict())
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module, layers: list[int]) -> dict[str, Any]:
    """{"config": sha, "layers": {l: sha of mlp_out weight}}: what a patch checks before it is applied."""
    spec = arch_for(model)
    return {
        "config": config_sha256(model),
        "layers": {str(layer): tensor_sha256(mlp_out_param(model, spec, layer)) for layer in layers},
    }


# ---- the patch ----------------------------------------------------------------------------------------------


def _rounded_delta(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ΔW = A Bᵀ (d_model, r) @ (r, d_k) in float64, rounded once to ``dtype``: the same bits on any BLAS."""
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(dtype)


@torch.no_grad()
def _patched(spec: ArchSpec, original: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The parameter after the patch, computed on a copy (the same elementwise add as `add_to_mlp_out`)."""
    weight = original.detach().clone()
    matrix = weight.T if spec.conv1d_weights else weight  # (d_model, d_k) view, like mlp_out_matrix
    matrix.add_(_rounded_delta(a, b, weight.dtype).to(weight.device))
    return weight


@dataclass
class Patch:
    """factors: layer -> (A (d_model, r), B (d_k, r)) float32; originals: layer -> the exact parameter before."""

    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    originals: dict[int, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.factors)

    def delta(self, layer: int) -> torch.Tensor:
        """ΔW of ``layer`` as (d_model, d_k) float32."""
        a, b = self.factors[layer]
        return (a.to(torch.float64) @ b.to(torch.float64).T).float()

    def rank(self, layer: int) -> int:
        return int(self.factors[layer][0].shape[1])

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (temp file, then rename: never half-written)."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for layer, (a, b) in self.factors.items():
            tensors[f"layers.{layer}.A"] = a.detach().to("cpu", torch.float32).contiguous()
            tensors[f"layers.{layer}.B"] = b.detach().to("cpu", torch.float32).contiguous()
            tensors[f"layers.{layer}.original"] = self.originals[layer].detach().to("cpu").contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(self.metadata, default=str)})
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"patch file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise PatchError(f"cannot read patch {str(path)!r}: {exc}") from None
        if raw is None:
            raise PatchError(f"{path} is a safetensors file but not a fastedit patch (no {_META_KEY} metadata)")
        metadata = json.loads(raw)
        if metadata.get("format") != PATCH_FORMAT:
            raise PatchError(f"{path}: unsupported patch format {metadata.get('format')!r} (expected {PATCH_FORMAT})")
        layers = sorted({int(k.split(".")[1]) for k in tensors})
        try:
            factors = {l: (tensors[f"layers.{l}.A"], tensors[f"layers.{l}.B"]) for l in layers}
            originals = {l: tensors[f"layers.{l}.original"] for l in layers}
        except KeyError as exc:
            raise PatchError(f"{path}: patch is missing tensor {exc}; the file is incomplete") from None
        return cls(factors, originals, metadata)


def make_patch(
    model: torch.nn.Module,
    factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    originals: Mapping[int, torch.Tensor],
    /,
    **info: Any,
) -> Patch:
    """Build the patch of an edit from its factors and the untouched parameters (taken before editing).

    ``info`` goes into the metadata (method, model name, hparams, case_ids, stats...). The fingerprint is
    computed from ``originals``, so the model may already be edited when this is called.
    """
    spec = arch_for(model)
    layers = sorted(factors)
    if sorted(originals) != layers:
        raise ValueError(f"originals for layers {sorted(originals)}, factors for {layers}")
    clean = {
        l: (a.detach().to("cpu", torch.float32), b.detach().to("cpu", torch.float32)) for l, (a, b) in factors.items()
    }
    kept = {l: originals[l].detach().to("cpu").clone() for l in layers}
    metadata = {
        "format": PATCH_FORMAT,
        **info,
        "layers": layers,
        "ranks": {str(l): int(clean[l][0].shape[1]) for l in layers},
        "fingerprint": {"config": config_sha256(model), "layers": {str(l): tensor_sha256(kept[l]) for l in layers}},
        "patched_sha256": {str(l): tensor_sha256(_patched(spec, kept[l], *clean[l])) for l in layers},
    }
    return Patch(clean, kept, metadata)


def _as_patch(patch: Patch | str | Path) -> Patch:
    return patch if isinstance(patch, Patch) else Patch.load(patch)


def _describe(patch: Patch) -> str:
    return f"patch ({patch.metadata.get('method', '?')} on {patch.metadata.get('model', '?')})"


def _check_layers(model: torch.nn.Module, spec: ArchSpec, patch: Patch) -> None:
    depth = spec.n_layers(model.config)
    for layer in patch.layers:
        if not 0 <= layer < depth:
            raise PatchError(f"{_describe(patch)} edits layer {layer}, but this model has {depth} layers")
        shape = tuple(mlp_out_param(model, spec, layer).shape)
        if shape != tuple(patch.originals[layer].shape):
            raise PatchError(
                f"{_describe(patch)} was made for a layer-{layer} matrix of shape "
                f"{tuple(patch.originals[layer].shape)}; this model's is {shape}: it is another model"
            )


@torch.no_grad()
def apply_patch(model: torch.nn.Module, patch: Patch | str | Path) -> Patch:
    """Add the patch's ΔW to the model in place, after checking it was made for exactly these weights."""
    patch = _as_patch(patch)
    spec = arch_for(model)
    _check_layers(model, spec, patch)
    fingerprint = patch.metadata["fingerprint"]
    if config_sha256(model) != fingerprint["config"]:
        raise PatchError(
            f"{_describe(patch)} was made for another model (config fingerprint differs); load the model it was "
            "made for"
        )
    for layer in patch.layers:
        current = tensor_sha256(mlp_out_param(model, spec, layer))
        if current == patch.metadata["patched_sha256"][str(layer)]:
            raise PatchError(f"the model already carries this {_describe(patch)} (layer {layer}); revert it first")
        if current != fingerprint["layers"][str(layer)]:
            raise PatchError(
                f"{_describe(patch)} was made for other weights at layer {layer} (another checkpoint, or a model "
                "edited since); apply it to the model it was made from"
            )
    apply_factors(model, patch.factors)  # every check passed: now change weights
    return patch


@torch.no_grad()
def revert_patch(model: torch.nn.Module, patch: Patch | str | Path) -> Patch:
    """Restore the weights the patch was made from, bit-exactly, if the model carries exactly this patch."""
    patch = _as_patch(patch)
    spec = arch_for(model)
    _check_layers(model, spec, patch)
    for layer in patch.layers:
        current = tensor_sha256(mlp_out_param(model, spec, layer))
        if current != patch.metadata["patched_sha256"][str(layer)]:
            raise PatchError(
                f"layer {layer} of this model does not hold the weights {_describe(patch)} produces (not applied, "
                "or edited since); nothing was reverted"
            )
    restore_weights(model, patch.originals)
    return patch


@torch.no_grad()
def snapshot_weights(model: torch.nn.Module, layers: list[int]) -> dict[int, torch.Tensor]:
    """Exact copies of the ``mlp_out`` parameters of ``layers`` (to restore after a failed or undone edit)."""
    spec = arch_for(model)
    return {layer: mlp_out_param(model, spec, layer).detach().clone() for layer in layers}


@torch.no_grad()
def restore_weights(model: torch.nn.Module, originals: Mapping[int, torch.Tensor]) -> None:
    """Copy saved parameters back (bit-exact)."""
    spec = arch_for(model)
    for layer, original in originals.items():
        param = mlp_out_param(model, spec, layer)
        param.copy_(original.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def apply_factors(model: torch.nn.Module, factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """W_l += round(A_l B_lᵀ) exactly as `apply_patch` does (no checks): used to put an edit in its patch form."""
    spec = arch_for(model)
    for layer, (a, b) in factors.items():
        add_to_mlp_out(model, spec, layer, _rounded_delta(a, b, mlp_out_param(model, spec, layer).dtype))


__all__ = [
    "PATCH_FORMAT",
    "Patch",
    "apply_factors",
    "apply_patch",
    "config_sha256",
    "make_patch",
    "model_fingerprint",
    "restore_weights",
    "revert_patch",
    "snapshot_weights",
    "tensor_sha256",
]
