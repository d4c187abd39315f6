"""Integrated gradients over FFN neurons: which MLP neurons carry an answer (Dai et al. 2022, Knowledge Neurons).

A neuron is one input unit of an MLP's down projection, one key of the key–value memory. Its attribution for
a score s (an answer's probability or log-probability) is  a_i · (1/m) Σ_k ∂s(α_k·a)/∂a_i : the layer's activations a
at the chosen positions are scaled from 0 to their value in m Riemann steps α_k, the gradients summed. Used by
Knowledge Neurons (chapter 5, kn.py) and by the right to be forgotten (chapter 8, privacy.py).
`reference_attribution` is the plain form, one layer and one step per forward; `attribution`, tested equal, puts
every (layer, step) pair of a chunk of layers in one batch, and computes what the scaling cannot change once: the
tokens before `start` (a KV cache) and the blocks below the chunk (replayed).
"""
from contextlib import ExitStack

import torch

from .adapters import cache_tensors, kv_cache, module_name, num_layers
from .hooks import first_tensor, patch, record, replace_first_tensor, replay
from .requests import EditError

RULES = ("left", "midpoint", "right")   # where in each of the m intervals the gradient is taken
MAX_TOKENS = 2048                       # tokens per batched forward (rows × sequence length)


def alphas(steps, rule="midpoint"):
    """The m scaling factors α_k: (k + 0, ½ or 1)/m for k = 0..m-1 (the paper's sum is k/m, k = 1..m: "right")."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise EditError(f"steps: expected a positive integer number of integration steps, got {steps!r}")
    if rule not in RULES:
        raise EditError(f"rule: expected one of {RULES}, got {rule!r}")
    return (torch.arange(steps, dtype=torch.float32) + RULES.index(rule) / 2) / steps


def answer_logprob(positions, token_ids):
    """Score: Σ_j log P(token_ids[j] at positions[j]) per row (positions counted from `start`)."""
    def score(logits):
        logp = logits[:, positions].float().log_softmax(-1)
        return logp.gather(-1, token_ids.to(logits.device).expand(len(logits), -1)[..., None]).squeeze(-1).sum(1)
    return score


def next_token_prob(token_id):
    """Score: P(token_id) at the last position per row (the paper's probability of the answer)."""
    return lambda logits: logits[:, -1].float().softmax(-1)[:, token_id]


def _check(ids, start, attributed):
    """ids as (1, n); the attributed positions relative to `start` (default: all from `start` on)."""
    ids = ids.reshape(1, -1)
    n = ids.shape[1]
    if not 0 <= start < n:
        raise ValueError(f"start: expected a position from 0 to {n - 1}, got {start}")
    at = torch.arange(start, n) if attributed is None else torch.as_tensor(attributed).flatten().cpu()
    if len(at) == 0 or at.min() < start or at.max() >= n:
        raise ValueError(f"attributed: expected positions from {start} to {n - 1}, got {at.tolist()}")
    return ids, at - start


def reference_attribution(model, ids, layers, score, steps=20, start=0, attributed=None, rule="midpoint"):
    """Integrated gradients in plain code: one full forward per layer and step; (len(layers), d_mlp) float32.

    The activations at positions start.. of one layer are scaled by α; `score(logits of positions start..)` -> (1,).
    """
    ids, at = _check(ids, start, attributed)
    out = []
    for layer in layers:
        captured, total = {}, 0.0
        for alpha in alphas(steps, rule):
            def scale(x, alpha=alpha):
                captured.setdefault("base", x.detach())
                scaled = captured["base"].clone()
                scaled[:, start:] *= alpha
                captured["scaled"] = scaled.requires_grad_(True)
                return captured["scaled"]
            with torch.enable_grad(), patch(model, module_name(model, "mlp_out", layer), scale, what="input"):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                grad, = torch.autograd.grad(score(logits[:, start:]).sum(), captured["scaled"])
            total = total + grad[0, start:].float()
        out.append((captured["base"][0, start:].float() * total / steps)[at].sum(0))
    return torch.stack(out)


@torch.no_grad()
def _prefix(model, ids, start):
    """Keys and values of the tokens before `start` ([] if none): the scaling cannot reach them."""
    if start == 0:
        return []
    head = ids[:, :start]
    return cache_tensors(model.base_model(input_ids=head, attention_mask=torch.ones_like(head),
                                          use_cache=True).past_key_values)


def _suffix_logits(model, ids, start, past, rows):
    """Logits of positions start.. for `rows` copies of the sequence, after the cached prefix."""
    copies = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in past]
    cached = {"past_key_values": kv_cache(model, copies), "use_cache": True} if past else {"use_cache": False}
    hidden = model.base_model(input_ids=ids[:, start:].expand(rows, -1),
                              attention_mask=torch.ones(rows, ids.shape[1], dtype=torch.long, device=ids.device),
                              position_ids=torch.arange(start, ids.shape[1], device=ids.device).expand(rows, -1),
                              **cached).last_hidden_state
    return model.get_output_embeddings()(hidden)


