"""Edit patches: the low-rank factors of an edit in one safetensors file, applied and reverted exactly.

A patch holds, per edited layer l, factors A_l (d_model, r) and B_l (d_k, r) with ΔW_l = A_l B_lᵀ (W is the
(d_model, d_k) ``mlp_out`` matrix, keys are columns, r ≤ number of requests), plus JSON metadata: the model
fingerprint, method, hparams, the requests' case ids and the covariance statistics used.

Applying is deterministic: D = A Bᵀ is computed in float64 and rounded once to the weight's dtype, then added
elementwise (P = W + D), so the patched weights, and their hash stored at creation, are the same everywhere.

Bit-exact revert without a full copy of W: P − D is W except where the addition rounded (where |D| is not small
next to W, or W + D crosses a power of two). The patch stores only those positions and W's values there (the
"residue": flat indices into the parameter and the original values, a few percent of the matrix at most), and
revert computes P − D and writes them back. A layer whose residue would be larger than the parameter (ΔW as
large as W) stores the parameter itself; ``store_originals=True`` does so for every layer.

Verification, before any weight changes (every layer is checked first, then all are written):
- apply: the layer's dtype is the one the patch was made on (named as a dtype mismatch), its hash is the
  fingerprint's (else another checkpoint, or an edited model), the factors turn it into the stored patched hash
  (else the factors are corrupt), and the revert data turn that back into the fingerprint (else it is corrupt);
- revert: the layer holds the patched hash (else not applied, or edited since), and the revert data rebuild the
  fingerprint's hash (else the patch file is corrupt, and nothing is reverted).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fastedit.arch import add_to_mlp_out, arch_for, mlp_out_param, restore_mlp_out
from fastedit.arch.spec import ArchSpec
from fastedit.atomic import save_safetensors
from fastedit.errors import PatchError

PATCH_FORMAT = "fastedit-patch/2"
_PATCH_FORMAT_V1 = "fastedit-patch/1"  # full originals stored; still read
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
def _patched(spec: ArchSpec, original: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """The parameter after adding (sign 1) or subtracting (sign −1) round(A Bᵀ), computed on a copy."""
    weight = original.detach().clone()
    matrix = weight.T if spec.conv1d_weights else weight  # (d_model, d_k) view, like mlp_out_matrix
    matrix.add_(_rounded_delta(a, b, weight.dtype).to(weight.device), alpha=sign)
    return weight


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits as integers (flat): equal bits, not equal values (−0.0 ≠ 0.0, NaN = NaN)."""
    return tensor.detach().contiguous().reshape(-1).view(_INT_OF_SIZE[tensor.element_size()])


