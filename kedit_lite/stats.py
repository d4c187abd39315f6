"""Second-moment statistics C = E[k kᵀ] of the MLP keys (chapter 5): the "other keys" ROME and MEMIT protect.

ROME and MEMIT estimate C from Wikipedia. Offline we let the model write the text itself: batched sampling
from one-token starters, reading the keys (the mlp_out input) during generation, so no second pass is needed.
Any local list of strings works too (`source=[...texts]`), and online, `source="wikitext"` uses `datasets`.
Results are cached per model + layer + source + token count as safetensors in the kedit cache directory.
"""
import hashlib
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import checks
from .adapters import embedding_matrix, mlp_dims, module_name
from .caches import Cache
from .forward import run_until
from .hooks import on_forward
from .models import cache_dir, model_name
from .requests import EditError

DEFAULT_N_TOKENS = 8_000    # ≈ 5 × d_k for SmolLM2 (d_k = 1536); FastMEMIT: ~10 × d_k keeps ≥ 95 % of quality; the
#                             ridge in ROME's C (mom2_weight) makes up for fewer tokens; chapter 5 measures it
_MEMORY = Cache("second moments")   # per model: (file, device) -> E[kkᵀ] on the model's device
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
    """A short name of the statistics' source for the cache file name."""
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
    """Running Σ k kᵀ and count for several layers, fed by `hooks.on_forward` on each mlp_out input."""

    def __init__(self, model, layers):
        d_k = mlp_dims(model)[1]
        device = next(model.parameters()).device
        self.model, self.count, self.mask = model, 0, None
        self.paths = [module_name(model, "mlp_out", layer) for layer in layers]
        self.sums = {path: torch.zeros(d_k, d_k, device=device, dtype=torch.float32) for path in self.paths}

    def reading(self):
        """The block within which every forward pass adds its keys."""
        return on_forward(self.model, self.paths, self._add, what="input")

    def _add(self, path, keys):
        """Add one forward's keys (real tokens only) to the sums."""
        keys = keys.detach().float()
        keys = keys[self.mask.bool()] if self.mask is not None else keys.reshape(-1, keys.shape[-1])
        self.sums[path] += keys.T @ keys
        if path == self.paths[0]:
            self.count += keys.shape[0]


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


def _load(model, layer, n_tokens, source, device):
    """E[kkᵀ] from this process or from the cache file, else None."""
    path = cache_path(model, layer, n_tokens, source)
    key = (str(path), str(device))
    found = _MEMORY.peek(key, owner=model)
    if found is None and path.exists():
        from safetensors.torch import load_file
        found = _MEMORY.put(key, load_file(str(path))["mom2"].to(device), owner=model)
    return found


def _save(model, layer, n_tokens, source, mom2, count):
    """Write E[kkᵀ] to its cache file (atomically) and keep it in this process."""
    from safetensors.torch import save_file
    path = cache_path(model, layer, n_tokens, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"mom2": mom2.cpu().contiguous(), "count": torch.tensor([count])}, str(tmp),
              metadata={"model": model_name(model), "layer": str(layer), "n_tokens": str(count)})
    tmp.replace(path)
    _MEMORY.put((str(path), str(mom2.device)), mom2, owner=model)


def _measure(model, tok, layers, n_tokens, source, batch_size, seq_len, seed, progress):
    """{layer: E[kkᵀ]} from one pass over `source` (model-sampled text, wikitext or a list of texts), and the count."""
    acc = _Accumulator(model, layers)
    with acc.reading():
        if source == "sample":
            _sample_into(acc, model, tok, n_tokens, batch_size, seq_len, seed, progress)
        else:
            texts = _wikitext(n_tokens) if source == "wikitext" else source
            _texts_into(acc, model, tok, texts, n_tokens, batch_size, seq_len, progress)
    if acc.count == 0:
        raise ValueError("source: no tokens were read; pass non-empty texts")
    return {layer: acc.sums[path] / acc.count for layer, path in zip(layers, acc.paths)}, acc.count


def second_moments(model, tok, layers, n_tokens=DEFAULT_N_TOKENS, source="sample", batch_size=32, seq_len=96,
                   seed=0, progress=True, use_cache=True):
    """{layer: E[k kᵀ]} (d_k × d_k, float32, on the model's device) from cache or one pass over `source`."""
    if not (isinstance(n_tokens, int) and not isinstance(n_tokens, bool) and n_tokens > 0):
        raise ValueError(f"n_tokens: expected a positive integer, got {n_tokens!r}")
    layers = [layers] if isinstance(layers, int) else list(layers)
    device = next(model.parameters()).device
    out = {layer: _load(model, layer, n_tokens, source, device) for layer in layers} if use_cache else {}
    missing = [layer for layer in layers if out.get(layer) is None]
    if missing:
        measured, count = _measure(model, tok, missing, n_tokens, source, batch_size, seq_len, seed, progress)
        for layer, mom2 in measured.items():
            if use_cache:
                _save(model, layer, n_tokens, source, mom2, count)
            out[layer] = mom2
    return out


def second_moment(model, tok, layer, **kwargs):
    """E[k kᵀ] of one layer's mlp_out input (see `second_moments`)."""
    return second_moments(model, tok, [layer], **kwargs)[layer]


def clear_memory_cache():
    """Forget the in-memory copies (the files stay)."""
    _MEMORY.clear()


def check_source(source, name="mom2_source"):
    """'sample', 'wikitext' or a non-empty list of non-empty texts."""
    texts_ok = isinstance(source, (list, tuple)) and source and all(isinstance(t, str) and t.strip() for t in source)
    if not (source in ("sample", "wikitext") or texts_ok):
        raise EditError(f"{name}: expected 'sample', 'wikitext' or a list of non-empty texts, got {source!r}")
    return source


@dataclass(frozen=True)
class StatsConfig:
    """Where the "other keys" statistics E[kkᵀ] come from; ROME's and MEMIT's configs include these fields."""
    mom2_n_tokens: int = DEFAULT_N_TOKENS   # tokens of text read for E[kkᵀ]
    mom2_source: object = "sample"          # 'sample' (model-written text), 'wikitext' or a list of texts
    mom2_adjustment: bool = True            # False: no statistics (C = I in ROME, a scaled I in MEMIT)

    def __post_init__(self):
        """Check every field; a bad one raises EditError naming it."""
        checks.integer("mom2_n_tokens", self.mom2_n_tokens, 1)
        check_source(self.mom2_source)
        checks.flag("mom2_adjustment", self.mom2_adjustment)
