"""Patches out of fastedit: applied or reverted model folders, peft LoRA adapters, and GGUF files.

A patch's ΔW_l = A_l B_lᵀ (A (d_model, r), B (d_k, r)) is exactly a rank-r LoRA on the ``mlp_out`` module of
layer l: peft computes ΔW = scaling · lora_B.weight @ lora_A.weight with lora_A.weight (r, d_k) = Bᵀ,
lora_B.weight (d_model, r) = A and scaling = lora_alpha / r = 1. GPT-2's Conv1D stores W transposed; peft's
``fan_in_fan_out`` (set from the registry's ``conv1d_weights``) transposes ΔW back.

GGUF: the source file is copied tensor by tensor; each edited layer's ``mlp_out`` tensor (its name from the
registry's ``gguf_mlp_out``) is dequantised, ΔW added in float32, and re-quantised to the tensor's own type when
gguf-py can quantise it, else stored as F32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastedit.arch import arch_for
from fastedit.atomic import atomic_folder, write_with
from fastedit.editing.patch import Patch, apply_patch, revert_patch
from fastedit.errors import PatchError
from fastedit.models import hub_model_id

log = logging.getLogger(__name__)

FORMATS = ("hf", "peft", "gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(PatchError):
    """An export that cannot be made (wrong source for the format, an existing output, a missing package)."""


def _patch(patch: Patch | str | Path) -> Patch:
    return patch if isinstance(patch, Patch) else Patch.load(patch)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ExportError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- output safety -----------------------------------------------------------------------------------------


def _check_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{str(out)!r} already exists; choose a new --out or pass --overwrite")


# ---- models ------------------------------------------------------------------------------------------------


def _load(model: str) -> tuple[Any, Any]:
    from fastedit.models import load_model

    return load_model(model)


def save_model_folder(
    model: Any, tokenizer: Any, out: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """``save_pretrained`` of model + tokenizer in ``dtype`` (a plain transformers folder), written atomically."""
    out = Path(out)
    target = _dtype(dtype)
    # A model read from a .gguf carries transformers' gguf quantizer flag; its weights are plain tensors now.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.to(target).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def _patched_folder(
    patch: Patch | str | Path, model: str, out: str | Path, step: Any, *, dtype: str, overwrite: bool
) -> Path:
    """Load ``model``, run ``step`` (apply_patch or revert_patch, both fingerprint-checked), save to ``out``."""
    patch = _patch(patch)
    _dtype(dtype)
    _check_free(Path(out), overwrite)
    loaded, tokenizer = _load(model)
    step(loaded, patch)
    return save_model_folder(loaded, tokenizer, out, dtype=dtype, overwrite=overwrite)


def apply_to_folder(
    patch: Patch | str | Path, model: str, out: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Load ``model``, apply the patch (fingerprint-checked) and save the edited model to ``out``."""
    return _patched_folder(patch, model, out, apply_patch, dtype=dtype, overwrite=overwrite)


