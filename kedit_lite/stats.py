"""Second-moment statistics C = E[k kᵀ] of the MLP keys (chapter 5): the "other keys" ROME and MEMIT protect.

ROME and MEMIT estimate C from Wikipedia. Offline we let the model write the text itself: batched sampling
from one-token starters, reading the keys (the mlp_out input) during generation, so no second pass is needed.
Any local list of strings works too (`source=[...texts]`), and online, `source="wikitext"` uses `datasets`.
Results are cached per model + layer + source + token count as safetensors in the kedit cache directory.
"""
import hashlib
import re

import torch
from tqdm.auto import tqdm

from .adapters import embedding_matrix, layer_module, mlp_dims, module_name
from .keys_values import run_until
from .models import cache_dir, model_name

DEFAULT_N_TOKENS = 8_000    # ≈ 5 × d_k for SmolLM2 (d_k = 1536); FastMEMIT: ~10 × d_k keeps ≥ 95 % of quality; the
#                             ridge in ROME's C (mom2_weight) makes up for fewer tokens; chapter 5 measures it
_MEMORY = {}                # (cache key) -> E[kkᵀ] on the model's device
_STARTERS = ["The", "In", "A", "He", "She", "It", "This", "My", "When", "After", "According", "There", "Many",
             "Our", "John", "London", "Music", "Science", "On", "One", "Most", "We", "If", "During", "Some",
             "Paris", "Football", "Water", "History", "Today", "Its", "For"]


def _fingerprint(model):
    """Short hash of the (never edited) token embeddings, so two random tiny models never share a cache."""
    emb = embedding_matrix(model)
    probe = emb[:64].detach().double().cpu()
    text = f"{tuple(emb.shape)}:{probe.sum().item():.10e}:{probe.abs().sum().item():.10e}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _source_key(source):
    if isinstance(source, str):
        if source not in ("sample", "wikitext"):
            raise ValueError(f"source: expected 'sample', 'wikitext' or a list of strings, got {source!r}")
        return source
    if isinstance(source, (list, tuple)) and source and all(isinstance(t, str) for t in source):
        return "texts-" + hashlib.sha1("\x00".join(source).encode()).hexdigest()[:10]
    raise ValueError("source: expected 'sample', 'wikitext' or a non-empty list of strings")


