"""Typed, strictly loaded editing hyperparameters: ``hparams/<method>/<model or family>.json``.

One dataclass serves every method; fields a method does not read are ignored by it (e.g. ``emmet_mu`` by
MEMIT). Lookup order for ``load_hparams(method, model)``: an explicit path, then a model-specific file named
after the model (``hparams/memit/smollm2-135m.json``), then the family file (``hparams/memit/llama.json``).
A variant of a model's file (``hparams/memit/gemma3-270m-fast.json``) is chosen by its name (``variant="fast"``,
``fastedit edit --hparams fast``), so an installed package's files need no path.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastedit.config import load_dataclass_file
from fastedit.errors import ConfigError

METHODS = ("rome", "memit", "emmet", "alphaedit")
V_MODES = ("reference", "fast", "batched")
POST_NORM_MODES = ("per_layer", "project", "ignore", "output_site")
PREVIOUS_KEYS_MODES = ("penalty", "exact")
NEIGHBOUR_SOURCES = ("batch", "model")  # where template neighbours' subjects come from (template_neighbours.py)


def is_v_star_setting(name: str) -> bool:
    """Whether an `EditHparams` field shapes the v* optimisation (its loss, steps, stop and context prefixes)
    rather than where or how the closed form edits: what a v* targets cache keys on, and all that a cheaper-v*
    variant of a model's file (``<model>-lite.json``) may change."""
    return name.startswith(("v_", "kl_", "context_"))


def differences_beyond_v_star(a: EditHparams, b: EditHparams) -> list[str]:
    """The fields in which ``a`` and ``b`` differ other than the v* settings and the free text (notes, extra):
    empty when editing with one or the other differs in v* alone (a ``<model>-lite.json`` and its model's file)."""
    return [
        f.name
        for f in dataclasses.fields(EditHparams)
        if f.name not in ("notes", "extra")
        and not is_v_star_setting(f.name)
        and getattr(a, f.name) != getattr(b, f.name)
    ]


def _hparams_dir() -> Path:
    """The shipped files: ``fastedit/hparams`` in an installed wheel, else ``hparams/`` of the source tree."""
    installed = Path(__file__).resolve().parents[1] / "hparams"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "hparams"


HPARAMS_DIR = _hparams_dir()