def _residue(spec: ArchSpec, original: torch.Tensor, patched: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """(flat indices, original values) where P − round(A Bᵀ) is not bit-identical to W."""
    unpatched = _patched(spec, patched, a, b, sign=-1)
    index = torch.nonzero(_bits(unpatched) != _bits(original)).reshape(-1)
    index = index.to(torch.int32 if original.numel() < 2**31 else torch.int64).cpu()
    return index, original.detach().reshape(-1)[index.to(original.device).long()].cpu().clone()


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Patch:
    """factors: layer -> (A (d_model, r), B (d_k, r)) float32. Revert data per layer: ``residue`` (flat indices,
    original values where P − D is not W) or, for patches made with ``store_originals``, ``originals``."""

    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    originals: dict[int, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    residue: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.factors)

    def delta(self, layer: int) -> torch.Tensor:
        """ΔW of ``layer`` as (d_model, d_k) float32."""
        a, b = self.factors[layer]
        return (a.to(torch.float64) @ b.to(torch.float64).T).float()

    def rank(self, layer: int) -> int:
        return int(self.factors[layer][0].shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `save` writes: per layer A, B and either the original or the residue."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, (a, b) in self.factors.items():
            tensors[f"layers.{layer}.A"] = a.detach().to("cpu", torch.float32)
            tensors[f"layers.{layer}.B"] = b.detach().to("cpu", torch.float32)
            if layer in self.originals:
                tensors[f"layers.{layer}.original"] = self.originals[layer]
            else:
                tensors[f"layers.{layer}.residue_index"], tensors[f"layers.{layer}.residue_value"] = self.residue[layer]
        return tensors

    def save(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write one safetensors file atomically; ``overwrite=False`` refuses an existing file."""
        meta = {_META_KEY: json.dumps(self.metadata, default=str)}
        return save_safetensors(path, self.tensors(), meta, overwrite=overwrite)

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
        metadata = _parse_metadata(raw, path)
        try:
            layers = sorted({int(k.split(".")[1]) for k in tensors})
            factors = {l: (tensors[f"layers.{l}.A"], tensors[f"layers.{l}.B"]) for l in layers}
            originals = {l: tensors[f"layers.{l}.original"] for l in layers if f"layers.{l}.original" in tensors}
            residue = {
                l: (tensors[f"layers.{l}.residue_index"], tensors[f"layers.{l}.residue_value"])
                for l in layers
                if l not in originals
            }
        except (KeyError, ValueError, IndexError) as exc:
            raise PatchError(f"{path}: patch is missing tensor {exc}; the file is incomplete") from None
        if layers != sorted(int(l) for l in metadata["layers"]):
            raise PatchError(f"{path}: tensors for layers {layers}, metadata for {metadata['layers']}; file is corrupt")
        return cls(factors, originals, metadata, residue)


def _parse_metadata(raw: str, path: Path) -> dict[str, Any]:
    """The JSON metadata with the keys apply/revert need, else a one-line error (no KeyError later)."""
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PatchError(f"{path}: patch metadata is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(metadata, dict):
        raise PatchError(f"{path}: patch metadata is not a JSON object; the file is corrupt")
    if metadata.get("format") not in (PATCH_FORMAT, _PATCH_FORMAT_V1):
        raise PatchError(f"{path}: unsupported patch format {metadata.get('format')!r} (expected {PATCH_FORMAT})")
    fingerprint = metadata.get("fingerprint")
    ok = (
        isinstance(metadata.get("layers"), list)
        and isinstance(fingerprint, dict)
        and isinstance(fingerprint.get("config"), str)
        and isinstance(fingerprint.get("layers"), dict)
        and isinstance(metadata.get("patched_sha256"), dict)
    )
    if ok:
        keys = {str(l) for l in metadata["layers"]}
        ok = keys <= set(fingerprint["layers"]) and keys <= set(metadata["patched_sha256"])
    if not ok:
        raise PatchError(f"{path}: patch metadata lacks its layers, fingerprint or patched hashes; the file is corrupt")
    return metadata


def make_patch(
    model: torch.nn.Module,
    factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    originals: Mapping[int, torch.Tensor],
    /,
    *,
    store_originals: bool = False,
    **info: Any,
) -> Patch:
    """Build the patch of an edit from its factors and the untouched parameters (taken before editing).

    ``info`` goes into the metadata (method, model name, hparams, case_ids, stats...). The fingerprint is
    computed from ``originals``, so the model may already be edited when this is called. By default only the
    revert residue is stored (or the parameter, when that is smaller); ``store_originals=True`` keeps a full
    copy of every original parameter.
    """
    spec = arch_for(model)
    layers = sorted(factors)
    if sorted(originals) != layers:
        raise ValueError(f"originals for layers {sorted(originals)}, factors for {layers}")
    clean = {
        l: (a.detach().to("cpu", torch.float32), b.detach().to("cpu", torch.float32)) for l, (a, b) in factors.items()
    }
    patched = {l: _patched(spec, originals[l], *clean[l]) for l in layers}
    kept: dict[int, torch.Tensor] = {}
    residue: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for l in layers:
        fix = None if store_originals else _residue(spec, originals[l], patched[l], *clean[l])
        # A ΔW as large as W touches most entries: then the full copy is the smaller file.
        if fix is None or _nbytes(*fix) >= _nbytes(originals[l]):
            kept[l] = originals[l].detach().to("cpu").clone()
        else:
            residue[l] = fix
    metadata = {
        "format": PATCH_FORMAT,
        **info,
        "layers": layers,
        "ranks": {str(l): int(clean[l][0].shape[1]) for l in layers},
        "dtypes": {str(l): str(originals[l].dtype).removeprefix("torch.") for l in layers},
        "shapes": {str(l): list(originals[l].shape) for l in layers},
        "revert": {str(l): "original" if l in kept else "residue" for l in layers},
        "fingerprint": {
            "config": config_sha256(model),
            "layers": {str(l): tensor_sha256(originals[l]) for l in layers},
        },
        "patched_sha256": {str(l): tensor_sha256(patched[l]) for l in layers},
    }
    return Patch(clean, kept, metadata, residue)


def _as_patch(patch: Patch | str | Path) -> Patch:
    return patch if isinstance(patch, Patch) else Patch.load(patch)


def _describe(patch: Patch) -> str:
    return f"patch ({patch.metadata.get('method', '?')} on {patch.metadata.get('model', '?')})"


def _made_for(patch: Patch, layer: int) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of the parameter the patch was made from (v1 files: from the stored original)."""
    if layer in patch.originals and "shapes" not in patch.metadata:
        original = patch.originals[layer]
        return tuple(original.shape), str(original.dtype).removeprefix("torch.")
    return tuple(patch.metadata["shapes"][str(layer)]), str(patch.metadata["dtypes"][str(layer)])


def _check_layers(model: torch.nn.Module, spec: ArchSpec, patch: Patch) -> None:
    """Depth, shape and dtype of every edited layer, each named (before any hash is compared)."""
    depth = spec.n_layers(model.config)
    for layer in patch.layers:
        if not 0 <= layer < depth:
            raise PatchError(f"{_describe(patch)} edits layer {layer}, but this model has {depth} layers")
        param = mlp_out_param(model, spec, layer)
        try:
            shape, dtype = _made_for(patch, layer)
        except (KeyError, TypeError):
            raise PatchError(f"{_describe(patch)}: metadata lacks the shape/dtype of layer {layer}; corrupt") from None
        if tuple(param.shape) != shape:
            raise PatchError(
                f"{_describe(patch)} was made for a layer-{layer} matrix of shape {shape}; this model's is "
                f"{tuple(param.shape)}: it is another model"
            )
        have = str(param.dtype).removeprefix("torch.")
        if have != dtype:
            raise PatchError(
                f"dtype mismatch: {_describe(patch)} was made on {dtype} weights, but layer {layer} of this model "
                f"is {have}; load the model in {dtype} (e.g. load_model(..., dtype=torch.{dtype})) to apply it"
            )


@torch.no_grad()
def _reverted(spec: ArchSpec, patch: Patch, layer: int, patched: torch.Tensor) -> torch.Tensor:
    """The original parameter rebuilt from the patched one (unverified; the caller compares hashes)."""
    if layer in patch.originals:
        return patch.originals[layer].to(patched.device)
    weight = _patched(spec, patched, *patch.factors[layer], sign=-1)
    index, value = patch.residue[layer]
    if value.dtype != weight.dtype or index.numel() != value.numel():
        return torch.full_like(weight, float("nan"))  # cannot be the original: the hash check refuses it
    flat = weight.view(-1)
    index = index.to(weight.device).long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= flat.numel()):
        return torch.full_like(weight, float("nan"))
    flat[index] = value.to(weight.device)
    return weight


def _check_config(model: torch.nn.Module, patch: Patch) -> None:
    if config_sha256(model) != patch.metadata["fingerprint"]["config"]:
        raise PatchError(
            f"{_describe(patch)} was made for another model (config fingerprint differs); load the model it was "
            "made for"
        )


@torch.no_grad()
def apply_patch(model: torch.nn.Module, patch: Patch | str | Path) -> Patch:
    """Add the patch's ΔW to the model in place, after checking it was made for exactly these weights and that
    its factors and revert data are intact (every layer is verified before any weight changes)."""
    patch = _as_patch(patch)
    spec = arch_for(model)
    _check_layers(model, spec, patch)
    _check_config(model, patch)
    fingerprint = patch.metadata["fingerprint"]["layers"]
    for layer in patch.layers:
        param = mlp_out_param(model, spec, layer)
        current = tensor_sha256(param)
        if current == patch.metadata["patched_sha256"][str(layer)]:
            raise PatchError(f"the model already carries this {_describe(patch)} (layer {layer}); revert it first")
        if current != fingerprint[str(layer)]:
            raise PatchError(
                f"{_describe(patch)} was made for other weights at layer {layer} (another checkpoint, or a model "
                "edited since); apply it to the model it was made from"
            )
        patched = _patched(spec, param, *patch.factors[layer])
        if tensor_sha256(patched) != patch.metadata["patched_sha256"][str(layer)]:
            raise PatchError(
                f"the factors of layer {layer} in {_describe(patch)} do not produce the weights recorded when it "
                "was made: the patch file is corrupt; nothing was applied"
            )
        if tensor_sha256(_reverted(spec, patch, layer, patched)) != fingerprint[str(layer)]:
            raise PatchError(
                f"the revert data of layer {layer} in {_describe(patch)} do not restore the original weights: the "
                "patch file is corrupt (it could not be undone); nothing was applied"
            )
    apply_factors(model, patch.factors)  # every check passed: now change weights (the same bits as `_patched`)
    return patch


@torch.no_grad()
def revert_patch(model: torch.nn.Module, patch: Patch | str | Path) -> Patch:
    """Restore the weights the patch was made from, bit-exactly, if the model carries exactly this patch and the
    patch's revert data rebuild the fingerprinted originals (every layer is verified before any is restored)."""
    patch = _as_patch(patch)
    spec = arch_for(model)
    _check_layers(model, spec, patch)
    _check_config(model, patch)
    restored: dict[int, torch.Tensor] = {}
    for layer in patch.layers:
        param = mlp_out_param(model, spec, layer)
        if tensor_sha256(param) != patch.metadata["patched_sha256"][str(layer)]:
            raise PatchError(
                f"layer {layer} of this model does not hold the weights {_describe(patch)} produces (not applied, "
                "or edited since); nothing was reverted"
            )
        original = _reverted(spec, patch, layer, param)
        if tensor_sha256(original) != patch.metadata["fingerprint"]["layers"][str(layer)]:
            raise PatchError(
                f"the revert data of layer {layer} in {_describe(patch)} do not rebuild the original weights "
                "recorded when it was made: the patch file is corrupt; nothing was reverted"
            )
        restored[layer] = original
    restore_mlp_out(model, spec, restored)
    return patch


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
    "revert_patch",
    "tensor_sha256",
]
