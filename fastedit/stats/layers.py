"""Default layers to precompute: every layer the model's (or family's) hparams files edit, else the design card's
layers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastedit.arch import ArchSpec
from fastedit.config import load_dataclass_file
from fastedit.errors import ConfigError
from fastedit.stats.errors import StatsError

log = logging.getLogger(__name__)

# Reference MEMIT layers (DESIGN.md) used when no hparams file names the family's layers.
REFERENCE_LAYERS: dict[str, tuple[int, ...]] = {
    "gpt2": (13, 14, 15, 16, 17),  # gpt2-xl
    "gptj": (3, 4, 5, 6, 7, 8),
    "llama": (4, 5, 6, 7, 8),
    "mistral": (4, 5, 6, 7, 8),
    "qwen2": (4, 5, 6, 7, 8),
    "qwen3": (4, 5, 6, 7, 8),
}
GENERIC_FRACTION = 0.15  # otherwise: 5 consecutive layers from 15% of the depth (4-8 of Llama-2-7B's 32)


def hparams_dirs() -> list[Path]:
    """Where `hparams/memit/` may live: the working directory, then the repository around the package."""
    package_root = Path(__file__).resolve().parents[2]
    return [Path.cwd() / "hparams" / "memit", package_root / "hparams" / "memit"]


def layers_from_hparams(path: str | Path) -> list[int]:
    """The ``layers`` of an editing hparams file (EasyEdit YAML: its ``layers`` list; JSON: loaded and validated
    strictly as `EditHparams`)."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):  # EasyEdit hparams
        from fastedit.editing.easyedit import read_yaml

        raw = read_yaml(path)
        layers = raw.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers):
            raise ConfigError(f"hparams file {path} has no layers list of integers; add one or pass --layers")
        return layers
    from fastedit.editing.hparams import EditHparams

    if not path.is_file():
        raise ConfigError(f"hparams file {str(path)!r} does not exist; check the path")
    return list(load_dataclass_file(EditHparams, path).layers)


def _layers_of_reference_file(path: Path) -> list[int]:
    """The ``layers`` list of a shipped hparams file (only the list is read: any method's file will do)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"hparams file {path} is not valid JSON ({exc})") from None
    layers = raw.get("layers") if isinstance(raw, dict) else None
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers):
        raise ConfigError(f'hparams file {path} has no "layers" list of integers; add one or pass --layers')
    return layers


def family_names(spec: ArchSpec, name: str | None) -> list[str]:
    """Candidate hparams file stems, most specific first: the model name, its model_type, the spec's aliases."""
    names = []
    if name:
        names.append(name.rstrip("/").split("/")[-1])
    names += [spec.model_type, *spec.aliases]
    return list(dict.fromkeys(names))


def default_layers(model: Any, spec: ArchSpec, name: str | None = None) -> tuple[list[int], str]:
    """(layers, where they came from): the union of the layers that hparams/<method>/<stem>.json edit over every
    method, for the first stem (model, then family) with a MEMIT file; else REFERENCE_LAYERS / generic. The union,
    because one precompute should serve every editor: a model's files may edit different layers per method."""
    from fastedit.editing.hparams import METHODS

    n_layers = spec.n_layers(model.config)
    for folder in hparams_dirs():
        for stem in family_names(spec, name):
            path = folder / f"{stem}.json"
            if path.is_file():
                others = (folder.parent / method / f"{stem}.json" for method in METHODS)
                paths = [path, *(p for p in others if p != path and p.is_file())]
                layers = sorted({layer for p in paths for layer in _layers_of_reference_file(p)})
                if max(layers) < n_layers:
                    return layers, ", ".join(str(p) for p in paths)
                log.warning("%s name layers %s, beyond this model's %d layers; ignoring them", paths, layers, n_layers)
    ref = REFERENCE_LAYERS.get(spec.model_type)
    if ref and max(ref) < n_layers:
        return list(ref), f"reference MEMIT layers of {spec.model_type}"
    start = min(int(GENERIC_FRACTION * n_layers), max(0, n_layers - 5))
    return list(range(start, min(start + 5, n_layers))), f"generic default ({GENERIC_FRACTION:.0%} of depth)"


def check_layer_list(layers: Any) -> list[int]:
    """Sorted unique non-negative layer indices (the model's depth is checked once it is known)."""
    try:
        out = sorted({int(x) for x in layers})
    except (TypeError, ValueError):
        raise StatsError(f"layers must be integers, got {layers!r}") from None
    if not out:
        raise StatsError("no layers given; pass --layers 4,5,6 (or an hparams file with a layers list)")
    negative = [x for x in out if x < 0]
    if negative:
        raise StatsError(f"layer(s) {negative} are negative; layer indices start at 0")
    return out


def check_layers(layers: Any, n_layers: int) -> list[int]:
    """Sorted unique layer indices, each in [0, n_layers)."""
    out = check_layer_list(layers)
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise StatsError(f"layer(s) {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return out