@dataclass(frozen=True)
class EditHparams:
    """Hyperparameters of one editing method on one model (family).

    v*: Adam on δ for ``v_num_grad_steps`` steps at ``v_lr`` (relative to the RMS of the hidden state when
    ``v_lr_relative``), clamp ‖δ‖ ≤ clamp_norm_factor·‖h‖, loss = NLL + kl_factor·KL + v_weight_decay·‖δ‖/‖h‖².
    ``v_mode``: "reference" (plain full-model loop per request), "fast" (per request: reuse the layers below δ
    and the keys/values of the tokens before the subject, logits only where the loss reads), "batched" (fast,
    all requests of a batch at once). Every mode stops a request at total loss below
    ``v_loss_threshold`` (the reference tools' rule), at target NLL below ``v_nll_stop`` or when its NLL stalls.
    ``v_nll_stop`` 0.01: the loss rule alone ends at a mean target NLL of ~0.02 on SmolLM2 and ~0.009 on Gemma 3
    (benchmarks/edit_speed.py); a stop at 0.05 cost 4 points of ES, 0.02 cost Gemma 3 points of PS and gave
    SmolLM2 3 points more NS than the loss rule alone.
    """

    method: str
    layers: tuple[int, ...]
    clamp_norm_factor: float
    v_weight_decay: float
    mom2_update_weight: float = 15000.0  # λ: the editors use C = λ·C0 + εI
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    kl_factor: float = 0.0625
    v_loss_threshold: float = 0.05  # a request stops once its total loss is below this (the reference tools' rule)
    v_mode: str = "batched"  # fastest on CPU too; "reference" is the plain loop, kept for comparisons
    v_lr_relative: bool = False  # scale the step by rms(h): Adam moves δ by ~v_lr·rms(h) per coordinate
    v_nll_stop: float = 0.01  # ...or once its target NLL is below this
    v_nll_patience: int = 3  # ...or once its NLL improved by < 1% for this many steps
    kl_prompt: str = "{} is a"
    context_seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_length: int = 10  # tokens per generated prefix (seed included)
    context_seed: int = 0  # RNG seed of the prefix generation
    rel_eps: float = 1e-6  # ε of C = λ·C0 + εI, relative to λ·C0's mean eigenvalue (keeps a small-d_m C0 invertible)
    emmet_mu: float = 0.0  # EMMET: 0 = the exact equality-constrained solve; μ > 0 equals MEMIT at λ·μ
    nullspace_threshold: float = 1e-3  # AlphaEdit: eigenvalues of C0 below this × the largest span the null space
    alphaedit_l2: float = 10.0  # AlphaEdit: α of (...)+αI
    # AlphaEdit with earlier batches' keys: "penalty" is the published K_p K_pᵀ term (ΔW K_p ≈ 0, tighter as α
    # shrinks); "exact" also removes span(P K_p) from the null space, so ΔW K_p = 0 up to rounding.
    alphaedit_previous: str = "penalty"
    # MEMIT/EMMET/AlphaEdit: each request's prompt template filled with this many other subjects of the batch
    # (bare prompts, unedited model); their keys K_t join what the update preserves, C = λC0 + εI + w·K_t K_tᵀ
    # with w = template_neighbours_weight (template_neighbours.py). 0 = off. ROME (one request at a time) ignores it.
    # template_neighbours_source: "batch" (the batch's other subjects) or "model" (names the model lists as of
    # each subject's kind, siblings.py).
    template_neighbours: int = 0
    template_neighbours_weight: float = 0.0
    template_neighbours_source: str = "batch"
    # Post-MLP-norm families only (Gemma 2/3; docs in fastedit/editing/postnorm.py): "per_layer" optimises one
    # δ per edited layer on its mlp_out output, the norms in the loop; "project" optimises δ on the residual and
    # maps each layer's share to the nearest change the norm can emit; "ignore" asks W for the residual change
    # itself; "output_site" optimises δ on the last layer's mlp_out output (baselines kept for the norm study).
    post_norm: str = "per_layer"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (sweep, source)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"hparams: method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.v_mode not in V_MODES:
            raise ConfigError(f"hparams: v_mode {self.v_mode!r} is not one of {', '.join(V_MODES)}")
        if self.post_norm not in POST_NORM_MODES:
            raise ConfigError(f"hparams: post_norm {self.post_norm!r} is not one of {', '.join(POST_NORM_MODES)}")
        if self.alphaedit_previous not in PREVIOUS_KEYS_MODES:
            raise ConfigError(
                f"hparams: alphaedit_previous {self.alphaedit_previous!r} is not one of "
                + ", ".join(PREVIOUS_KEYS_MODES)
            )
        if not self.layers:
            raise ConfigError("hparams: layers is empty; give at least one layer index")
        if list(self.layers) != sorted(set(self.layers)):
            raise ConfigError(f"hparams: layers {list(self.layers)} must be strictly increasing")
        if self.method == "rome" and len(self.layers) != 1:
            raise ConfigError(f"hparams: ROME edits one layer, got layers {list(self.layers)}")
        if self.v_num_grad_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise ConfigError("hparams: v_num_grad_steps, v_lr and clamp_norm_factor must be positive")
        if not self.mom2_update_weight > 0:
            raise ConfigError("hparams: mom2_update_weight (λ) must be positive")
        if not self.rel_eps >= 0 or not self.emmet_mu >= 0 or not self.alphaedit_l2 >= 0:
            raise ConfigError("hparams: rel_eps, emmet_mu and alphaedit_l2 must be non-negative")
        if self.template_neighbours < 0 or not self.template_neighbours_weight >= 0:
            raise ConfigError("hparams: template_neighbours and template_neighbours_weight must be non-negative")
        if self.template_neighbours_source not in NEIGHBOUR_SOURCES:
            raise ConfigError(
                f"hparams: template_neighbours_source {self.template_neighbours_source!r} is not one of "
                + ", ".join(NEIGHBOUR_SOURCES)
            )
        if not 0 < self.nullspace_threshold < 1:
            raise ConfigError(
                f"hparams: nullspace_threshold {self.nullspace_threshold} is relative to C0's largest eigenvalue; "
                "give a value in (0, 1), e.g. 1e-3"
            )

    def replace(self, **changes: Any) -> EditHparams:
        return dataclasses.replace(self, **changes)


