"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023), chapter 5.

Many facts in one update, spread over a range of MLP layers R = [l₁ … l_L]:
1. v*: for each fact, a δ at the output of the LAST layer of the range (the residual stream there), computed
   with ROME's machinery (keys_values.compute_deltas); the target residual is z = h_L + δ.
2. For each layer l in R, in order: the keys K (n × d_k) at l with the weights edited so far, the residual still
   missing at the last layer, R = (z − h_L) / (layers left), and the batched least-squares update
        ΔW_l = Rᵀ K (λ·E[kkᵀ] + Kᵀ K)⁻¹
   which keeps the other keys (weighted by λ, `mom2_update_weight`) while writing all n values at once.
`mom2_adjustment=False` replaces E[kkᵀ] by (mean ‖k‖²/d_k)·I (no statistics needed, as in EasyEdit's default).
`bare_key=True` (default) adds, per fact, the key of the bare prompt as one more row of K with the same residual
(see rome.py: when the prompt starts with the subject, that key differs from the subject's key in context); on 20
CounterFact facts in one batch it raised reliability from 0.90 to 0.95 and paraphrase from 0.38 to 0.47.
v* uses ROME's relation-free `wordings` too (the first three of keys_values.ASSOCIATION_WORDINGS). On one batch
of 100 CounterFact facts (token accuracy, reliability / paraphrase / locality): without them and λ = 200,
0.97 / 0.41 / 0.88; with them, λ = 200: 0.98 / 0.66 / 0.81; λ = 500: 0.99 / 0.66 / 0.84; λ = 1500 (the default):
0.99 / 0.65 / 0.86.
Where a batch loses locality (chapter 5): the same 100 val facts written one at a time (bench `--batch-size 1`) keep
locality 0.96 at the same reliability (0.99), so the neighbours are moved by the other facts of the batch, not by
their own. Paraphrase one at a time is 0.60 (batch − single +0.05 ± 0.03, unresolved): the gap to ROME's 0.72 comes
from the recipe (δ at layer 7 spread over five layers), not from the batch. More statistics (20,000 tokens: 0.87;
20,000 of encyclopedic text the model wrote: 0.88), λ = 15,000 (train split: locality 0.79 → 0.86, reliability
0.97 → 0.82) and other ranges (layers 1-7, 4-8, 6-10 on train) did not close the gap.
What the interference is made of: the facts' δ share a direction, their batch mean (8 of the 18 neighbours that
change trade a function word for a name). `keep_shared` is the fraction of that mean each fact keeps (1: MEMIT as
published). On the same batch (reliability / paraphrase / locality): 1.0 0.99 / 0.65 / 0.86, 0.5 0.99 / 0.57 / 0.90,
0.0 0.96 / 0.41 / 0.92; on 100 train facts 0.97 / 0.59 / 0.79, 0.97 / 0.56 / 0.82, 0.89 / 0.45 / 0.87. What
moves the neighbours is also what carries the facts to their paraphrases, so the default stays 1.
Removing the mean afterwards takes from each fact part of the push it needed; `center_deltas=True` instead asks the
optimiser for δ with no shared part (after every step a chunk's δ lose their mean), so each fact finds its push
elsewhere: on the same batch 0.98 / 0.55 / 0.92 (train 0.95 / 0.49 / 0.88), as local as keep_shared = 0 with more
reliability and paraphrase (0.96 / 0.41; train 0.89 / 0.45).
Where the neighbours sit (chapter 5): other subjects in the same templates, which mostly start with the subject (84
of the 100 val prompts); C, from everyday text, holds few keys of names at the start of a text. `protect_subjects=μ`
adds to E[kkᵀ] the second moment of such keys, other subjects each written alone (`other_subjects`: names, or
"counterfact" for 500 train records' subjects; the batch's own are left out), scaled to μ × its trace. Same val
batch, other subjects from train: μ = 0.3 0.99 / 0.63 / 0.93, μ = 1 0.99 / 0.62 / 0.93, μ = 0.1 0.99 / 0.64 / 0.88;
100 train facts (other subjects from val): μ = 0.3 0.98 / 0.57 / 0.85, μ = 1 0.98 / 0.57 / 0.86. More locality than
keep_shared or center_deltas at more paraphrase. The subjects must look like the neighbours: 212 well-known names
(people, cities, firms, works) gave 0.62 / 0.88 at μ = 1, only the mean of their keys 0.63 / 0.86. Off by default:
it needs subjects like the neighbours, which a user editing their own facts may not have.
Measured and not adopted (same val batch; train in brackets): keys averaged over 16 model-written prefixes of 10
tokens (MEMIT's own five run to 10 tokens) while v* keeps its two, 0.99 / 0.68 / 0.86 (0.97 / 0.60 / 0.80) against
0.99 / 0.65 / 0.86 (0.97 / 0.59 / 0.79), paraphrase +0.027 ± 0.018 on val (4 cases change), +0.01 ± 0.01 on
train: under two standard errors (chapter 9, bench.paired_difference); the same with μ = 0.3, 0.99 / 0.65 / 0.92
(0.98 / 0.57 / 0.83); all five wordings with one prefix (ROME's v*), 0.97 / 0.67 / 0.83; δ scaled by 1.3 with
μ = 0.3 and those keys, 0.98 / 0.68 / 0.86.
Also measured, not adopted (same val batch): AlphaEdit's projection of the update off E[kkᵀ]'s top r eigen-directions
(r = 200 / 500 / 1,000: 0.96 / 0.56 / 0.85, 0.93 / 0.50 / 0.89, 0.77 / 0.35 / 0.89); the same projection off other
subjects' keys with λ kept, r = 200: 0.99 / 0.62 / 0.94, on protect_subjects' curve; an uneven residual split (35 % of
what is missing per layer instead of 1 / layers left) 0.99 / 0.65 / 0.83; one layer (ROME's 8) with all five wordings,
0.97 / 0.53 / 0.75; residual shares chosen jointly over the layers (each layer's share ∝ how rare its keys are
under λE[kkᵀ], the least-squares optimum when the layers' writes add up) 0.99 / 0.65 / 0.83.
Time: the δ optimisation is compute-bound, and most facts use all 20 steps. Half of what it computed was padding
(suffixes of 1 to 8 tokens padded to the longest); on a CPU the whole batch is now one chunk whose rows run in
groups of one suffix length (keys_values._by_suffix_length): the same δ (cosine 1.000), 2.3 s per fact on 2 CPU
cores instead of 3.0 s (back to back), and the batch of 100 takes 2.5 s per request (3.4 s before), at ~5 GB peak.
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