def revert_to_folder(
    patch: Patch | str | Path, model: str, out: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Load an edited ``model`` (e.g. a folder from `apply_to_folder`), revert the patch, save it to ``out``."""
    return _patched_folder(patch, model, out, revert_patch, dtype=dtype, overwrite=overwrite)


def describe_patch(patch: Patch | str | Path) -> str:
    """A short human-readable summary: method, model, layers and ranks, requests, ‖ΔW‖ per layer."""
    patch = _patch(patch)
    meta = patch.metadata
    lines = [
        f"method: {meta.get('method', '?')}",
        f"model: {meta.get('model', '?')}",
        f"requests: {len(meta.get('case_ids') or [])}",
    ]
    for layer in patch.layers:
        delta = patch.delta(layer)
        lines.append(
            f"layer {layer}: rank {patch.rank(layer)}, ΔW {tuple(delta.shape)}, ‖ΔW‖_F {float(delta.norm()):.4g}"
        )
    return "\n".join(lines)


# ---- peft --------------------------------------------------------------------------------------------------


def lora_config(model: Any, patch: Patch, dtype: torch.dtype = torch.float32) -> Any:
    """The peft ``LoraConfig`` of a patch: the edited layers' ``mlp_out`` modules, each at its own rank."""
    from peft import LoraConfig

    spec = arch_for(model)
    targets = {spec.path("mlp_out", layer): patch.rank(layer) for layer in patch.layers}
    first = patch.rank(patch.layers[0])
    return LoraConfig(
        r=first,
        lora_alpha=first,
        target_modules=sorted(targets),
        # Per-module ranks; alpha = r for each, so every scaling is exactly 1.
        rank_pattern={path: r for path, r in targets.items() if r != first},
        alpha_pattern={path: r for path, r in targets.items() if r != first},
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=spec.conv1d_weights,
        init_lora_weights=False,
    )


@torch.no_grad()
def peft_model_of(model: Any, patch: Patch, dtype: torch.dtype = torch.float32) -> Any:
    """``model`` wrapped by peft with the patch as its LoRA adapter (lora_A = Bᵀ, lora_B = A)."""
    from peft import get_peft_model

    spec = arch_for(model)
    wrapped = get_peft_model(model, lora_config(model, patch, dtype))
    for layer in patch.layers:
        a, b = patch.factors[layer]
        module = wrapped.base_model.model.get_submodule(spec.path("mlp_out", layer))
        lora_a, lora_b = module.lora_A["default"], module.lora_B["default"]
        if tuple(lora_a.weight.shape) != tuple(b.T.shape) or tuple(lora_b.weight.shape) != tuple(a.shape):
            raise ExportError(
                f"layer {layer}: LoRA shapes {tuple(lora_a.weight.shape)}/{tuple(lora_b.weight.shape)} do not fit "
                f"the patch factors B {tuple(b.shape)}, A {tuple(a.shape)}: the patch is for another model"
            )
        lora_a.weight.copy_(b.T.to(lora_a.weight.dtype))
        lora_b.weight.copy_(a.to(lora_b.weight.dtype))
    return wrapped


def export_peft(
    patch: Patch | str | Path, model: str, out: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """A peft LoRA adapter folder that ``PeftModel.from_pretrained(unedited model, out)`` turns into the edit."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ExportError("--format peft needs the peft package: pip install 'fastedit[interop]'") from None
    patch = _patch(patch)
    target = _dtype(dtype)
    out = Path(out)
    _check_free(out, overwrite)
    loaded, _ = _load(model)
    apply_patch(loaded, patch)  # the fingerprint check: the patch must be for this model
    revert_patch(loaded, patch)
    wrapped = peft_model_of(loaded, patch)
    wrapped.peft_config["default"].base_model_name_or_path = hub_model_id(model)  # what users load it onto
    with atomic_folder(out, overwrite=overwrite) as tmp:
        wrapped.to(target).save_pretrained(tmp)
    return out


# ---- GGUF --------------------------------------------------------------------------------------------------


def gguf_source(model: str) -> Path:
    """The GGUF file behind ``model``: a packaged alias's file, or a .gguf path."""
    from fastedit.models import PACKAGED, packaged_gguf

    if model in PACKAGED:
        return packaged_gguf(model)
    if model.endswith(".gguf") and Path(model).expanduser().is_file():
        return Path(model).expanduser()
    raise ExportError(
        f"--format gguf copies the model's GGUF file, and {model!r} is not one; pass --model as a .gguf file or a "
        f"packaged alias ({', '.join(PACKAGED)})"
    )


def _edited_tensor(data: Any, qtype: Any, delta: torch.Tensor, name: str, requantize: bool) -> tuple[Any, Any]:
    """(new data, its GGML type): dequantise, add ΔW in float32, re-quantise to ``qtype`` (else F32)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    weight = quants.dequantize(data, qtype).astype(np.float32)
    if weight.shape != tuple(delta.shape):
        raise ExportError(f"GGUF tensor {name} has shape {weight.shape}, the patch's ΔW {tuple(delta.shape)}")
    edited = weight + delta.numpy().astype(np.float32)
    if qtype == GGMLQuantizationType.F32 or not requantize:
        return edited, GGMLQuantizationType.F32
    try:
        return quants.quantize(edited, qtype), qtype
    except NotImplementedError:
        log.warning("gguf cannot quantise %s to %s: stored as F32", name, qtype.name)
        return edited, GGMLQuantizationType.F32


def write_edited_gguf(
    patch: Patch, source: Path, target: Path, tensor_name: Callable[[int], str], *, requantize: bool = True
) -> dict[str, str]:
    """Copy ``source`` to ``target`` with the edited tensors replaced; returns {tensor name: stored type}.

    ``requantize``: store edited tensors in their source type (smaller; adds that type's rounding error to the
    edit) when gguf-py can quantise it; False stores them as F32 (exact edit)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(source))
    edits = {tensor_name(layer): layer for layer in patch.layers}
    present = {t.name for t in reader.tensors}
    missing = sorted(set(edits) - present)
    if missing:
        raise ExportError(f"GGUF {source} has no tensor(s) {', '.join(missing)}; it is not the patched model")
    arch_field = reader.fields["general.architecture"]
    writer = GGUFWriter(str(target), str(arch_field.contents()), endianess=reader.endianess)
    for fld in reader.fields.values():
        if fld.name == "general.architecture" or fld.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = fld.types[0]
        sub = fld.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(fld.name, fld.contents(), kind, sub_type=sub)
    data: dict[str, tuple[Any, Any]] = {}
    stored: dict[str, str] = {}
    for t in reader.tensors:
        if t.name in edits:
            new, qtype = _edited_tensor(t.data, t.tensor_type, patch.delta(edits[t.name]), t.name, requantize)
            stored[t.name] = qtype.name
        else:
            new, qtype = t.data, t.tensor_type
        data[t.name] = (new, qtype)
        raw = None if qtype == GGMLQuantizationType.F32 and new.dtype.name == "float32" else qtype
        writer.add_tensor_info(t.name, new.shape, new.dtype, new.nbytes, raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(data[t.name][0], tensor_endianess=reader.endianess)
    writer.close()
    return stored


def export_gguf(
    patch: Patch | str | Path, model: str, out: str | Path, *, requantize: bool = True, overwrite: bool = False
) -> Path:
    """A copy of ``model``'s GGUF with the patch added to its ``mlp_out`` tensors (``out``: a .gguf or a folder)."""
    patch = _patch(patch)
    source = gguf_source(model)
    out = Path(out)
    if out.suffix != ".gguf":
        out = out / f"{source.stem}.edited.gguf"
    _check_free(out, overwrite)
    loaded, _ = _load(model)
    apply_patch(loaded, patch)  # the fingerprint check: the patch must be for this model
    spec = arch_for(loaded)
    del loaded
    if spec.gguf_mlp_out is None:
        raise ExportError(f"the registry has no GGUF tensor name for {spec.model_type}'s mlp_out")
    stored: dict[str, str] = {}

    def write(tmp: Path) -> None:
        stored.update(
            write_edited_gguf(
                patch, source, tmp, lambda layer: spec.gguf_mlp_out.format(i=layer), requantize=requantize
            )
        )

    write_with(out, write, overwrite=overwrite)
    log.info("wrote %s (edited tensors: %s)", out, json.dumps(stored))
    return out


def export_patch(
    patch: Patch | str | Path,
    model: str,
    out: str | Path,
    *,
    format: str = "hf",
    dtype: str = "float32",
    requantize: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export an edit: ``hf`` (the edited model folder), ``peft`` (a LoRA adapter) or ``gguf`` (an edited GGUF)."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "hf":
        return apply_to_folder(patch, model, out, dtype=dtype, overwrite=overwrite)
    if format == "peft":
        return export_peft(patch, model, out, dtype=dtype, overwrite=overwrite)
    if dtype != "float32":
        raise ExportError("--dtype does not apply to --format gguf (edited tensors keep the file's own types)")
    return export_gguf(patch, model, out, requantize=requantize, overwrite=overwrite)