def _name_key(name: str) -> str:
    """A model name as a file stem: its last path part only (a hub id's repo name, a folder's base name), so a
    name never selects a file outside the hparams folder (``/some/dir`` must not read ``/some/dir.json``)."""
    base = Path(name.rstrip("/\\")).name
    return "" if base in ("", ".", "..") else base.lower()


def _family_of_path(name: str) -> str | None:
    """The model_type in a local model folder's config.json (None when it is not a readable folder)."""
    config = Path(name).expanduser() / "config.json"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    family = raw.get("model_type") if isinstance(raw, dict) else None
    return family if isinstance(family, str) and family else None


def _model_keys(model_or_family: Any) -> tuple[list[str], str | None]:
    """Candidate file stems: the model's name first, then the family (model_type)."""
    if isinstance(model_or_family, str):
        return [_name_key(model_or_family)], _family_of_path(model_or_family)
    from fastedit.arch import arch_for
    from fastedit.models import model_name

    return [_name_key(model_name(model_or_family))], arch_for(model_or_family).model_type


def hparams_path(method: str, model_or_family: Any, variant: str | None = None) -> Path:
    """The hparams file ``load_hparams`` would use (model-specific file first, else the family file); with
    ``variant``, the file ``<model or family>-<variant>.json``."""
    if method not in METHODS:
        raise ConfigError(f"unknown editing method {method!r}; choose one of {', '.join(METHODS)}")
    names, family = _model_keys(model_or_family)
    folder = HPARAMS_DIR / method
    suffix = f"-{variant}" if variant else ""
    stems = [s for s in [*names, *([family] if family else [])] if s]
    for stem in stems:
        candidate = folder / f"{stem}{suffix}.json"
        if candidate.parent == folder and candidate.is_file():
            return candidate
    wanted = names[-1] + (f" (family {family})" if family else "")
    if variant:
        shipped = sorted({p.stem[len(stem) + 1 :] for stem in stems for p in folder.glob(f"{stem}-*.json")})
        raise ConfigError(
            f"no {method} hparams variant {variant!r} for {wanted} (shipped variants: {', '.join(shipped) or 'none'}); "
            "pass one of them or an hparams file (--hparams FILE)"
        )
    available = sorted(p.stem for p in folder.glob("*.json"))
    raise ConfigError(
        f"no {method} hparams for {wanted} in {folder} (available: {', '.join(available) or 'none'}); "
        "pass an hparams file explicitly (--hparams FILE)"
    )


def is_variant_name(value: str) -> bool:
    """``--hparams`` names a shipped variant (``fast``) rather than a file: no such file, and a plain name."""
    return not Path(value).exists() and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", value) is not None


def load_hparams(
    method: str, model_or_family: Any, path: str | Path | None = None, *, variant: str | None = None
) -> EditHparams:
    """Load the hparams of ``method`` for a model (object or name) or family; ``path`` overrides the lookup,
    ``variant`` picks ``<model>-<variant>.json`` beside the model's file.

    A ``.yaml`` path is an EasyEdit hparams file: its keys that map override the model's own hparams."""
    if path is not None and Path(path).suffix.lower() in (".yaml", ".yml"):  # an EasyEdit hparams file
        from fastedit.editing.easyedit import easyedit_hparams

        try:
            base = load_hparams(method, model_or_family)
        except ConfigError:
            base = None
        return easyedit_hparams(method, path, base)
    source = Path(path) if path is not None else hparams_path(method, model_or_family, variant)
    hp = load_dataclass_file(EditHparams, source)
    if hp.method != method:
        raise ConfigError(f"{source}: holds hparams for method {hp.method!r}, not {method!r}")
    return hp


def check_layers(hp: EditHparams, n_layers: int) -> None:
    """An hparams layer beyond the model's depth is a clear error (not an IndexError deep in a hook)."""
    bad = [layer for layer in hp.layers if layer < 0 or layer >= n_layers]
    if bad:
        raise ConfigError(
            f"hparams layers {bad} are outside this model's {n_layers} layers (0..{n_layers - 1}); "
            "choose layers inside the model in the hparams file"
        )
