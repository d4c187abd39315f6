"""Architecture adapters: where each model family keeps its blocks, attention, MLP, norms and head.

Everything in `kedit_lite` asks an adapter instead of hard-coding module names (chapter 4 and 5 rely
on it to find "the MLP output projection of layer 17" in GPT-2, GPT-J, Pythia or Llama alike).
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family; `{}` stands for the layer index."""
    family: str
    embed: str
    layers: str
    attn: str
    mlp: str
    mlp_in: tuple          # input projections of the MLP (the "keys" side); gated MLPs have two
    mlp_out: str           # output (down) projection: the "values" side that ROME edits
    final_norm: str
    lm_head: str
    conv1d: bool = False   # GPT-2 stores Linear weights transposed, as (in, out)
    gated: bool = False    # Llama-style MLP: down(act(gate(x)) * up(x))
    n_layers_attr: str = "num_hidden_layers"


_GPT2 = Adapter("gpt2", "transformer.wte", "transformer.h", "transformer.h.{}.attn", "transformer.h.{}.mlp",
                ("transformer.h.{}.mlp.c_fc",), "transformer.h.{}.mlp.c_proj", "transformer.ln_f", "lm_head",
                conv1d=True)
_GPTJ = Adapter("gptj", "transformer.wte", "transformer.h", "transformer.h.{}.attn", "transformer.h.{}.mlp",
                ("transformer.h.{}.mlp.fc_in",), "transformer.h.{}.mlp.fc_out", "transformer.ln_f", "lm_head")
_NEOX = Adapter("gpt_neox", "gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.layers.{}.attention",
                "gpt_neox.layers.{}.mlp", ("gpt_neox.layers.{}.mlp.dense_h_to_4h",),
                "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head")
_LLAMA = Adapter("llama", "model.embed_tokens", "model.layers", "model.layers.{}.self_attn", "model.layers.{}.mlp",
                 ("model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj"), "model.layers.{}.mlp.down_proj",
                 "model.norm", "lm_head", gated=True)

# model_type (from the Hugging Face config) -> adapter. SmolLM2 reports model_type "llama".
ADAPTERS = {"gpt2": _GPT2, "gptj": _GPTJ, "gpt_neox": _NEOX, "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA}


def get_adapter(model):
    """Return the adapter for `model`, or raise a clear error listing the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"model: architecture {model_type!r} is not supported by kedit_lite; "
                         f"supported model_type values are {sorted(ADAPTERS)}. "
                         "Add an entry to kedit_lite.adapters.ADAPTERS to support it.")
    return ADAPTERS[model_type]


def get_module(model, path):
    """Resolve a dotted module path such as 'model.layers.3.mlp'."""
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def num_layers(model):
    """Number of transformer blocks."""
    return len(get_module(model, get_adapter(model).layers))


def check_layer(model, layer, field="layer"):
    """Raise a clear error unless 0 <= layer < num_layers(model); return the layer as an int."""
    from .checks import is_integer
    n = num_layers(model)
    if not is_integer(layer):   # numpy integers are fine, bools are not layer numbers
        raise TypeError(f"{field}: expected an integer layer index in [0, {n - 1}], got {layer!r}")
    if not 0 <= layer < n:
        raise ValueError(f"{field}: layer {layer} is out of range; this model has {n} layers, "
                         f"so use an index from 0 to {n - 1}")
    return int(layer)


def module_name(model, kind, layer=None):
    """Path of a module by kind: 'embed', 'layer', 'attn', 'mlp', 'mlp_out', 'mlp_in', 'final_norm', 'lm_head'."""
    a = get_adapter(model)
    if kind == "layer":
        return f"{a.layers}.{check_layer(model, layer)}"
    if kind == "lm_head":  # renamed across transformers versions (GPT-NeoX: embed_out -> lm_head)
        head = model.get_output_embeddings()
        return next(name for name, module in model.named_modules() if module is head)
    if kind in ("embed", "final_norm"):
        return getattr(a, kind)
    if kind not in ("attn", "mlp", "mlp_out", "mlp_in"):
        raise ValueError(f"kind: unknown module kind {kind!r}; use one of embed, layer, attn, mlp, mlp_in, "
                         "mlp_out, final_norm, lm_head")
    check_layer(model, layer)
    if kind == "mlp_in":
        return a.mlp_in[-1].format(layer)  # the projection whose output feeds down_proj's input directly
    return getattr(a, kind).format(layer)


def layer_module(model, kind, layer=None):
    """The module itself (see `module_name`)."""
    return get_module(model, module_name(model, kind, layer))


def mlp_out_weight_name(model, layer):
    """Parameter name of the MLP output projection's weight at `layer` (what ROME/MEMIT/FT-L edit)."""
    return module_name(model, "mlp_out", layer) + ".weight"


def as_out_in(model, weight):
    """View a projection weight as (out_features, in_features) whatever the storage (Conv1D is (in, out))."""
    return weight.t() if get_adapter(model).conv1d else weight


def mlp_dims(model, layer=0):
    """(d_model, d_mlp) as seen by the MLP output projection: it maps d_mlp -> d_model."""
    w = as_out_in(model, layer_module(model, "mlp_out", layer).weight)
    return w.shape[0], w.shape[1]


def device_of(model):
    """The device of the model's parameters (where inputs must go)."""
    return next(model.parameters()).device


def embedding_matrix(model):
    """Input embedding weight (vocab, d_model)."""
    return layer_module(model, "embed").weight


@torch.no_grad()
def describe(model):
    """A one-line-per-fact summary of the architecture, for notebooks."""
    a = get_adapter(model)
    d_model, d_mlp = mlp_dims(model)
    n_params = sum(p.numel() for p in model.parameters())
    return {"family": a.family, "model_type": model.config.model_type, "layers": num_layers(model),
            "d_model": d_model, "d_mlp": d_mlp, "parameters": n_params,
            "mlp_out": a.mlp_out.format("L"), "gated_mlp": a.gated, "conv1d": a.conv1d,
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)}


def cache_tensors(cache):
    """[(keys, values)] per layer of a Hugging Face KV cache (transformers 5 `.layers`, 4.x `key_cache`)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def kv_cache(model, tensors):
    """A fresh Hugging Face cache holding [(keys, values)] per layer (the model appends to it, not to `tensors`)."""
    from transformers import DynamicCache
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    for layer, (k, v) in enumerate(tensors):
        cache.update(k, v, layer)
    return cache