@torch.no_grad()
def _blocks_unscaled(model, ids, start, past):
    """Every block's whole output on positions start.., unscaled: a chunk replays those below its lowest layer."""
    blocks = [module_name(model, "layer", j) for j in range(num_layers(model))]
    with record(model, blocks, whole=True) as outputs:
        _suffix_logits(model, ids, start, past, 1)
    return [outputs[name] for name in blocks]


def _replayed(model, below, rows):
    """{block: its recorded output, copied for `rows` rows} for the blocks in `below`."""
    copy = lambda out: replace_first_tensor(out, first_tensor(out).expand(rows, -1, -1).contiguous())
    return {module_name(model, "layer", j): copy(out) for j, out in enumerate(below)}


def _chunk_attribution(model, ids, start, past, below, chunk, alpha, score, at):
    """One forward and backward for every (layer, step) row of `chunk`: row j·m + k scales layer chunk[j] by α_k.

    The blocks below the chunk's lowest layer are the same for every row, so they replay `below` instead.
    """
    m = len(alpha)
    rows = len(chunk) * m
    owner = torch.arange(rows) // m
    zeros, base = {}, {}

    def scaler(j):
        def fn(x):
            factor = torch.where(owner == j, alpha.repeat(len(chunk)), torch.ones(rows)).to(x.device, x.dtype)
            base[j] = x[j * m].detach()                # row j·m scales only this layer: its input here is unscaled
            zeros[j] = torch.zeros_like(x, dtype=torch.float32, requires_grad=True)   # its grad: ∂score/∂(α·x)
            return x * factor[:, None, None] + zeros[j].to(x.dtype)
        return fn
    with torch.enable_grad(), ExitStack() as stack:
        stack.enter_context(replay(model, _replayed(model, below[:min(chunk)], rows)))
        for j, layer in enumerate(chunk):
            stack.enter_context(patch(model, module_name(model, "mlp_out", layer), scaler(j), what="input"))
        grads = torch.autograd.grad(score(_suffix_logits(model, ids, start, past, rows)).sum(),
                                    [zeros[j] for j in range(len(chunk))])
    return torch.stack([(base[j].float() * grads[j][j * m:(j + 1) * m].sum(0) / m)[at].sum(0)
                        for j in range(len(chunk))])


def attribution(model, ids, layers, score, steps=20, start=0, attributed=None, rule="midpoint",
                max_tokens=MAX_TOKENS):
    """reference_attribution, batched: (len(layers), d_mlp) float32, the same numbers up to float rounding."""
    ids, at = _check(ids, start, attributed)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: expected distinct layer indices, got {list(layers)}")
    alpha, order = alphas(steps, rule), sorted(range(len(layers)), key=lambda i: layers[i])
    past = _prefix(model, ids, start)
    below = _blocks_unscaled(model, ids, start, past)
    per_chunk = max(1, max_tokens // (steps * ids.shape[1]))
    ordered = [layers[i] for i in order]                      # consecutive layers share what they replay
    scores = torch.cat([_chunk_attribution(model, ids, start, past, below, ordered[i:i + per_chunk], alpha, score, at)
                        for i in range(0, len(ordered), per_chunk)])
    return scores[torch.argsort(torch.tensor(order))]