def cache_path(model, layer, n_tokens, source="sample"):
    """Where the statistics of `layer` are cached (one safetensors file per model+layer+source+n_tokens)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name(model))
    return cache_dir() / "stats" / f"{name}-{_fingerprint(model)}" / f"L{layer}-{_source_key(source)}-{n_tokens}.safetensors"


class _Accumulator:
    """Running Σ k kᵀ and count for several layers, fed by forward pre-hooks on mlp_out."""

    def __init__(self, model, layers):
        d_k = mlp_dims(model)[1]
        device = next(model.parameters()).device
        self.sums = {layer: torch.zeros(d_k, d_k, device=device, dtype=torch.float32) for layer in layers}
        self.count, self.mask, self.handles, self.paths = 0, None, [], []
        for layer in layers:
            module = layer_module(model, "mlp_out", layer)
            self.paths.append(module_name(model, "mlp_out", layer))
            self.handles.append(module.register_forward_pre_hook(lambda m, i, layer=layer: self._add(layer, i[0])))

    def _add(self, layer, keys):
        keys = keys.detach().float()
        keys = keys[self.mask.bool()] if self.mask is not None else keys.reshape(-1, keys.shape[-1])
        self.sums[layer] += keys.T @ keys
        if layer == next(iter(self.sums)):
            self.count += keys.shape[0]

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _sample_into(acc, model, tok, n_tokens, batch_size, seq_len, seed, progress):
    """Let the model write text from one-token starters; the hooks see every key on the way (KV cache = 1 pass)."""
    device = next(model.parameters()).device
    starters = [tok(s, add_special_tokens=False).input_ids[0] for s in _STARTERS]
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=n_tokens, desc="C = E[kkᵀ] (model-sampled text)", disable=not progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        while acc.count < n_tokens:
            left = n_tokens - acc.count
            rows = min(batch_size, max(1, -(-left // (seq_len + 1))))
            ids = torch.tensor([[starters[i]] for i in torch.randint(len(starters), (rows,), generator=gen)],
                               device=device)
            before = acc.count
            new = min(seq_len, max(1, -(-left // rows) - 1))
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id,
                           top_p=None, temperature=None)
            bar.update(acc.count - before)
    bar.close()


@torch.no_grad()
def _texts_into(acc, model, tok, texts, n_tokens, batch_size, seq_len, progress):
    """Run a text list through the model (right-padded batches), counting only real tokens."""
    device = next(model.parameters()).device
    bar = tqdm(total=n_tokens, desc="C = E[kkᵀ] (texts)", disable=not progress)
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                  max_length=seq_len, add_special_tokens=False)
        acc.mask = enc["attention_mask"].to(device)
        before = acc.count
        run_until(model, enc["input_ids"].to(device), acc.mask, acc.paths)  # layers above are not needed
        bar.update(acc.count - before)
        if acc.count >= n_tokens:
            break
    bar.close()
    acc.mask = None


def _wikitext(n_tokens):
    """Non-empty wikitext-103 paragraphs (online only; needs the `datasets` package)."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise RuntimeError("source: 'wikitext' needs `pip install datasets` and internet; offline use "
                           "source='sample' (text the model writes itself)") from err
    data = load_dataset("wikitext", "wikitext-103-raw-v1", split="train")
    texts = [t for t in data["text"][: 50 * n_tokens // 100 + 1000] if len(t.split()) > 20]
    return texts


def second_moments(model, tok, layers, n_tokens=DEFAULT_N_TOKENS, source="sample", batch_size=32, seq_len=96,
                   seed=0, progress=True, use_cache=True):
    """{layer: E[k kᵀ]} (d_k × d_k, float32, on the model's device) from cache or one pass over `source`."""
    if not (isinstance(n_tokens, int) and not isinstance(n_tokens, bool) and n_tokens > 0):
        raise ValueError(f"n_tokens: expected a positive integer, got {n_tokens!r}")
    layers = [layers] if isinstance(layers, int) else list(layers)
    device = next(model.parameters()).device
    out, missing = {}, []
    for layer in layers:
        path = cache_path(model, layer, n_tokens, source)
        key = (str(path), str(device))
        if use_cache and key in _MEMORY:
            out[layer] = _MEMORY[key]
        elif use_cache and path.exists():
            from safetensors.torch import load_file
            out[layer] = _MEMORY[key] = load_file(str(path))["mom2"].to(device)
        else:
            missing.append(layer)
    if missing:
        acc = _Accumulator(model, missing)
        try:
            if source == "sample":
                _sample_into(acc, model, tok, n_tokens, batch_size, seq_len, seed, progress)
            else:
                texts = _wikitext(n_tokens) if source == "wikitext" else source
                _texts_into(acc, model, tok, texts, n_tokens, batch_size, seq_len, progress)
        finally:
            acc.close()
        if acc.count == 0:
            raise ValueError("source: no tokens were read; pass non-empty texts")
        from safetensors.torch import save_file
        for layer in missing:
            mom2 = acc.sums[layer] / acc.count
            path = cache_path(model, layer, n_tokens, source)
            if use_cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                save_file({"mom2": mom2.cpu().contiguous(), "count": torch.tensor([acc.count])}, str(tmp),
                          metadata={"model": model_name(model), "layer": str(layer), "n_tokens": str(acc.count)})
                tmp.replace(path)
                _MEMORY[(str(path), str(device))] = mom2
            out[layer] = mom2
    return out


def second_moment(model, tok, layer, **kwargs):
    """E[k kᵀ] of one layer's mlp_out input (see `second_moments`)."""
    return second_moments(model, tok, [layer], **kwargs)[layer]


def clear_memory_cache():
    """Forget the in-memory copies (the files stay)."""
    _MEMORY.clear()
