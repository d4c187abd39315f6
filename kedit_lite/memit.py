"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023), chapter 5.

Many facts in one update, spread over a range of MLP layers R = [l₁ … l_L]:
1. v*: for each fact, a δ at the output of the LAST layer of the range (the residual stream there), computed
   with ROME's machinery (keys_values.compute_deltas); the target residual is z = h_L + δ.
2. For each layer l in R, in order: the keys K (n × d_k) at l with the weights edited so far, the residual still
   missing at the last layer, R = (z − h_L) / (layers left), and the batched least-squares update
        ΔW_l = Rᵀ K (λ·E[kkᵀ] + Kᵀ K)⁻¹
   which keeps the other keys (weighted by λ, `mom2_update_weight`) while writing all n values at once.
`mom2_adjustment=False` replaces E[kkᵀ] by (mean ‖k‖²/d_k)·I (no statistics needed, as in EasyEdit's default).
Named options shared with ROME: `bare_key`, `wordings`. Against the interference between the facts of one batch
(chapter 5): `keep_shared` (the fraction of the batch's mean δ each fact keeps; 1 is MEMIT as published),
`center_deltas` and `protect_subjects=μ` (adds the second moment of other subjects' keys to E[kkᵀ]; off by
default, since it needs subjects like the neighbours). Measurements behind the defaults:
book/results/tuning_history.md.
"""
import torch

from . import checks
from .adapters import as_out_in, check_layer, get_module, mlp_out_weight_name, module_name, num_layers
from .keys_values import (ASSOCIATION_WORDINGS, compute_deltas, context_prefixes, read_at_subject,
                          subject_start_keys)
from .requests import EditError
from .rome import check_hparams, default_layer
from .stats import DEFAULT_N_TOKENS, second_moments

RIDGE = 0.1   # relative to the mean eigenvalue of E[kkᵀ]; like ROME's "+ I"
N_LAYERS = 5  # MEMIT edits 5 (GPT-J) to 6 (GPT-2 XL) consecutive layers around the causal-tracing peak
# ROME's first three wordings: on a batch of 100 CounterFact val facts all five took ~40 % more time per fact and
# some locality (0.86 → 0.84) for paraphrase 0.65 → 0.68 (token accuracy)
WORDINGS = ASSOCIATION_WORDINGS[:3]
# The last layer of the range, where measured (SmolLM2: layers 3-7, around the causal-tracing peak).
DEFAULT_LAST_LAYER = {"SmolLM2-135M-Instruct": 7}


def default_layers(model):
    """N_LAYERS consecutive layers ending at the table's layer, else two above the ROME layer (clipped)."""
    from .models import loaded_name
    n = num_layers(model)
    last = min(n - 1, DEFAULT_LAST_LAYER.get(loaded_name(model), default_layer(model) + 2))
    return list(range(max(0, last - N_LAYERS + 1), last + 1))


def _layers(model, layers):
    layers = default_layers(model) if layers is None else layers
    if checks.is_integer(layers):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise EditError(f"layers: expected an int or a non-empty list of ints, got {layers!r}")
    try:
        layers = [check_layer(model, layer, "layers") for layer in layers]
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err
    if len(set(layers)) != len(layers):
        raise EditError(f"layers: {layers} repeats a layer; list each layer once")
    return sorted(layers)


def touched_parameters(model, requests, layers=None, mom2_update_weight=1500.0, keep_shared=1.0,
                       center_deltas=False, protect_subjects=0.0, other_subjects=None, **hparams):
    """MEMIT changes the MLP down projection of every layer in the range."""
    check_hparams(**hparams)
    checks.flag("center_deltas", center_deltas)
    checks.number("mom2_update_weight", mom2_update_weight, 0, open_low=True)
    checks.number("protect_subjects", protect_subjects, 0)
    names_ok = isinstance(other_subjects, (list, tuple)) and other_subjects and all(
        isinstance(s, str) and s.strip() for s in other_subjects)
    if not (other_subjects is None or other_subjects == "counterfact" or names_ok):
        raise EditError(f"other_subjects: expected a non-empty list of subject names or 'counterfact' (the "
                        f"subjects of 500 CounterFact train records), got {other_subjects!r}")
    if protect_subjects and other_subjects is None:
        raise EditError("other_subjects: protect_subjects needs subjects to protect: pass a list of names, or "
                        "'counterfact' for the subjects of 500 CounterFact train records")
    checks.number("keep_shared", keep_shared, 0, 1, hint="1 keeps MEMIT's δ as they are")
    return [mlp_out_weight_name(model, layer) for layer in _layers(model, layers)]


def _protected_moments(model, tok, layers, other_subjects, requests):
    """{layer: E[kkᵀ]} over the keys of other subjects written alone (the batch's own subjects left out)."""
    if other_subjects == "counterfact":
        from .data import counterfact_subjects
        try:
            other_subjects = counterfact_subjects()
        except OSError as err:  # FileNotFoundError included: no local copy and no download
            raise EditError(f"other_subjects: 'counterfact' needs the CounterFact data ({err}); pass a list of "
                            f"names instead") from err
    editing = {r.subject for r in requests}
    names = [s for s in dict.fromkeys(other_subjects) if s not in editing]
    if not names:
        raise EditError("other_subjects: every name is a subject of this batch; pass other subjects to protect")
    keys = subject_start_keys(model, tok, layers, names)
    return {layer: k.T @ k / len(k) for layer, k in keys.items()}


def apply(model, tok, requests, layers=None, steps=20, lr=0.5, kl_factor=0.0625, weight_decay=0.5,
          clamp_factor=4.0, n_prefixes=2, prefix_len=5, mom2_update_weight=1500.0, mom2_n_tokens=DEFAULT_N_TOKENS,
          mom2_source="sample", mom2_adjustment=True, bare_key=True, stop_loss=5e-2, wordings=WORDINGS,
          keep_shared=1.0, center_deltas=False, protect_subjects=0.0, other_subjects=None, chunk=None, progress=False):
    """Write all requests into the layers' down projections in one batched update per layer."""
    layers = _layers(model, layers)
    touched_parameters(model, requests, layers, mom2_update_weight, keep_shared, center_deltas, protect_subjects,
                       other_subjects, steps=steps, lr=lr,
                       kl_factor=kl_factor, weight_decay=weight_decay, clamp_factor=clamp_factor, n_prefixes=n_prefixes,
                       prefix_len=prefix_len, mom2_n_tokens=mom2_n_tokens, mom2_source=mom2_source,
                       mom2_adjustment=mom2_adjustment, bare_key=bare_key, stop_loss=stop_loss, wordings=wordings)
    if chunk is not None:   # None: keys_values.CHUNK for the device
        checks.integer("chunk", chunk, 1)
    if center_deltas and (len(requests) < 2 or (chunk or 2) < 2):
        raise EditError(f"center_deltas: needs a batch of 2 or more facts and chunk >= 2 (a fact alone has no "
                        f"shared part to leave out); got {len(requests)} facts, chunk {chunk}")
    last = layers[-1]
    prefixes = context_prefixes(model, tok, n_prefixes, prefix_len)
    if mom2_adjustment:
        mom2 = second_moments(model, tok, layers, n_tokens=mom2_n_tokens, source=mom2_source, progress=progress)
    if protect_subjects:
        protected = _protected_moments(model, tok, layers, other_subjects, requests)
    residual = {"z": (module_name(model, "layer", last), "output")}
    deltas, history = compute_deltas(model, tok, requests, last, prefixes, steps, lr, kl_factor, weight_decay,
                                     clamp_factor, stop_loss, chunk=chunk, wordings=wordings, center=center_deltas)
    deltas = deltas - (1 - keep_shared) * deltas.mean(0, keepdim=True)   # the part all facts share (see above)
    contexts = [prefixes] + ([[""]] if bare_key else [])     # key rows per fact: averaged (+ the bare prompt's)
    z_target = torch.cat([read_at_subject(model, tok, requests, c, residual)["z"] + deltas for c in contexts])
    info = {"layers": layers, "prefixes": prefixes, "losses": history, "deltas": deltas, "update_norm": {},
            "residual_norm": {}}
    for i, layer in enumerate(layers):
        reads = dict(residual, k=(module_name(model, "mlp_out", layer), "input"))
        now = [read_at_subject(model, tok, requests, c, reads) for c in contexts]
        K = torch.cat([r["k"] for r in now])                           # (rows, d_k), with the layers edited so far
        R = (z_target - torch.cat([r["z"] for r in now])) / (len(layers) - i)  # what is missing, over layers left
        eye = torch.eye(K.shape[1], device=K.device)
        prior = mom2[layer] if mom2_adjustment else eye * (K.pow(2).sum(1).mean() / K.shape[1])
        if protect_subjects:  # other subjects' keys at the start of a prompt, where neighbours sit (see above)
            prior = prior + protect_subjects * prior.trace() / protected[layer].trace() * protected[layer]
        if mom2_adjustment:  # a small ridge keeps directions the sampled text never visited from exploding
            prior = prior + RIDGE * prior.trace() / K.shape[1] * eye
        A = mom2_update_weight * prior + K.T @ K
        update = torch.linalg.solve(A, K.T @ R).T                      # Rᵀ K A⁻¹ (A is symmetric)
        W = as_out_in(model, get_module(model, mlp_out_weight_name(model, layer)))
        with torch.no_grad():
            W.add_(update.to(W.dtype))
        info["update_norm"][layer] = update.norm().item()
        info["residual_norm"][layer] = R.norm(dim=-1).mean().item()
    return {"info": info}

