"""MEND (chapter 6): a small network that learns how to edit (人工智能学习如何编辑), Mitchell et al. 2022.

The gradient of a linear layer W (out x in) on a sequence is a sum of rank-one terms, ∇W L = Σ_t δ_t u_tᵀ
(u_t: the layer's input at token t, δ_t: the loss gradient at its output). MEND never looks at the full
matrix: an editor network g maps each pair (u_t, δ_t) -> (ũ_t, δ̃_t), and the edit is ΔW = -α_ℓ Σ_t δ̃_t ũ_tᵀ
with a learned step size α_ℓ per edited matrix. The editor is meta-trained with the base model frozen: apply
the edit functionally, then loss = NLL(target_new | edit prompt, rephrase) + c_loc · KL(pre || post, unrelated).
`reference_edit` is the same algorithm written plainly; `apply` is the fast path tested equal to it.
Beyond the paper: `Config.scale` (default 1.0, the paper's step) and the editor blocks' ReLU placement
(LowRankBlock says why the shipped editor keeps it).
Train an editor with `python scripts/train_mend.py --out <path>` (options: `TrainConfig`).
"""
import json
import math
import os
import random
import runpy
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from . import checks
from .adapters import as_out_in, get_adapter, get_module, module_name, num_layers
from .caches import Cache
from .hooks import inputs_and_output_grads, patch, record, replay
from .models import model_name
from .requests import EditError
from .tokens import encode_pairs

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "mend_smollm2.safetensors"
TRAIN_COMMAND = "python scripts/train_mend.py"
_EDITORS = Cache("mend editors", maxsize=4)  # (resolved path, mtime) -> MENDEditor: loaded once per process


# ---------------------------------------------------------------- options (editing.py builds them)

def _checkpoint_ok(value):
    """None (the shipped editor), a path, or a MENDEditor."""
    if value is not None and not isinstance(value, (str, os.PathLike, MENDEditor)):
        raise EditError(f"checkpoint: expected a path or a MENDEditor, got {type(value).__name__}; pass the path of "
                        f"a MEND checkpoint (or leave it out for the shipped one)")


@dataclass(frozen=True)
class Config:
    """MEND's edit options. `scale` is beyond the paper: 1.0 (default) applies the trained step −α_ℓ exactly."""
    checkpoint: object = None   # a safetensors path, an in-memory MENDEditor, or None for the shipped editor
    scale: float = 1.0          # multiplies the learned step sizes; above 1 trades locality for reliability

    def __post_init__(self):
        _checkpoint_ok(self.checkpoint)
        checks.number("scale", self.scale, 0, open_low=True, desc="a positive number multiplying the learned step "
                      "sizes (1.0 = as trained)")


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training options (scripts/train_mend.py turns each field into a --flag)."""
    steps: int = 600            # meta-training steps
    batch_size: int = 4         # edit cases per step
    c_loc: float = 1.0          # weight of the locality KL against the edit NLL
    lr: float = 1e-4            # Adam learning rate of the editor network
    lr_lr: float = 1e-2         # Adam learning rate of the log step sizes log α_ℓ
    rank: int = 128             # rank of the editor's low-rank blocks
    n_layers: int = 3           # edit the MLPs of the last n_layers blocks
    lr_init: float = 1e-4       # initial step size α_ℓ
    grad_clip: float = 10.0     # clip the editor's gradient norm (the shipped editor was trained with 10)
    seed: int = 0
    max_seconds: float | None = None  # stop after this much wall time (None: run all steps)

    def __post_init__(self):
        for name in ("steps", "batch_size", "rank", "n_layers"):
            checks.integer(name, getattr(self, name), 1)
        checks.integer("seed", self.seed, 0)
        checks.number("c_loc", self.c_loc, 0, hint="0 ignores locality; the shipped editor used 1 to 3")
        checks.learning_rate(self.lr, "lr")
        checks.learning_rate(self.lr_lr, "lr_lr")
        checks.learning_rate(self.lr_init, "lr_init")
        checks.number("grad_clip", self.grad_clip, 0, open_low=True)
        if self.max_seconds is not None:
            checks.number("max_seconds", self.max_seconds, 0, open_low=True, desc="a positive number or None")


# ---------------------------------------------------------------- which weights MEND edits (chapter 6)

def edited_parameters(model, n_layers=3):
    """Names of the MLP weights of the last `n_layers` blocks (inputs projections and the output projection)."""
    a, n = get_adapter(model), num_layers(model)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= n:
        raise EditError(f"n_layers: expected an integer from 1 to {n}, got {n_layers!r}")
    paths = list(a.mlp_in) + [a.mlp_out]
    return [p.format(layer) + ".weight" for layer in range(n - n_layers, n) for p in paths]


def unedited_blocks(model, names):
    """Names of the blocks below the first one holding an edited weight (their outputs do not change)."""
    blocks = [module_name(model, "layer", j) for j in range(num_layers(model))]
    first = min(j for j, b in enumerate(blocks) for n in names if n.startswith(b + "."))
    return blocks[:first]


def weight_shape(model, name):
    """(out, in) of a projection weight, whatever its storage orientation."""
    return tuple(as_out_in(model, get_module(model, name)).shape)


def module_of(name):
    """'model.layers.3.mlp.down_proj.weight' -> 'model.layers.3.mlp.down_proj'."""
    return name.rsplit(".", 1)[0]


# ---------------------------------------------------------------- the rank-one gradient pieces (chapter 6)

def answer_logits(model, batch):
    """Logits at the answer positions only, (n_answer_tokens, vocab): the full-vocabulary head is costly."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.get_output_embeddings()(hidden[batch["answer_mask"]])


def _row_nll(logits, batch):
    """Per-row mean NLL of the answer tokens, from answer_logits (a sum of these gives each row its own gradient)."""
    m = batch["answer_mask"]
    tok_nll = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][m], reduction="none")
    rows = m.nonzero()[:, 0]
    return torch.zeros(m.shape[0], device=tok_nll.device).index_add(0, rows, tok_nll) / m.sum(1).clamp(min=1)


def gradient_factors(model, names, batch, rows=None):
    """One forward/backward: per edited weight, the inputs x (B, T, in) and output gradients δ (B, T, out).

    The loss is the answer NLL of `rows` (default: all rows), summed over rows, so row b's δ is its own.
    Also returns that forward's logits at the answer positions (the pre-edit model) and each row's NLL.
    """
    modules = [module_of(n) for n in names]
    with torch.enable_grad():
        with inputs_and_output_grads(model, modules) as caught:
            logits = answer_logits(model, batch)
        nll = _row_nll(logits, batch)
        loss = (nll if rows is None else nll[rows]).sum()
        grads = torch.autograd.grad(loss, [caught[m][1] for m in modules])
    x = {n: caught[m][0].float() for n, m in zip(names, modules)}
    delta = {n: g.float() for n, g in zip(names, grads)}
    return x, delta, logits.detach(), nll.detach()


def _plus_x_delta(inputs, module, d, out):
    """out + x Δᵀ with x this forward's input of `module`: the output of W + Δ (Linear and Conv1D alike)."""
    x = inputs[module].float()
    return out + torch.einsum("bti,boi->bto", x, d.expand(x.shape[0], -1, -1)).to(out.dtype)


@contextmanager
def apply_deltas(model, deltas, row_index=None):
    """Run the model as if W ← W + Δ for each edited weight, keeping the graph to Δ (functional edit).

    deltas: {name: (E, out, in)}; row b of the batch uses edit row_index[b] (default: E must be 1).
    """
    modules = [module_of(n) for n in deltas]
    with ExitStack() as stack:  # inputs kept with their graph: a lower edit changes a higher layer's input
        inputs = stack.enter_context(record(model, modules, what="input", detach=False))
        for module, d in zip(modules, deltas.values()):
            per_row = d if row_index is None else d[row_index]
            stack.enter_context(patch(model, module, partial(_plus_x_delta, inputs, module, per_row)))
        yield


# ---------------------------------------------------------------- the editor network (chapter 6)

class RunningNorm(nn.Module):
    """Normalise features with running mean/std (Welford), updated only while training."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x):
        """Merge a (N, dim) batch into the statistics (Chan et al.'s parallel Welford)."""
        n = x.shape[0]
        if n == 0:
            return
        mean, var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        diff = mean - self.mean
        self.m2 += var * n + diff ** 2 * self.count * n / total
        self.mean += diff * n / total
        self.count.copy_(total)

    def forward(self, x):
        """(x − mean) / std, or only x − mean before any statistics exist."""
        if self.count <= 1:
            return x - self.mean
        return (x - self.mean) / (self.m2 / self.count).sqrt().clamp(min=1e-8)


class LowRankBlock(nn.Module):
    """h = z + s_ℓ ⊙ U relu(V z + b) + o_ℓ : residual, low-rank, identity at initialisation (U = 0, o = 0).

    The paper's §3.1 block is h = z + σ(s_ℓ ⊙ (U V z + b) + o_ℓ), the nonlinearity after the low-rank product;
    here the ReLU sits inside the bottleneck. Kept because the shipped editor was trained with this form: its
    U, V, s, o mean nothing in the other one. Both are residual, low-rank and the identity at initialisation.
    """

    def __init__(self, dim, rank, n_slots):
        super().__init__()
        self.V = nn.Parameter(torch.empty(rank, dim))
        nn.init.xavier_uniform_(self.V)
        self.b = nn.Parameter(torch.zeros(rank))
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.scale = nn.Parameter(torch.ones(n_slots, dim))   # per-layer scale and shift: the network is
        self.shift = nn.Parameter(torch.zeros(n_slots, dim))  # shared across layers of the same shape

    def forward(self, z, slot):
        """One residual block for the edited layer in `slot`."""
        return z + self.scale[slot] * (torch.relu(z @ self.V.T + self.b) @ self.U.T) + self.shift[slot]


class GradientTransform(nn.Module):
    """(x, δ) -> (x̃, δ̃) for every weight of one shape (out, in): normalise, concatenate, two low-rank blocks."""

    def __init__(self, d_out, d_in, rank, n_slots):
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.norm_x, self.norm_d = RunningNorm(d_in), RunningNorm(d_out)
        self.blocks = nn.ModuleList([LowRankBlock(d_in + d_out, rank, n_slots) for _ in range(2)])

    def forward(self, x, delta, slot):
        """(x̃, δ̃) for the edited layer in `slot`."""
        z = torch.cat([self.norm_x(x), self.norm_d(delta)], dim=-1)
        for block in self.blocks:
            z = block(z, slot)
        return z[..., :self.d_in], z[..., self.d_in:]


def shape_key(shape):
    """The editor's name for the network of weights shaped (out, in): '576x1536'."""
    return f"{shape[0]}x{shape[1]}"


class MENDEditor(nn.Module):
    """One GradientTransform per weight shape, plus a learned step size per edited weight (chapter 6)."""

    def __init__(self, names, shapes, rank=128, lr_init=1e-4, meta=None):
        super().__init__()
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self.rank, self.meta = rank, dict(meta or {})
        keys = [shape_key(s) for s in self.shapes]
        self.slots = [keys[:i].count(k) for i, k in enumerate(keys)]
        self.transforms = nn.ModuleDict({k: GradientTransform(*s, rank, keys.count(k))
                                         for k, s in dict(zip(keys, self.shapes)).items()})
        self.log_lr = nn.Parameter(torch.full((len(self.names),), math.log(lr_init)))

    @classmethod
    def for_model(cls, model, n_layers=3, rank=128, lr_init=1e-4):
        """A fresh (identity-initialised) editor for the last `n_layers` MLPs of `model`."""
        names = edited_parameters(model, n_layers)
        meta = {"model": model_name(model), "model_type": model.config.model_type, "n_layers": n_layers}
        return cls(names, [weight_shape(model, n) for n in names], rank, lr_init, meta)

    def transform_of(self, i):
        """The network that edits weight i (shared by the weights of its shape)."""
        return self.transforms[shape_key(self.shapes[i])]

    def update_stats(self, x, delta, mask):
        """Add this batch's real tokens to the running statistics (training only)."""
        for i, name in enumerate(self.names):
            t = self.transform_of(i)
            t.norm_x.update(x[name][mask])
            t.norm_d.update(delta[name][mask])

    def transform(self, x, delta, mask):
        """{name: (x̃, δ̃)} per token, (B, T, in) and (B, T, out), with δ̃ zero on padding (mask: (B, T))."""
        out = {}
        for i, name in enumerate(self.names):
            xt, dt = self.transform_of(i)(x[name], delta[name], self.slots[i])
            out[name] = (xt, dt * mask.unsqueeze(-1).to(dt.dtype))
        return out

    def forward(self, x, delta, mask):
        """Edits {name: Δ (B, out, in)}: Δ_b = -α Σ_t δ̃_bt x̃_btᵀ over the real tokens (mask: (B, T))."""
        pairs = self.transform(x, delta, mask)
        return {name: -self.log_lr[i].exp() * torch.einsum("bto,bti->boi", pairs[name][1], pairs[name][0])
                for i, name in enumerate(self.names)}

    def check_model(self, model):
        """Refuse a model this editor was not trained for (other name, architecture or shapes)."""
        want, got = self.meta.get("model"), model_name(model)
        if want != got or self.meta.get("model_type") != model.config.model_type:
            raise EditError(f"checkpoint: this MEND editor was trained for {want!r} ({self.meta.get('model_type')}), "
                            f"not {got!r} ({model.config.model_type}); train one for this model with "
                            f"`{TRAIN_COMMAND} --model ...` and pass checkpoint=<its path>")
        params = dict(model.named_parameters())
        for name, shape in zip(self.names, self.shapes):
            if name not in params or weight_shape(model, name) != shape:
                raise EditError(f"checkpoint: the editor expects weight {name} of shape {shape}, which this model "
                                f"lacks; train an editor for this model ({TRAIN_COMMAND})")


# ---------------------------------------------------------------- checkpoints: safetensors only

def save_editor(editor, path, extra=None):
    """Write the editor's tensors as safetensors, with model name, architecture and edited weights in metadata."""
    from safetensors.torch import save_file
    meta = {"format": "pt", "kedit_mend": json.dumps({**editor.meta, "names": editor.names,
                                                      "shapes": [list(s) for s in editor.shapes],
                                                      "rank": editor.rank, **(extra or {})})}
    state = {k: v.detach().float().cpu().contiguous() for k, v in editor.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_editor(path):
    """Read an editor written by save_editor (no pickle involved)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise EditError(f"checkpoint: {path} does not exist; pass the path of a MEND checkpoint or train one with "
                        f"`{TRAIN_COMMAND} --out <path>`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("kedit_mend")
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types for a file it cannot read)
        raise EditError(f"checkpoint: {path} is not a safetensors file ({type(err).__name__}: {err}); pass a MEND "
                        f"checkpoint written by `{TRAIN_COMMAND} --out <path>`") from err
    if raw is None:
        raise EditError(f"checkpoint: {path} is not a kedit_lite MEND checkpoint (no 'kedit_mend' metadata)")
    meta = json.loads(raw)
    names, shapes, rank = meta.pop("names"), meta.pop("shapes"), meta.pop("rank")
    editor = MENDEditor(names, shapes, rank, meta=meta)
    editor.load_state_dict(load_file(str(path)))
    return editor.eval()


def get_editor(checkpoint=None):
    """The editor to use: an in-memory MENDEditor, or a checkpoint path (default: the shipped one), cached."""
    _checkpoint_ok(checkpoint)
    if isinstance(checkpoint, MENDEditor):
        return checkpoint
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    mtime = path.stat().st_mtime if path.exists() else None   # a rewritten file is loaded again
    return _EDITORS.get((str(path.resolve()), mtime), lambda: load_editor(path))


# ---------------------------------------------------------------- the method protocol (editing.py)

def touched_parameters(model, requests, cfg):
    """The weights MEND changes: the editor's weights, after checking it was trained for this model."""
    editor = get_editor(cfg.checkpoint)
    editor.check_model(model)
    return list(editor.names)


def _product_norm(dt, xt):
    """‖δ̃ᵀ x̃‖_F from the (N, N) Gram matrices, without building the (out, in) product."""
    return ((dt @ dt.T) * (xt @ xt.T)).sum().clamp(min=0).sqrt().item()


@torch.no_grad()
def apply(model, tok, requests, cfg):
    """One forward/backward on the edit prompts, the editor maps the gradient factors to Δ, add Δ in place.

    Fast path of `reference_edit`: W += -scale·α_ℓ δ̃ᵀ x̃ over every request's tokens as one matrix product
    written straight into W (several requests: their edits add up, MEND's batched editing).
    """
    editor = get_editor(cfg.checkpoint)
    editor.check_model(model)
    device = next(model.parameters()).device
    editor.to(device)
    batch = encode_pairs(tok, [r.prompt_text for r in requests], [r.target_new for r in requests], device)
    x, delta, _, nll = gradient_factors(model, editor.names, batch)
    pairs = editor.transform(x, delta, batch["attention_mask"].bool())
    params, norms = dict(model.named_parameters()), {}
    for i, (name, (xt, dt)) in enumerate(pairs.items()):
        step = cfg.scale * editor.log_lr[i].exp().item()
        xt, dt = xt.flatten(0, 1), dt.flatten(0, 1)          # (B·T, in), (B·T, out): all requests' tokens
        w = as_out_in(model, params[name])
        w.addmm_(dt.T.to(w.dtype), xt.to(w.dtype), alpha=-step)
        norms[name] = round(step * _product_norm(dt, xt), 4)
    return {"info": {"parameters": list(editor.names), "pre_edit_nll": nll.tolist(), "edit_norms": norms}}


# ---------------------------------------------------------------- MEND as in the paper, plainly (chapter 6)

def reference_factors(model, tok, request, names):
    """Plain §3.1 pieces of one request: per weight, inputs u (T, in) and δ = ∂L/∂(layer output) (T, out).

    L is the mean NLL of the target tokens; the weights are made differentiable for the call only.
    """
    device = next(model.parameters()).device
    batch = encode_pairs(tok, [request.prompt_text], [request.target_new], device)
    modules, params = [module_of(n) for n in names], dict(model.named_parameters())
    flags = {n: params[n].requires_grad for n in names}
    try:
        for n in names:
            params[n].requires_grad_(True)
        with torch.enable_grad():
            with record(model, modules, what="input") as u, record(model, modules, detach=False) as out:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[0].float(), -1)
            answer = batch["answer_mask"][0]
            loss = -logp[answer].gather(-1, batch["labels"][0][answer][:, None]).mean()
            grads = torch.autograd.grad(loss, [out[m] for m in modules])
    finally:
        for n, flag in flags.items():
            params[n].requires_grad_(flag)
    return {n: u[m][0].float() for n, m in zip(names, modules)}, {n: g[0].float() for n, g in zip(names, grads)}


def reference_editor_net(editor, i, u, d):
    """The editor g of §3.1 on one weight's pairs, token by token: (u_t, δ_t) -> (ũ_t, δ̃_t)."""
    t, slot = editor.transform_of(i), editor.slots[i]

    def normalise(norm, v):  # each dimension to zero mean, unit variance (statistics from meta-training)
        std = (norm.m2 / norm.count).sqrt().clamp(min=1e-8) if norm.count > 1 else torch.ones_like(norm.mean)
        return (v - norm.mean) / std
    u_out, d_out = [], []
    for u_t, d_t in zip(u, d):
        z = torch.cat([normalise(t.norm_x, u_t), normalise(t.norm_d, d_t)])
        for blk in t.blocks:  # residual low-rank MLP, identity at initialisation (U = 0, o = 0)
            z = z + blk.scale[slot] * (blk.U @ torch.relu(blk.V @ z + blk.b)) + blk.shift[slot]
        u_out.append(z[:t.d_in])
        d_out.append(z[t.d_in:])
    return torch.stack(u_out), torch.stack(d_out)


@torch.no_grad()
def reference_edit(model, tok, requests, editor, scale=1.0):
    """MEND as in the paper, slow and plain: {name: ΔW (out, in)} for `requests` (the model is not changed).

    Per request and edited weight: the rank-one factors (u_t, δ_t) of ∇W L = Σ_t δ_t u_tᵀ (§3.1), the editor
    g(u_t, δ_t) = (ũ_t, δ̃_t) (§3.1), then ΔW = −α_ℓ Σ_t δ̃_t ũ_tᵀ (§3.1's edit W̃ = W − α_ℓ ∇̃W); requests add up.
    """
    device = next(model.parameters()).device
    total = {n: torch.zeros(weight_shape(model, n), device=device) for n in editor.names}
    for request in requests:
        u, d = reference_factors(model, tok, request, editor.names)
        for i, name in enumerate(editor.names):
            u_tilde, d_tilde = reference_editor_net(editor, i, u[name], d[name])
            alpha = editor.log_lr[i].exp()
            for t in range(u_tilde.shape[0]):  # one rank-one term per token
                total[name] -= scale * alpha * torch.outer(d_tilde[t], u_tilde[t])
    return total


# ---------------------------------------------------------------- meta-training (chapter 6)

def _training_batch(tok, cases, device):
    """Rows: B edit prompts, B rephrases (-> target_new), B unrelated prompts (-> their own answer)."""
    reqs = [c.request for c in cases]
    prompts = [r.prompt_text for r in reqs] + [c.paraphrase[0].prompt for c in cases] + \
        [c.locality[0].prompt for c in cases]
    answers = [r.target_new for r in reqs] * 2 + [c.locality[0].answer for c in cases]
    return encode_pairs(tok, prompts, answers, device)


def meta_step(model, tok, editor, cases, c_loc=1.0, update_stats=True):
    """One meta-training step's losses (§3.2): edit (NLL after the edit) and locality (KL before || after)."""
    device = next(model.parameters()).device
    B = len(cases)
    batch = _training_batch(tok, cases, device)
    rows = torch.arange(B, device=device)
    below = unedited_blocks(model, editor.names)
    with record(model, below, whole=True) as fixed:  # the blocks below the edit compute the same after it
        x, delta, pre_logits, _ = gradient_factors(model, editor.names, batch, rows=rows)
    mask = batch["attention_mask"][:B].bool()
    x, delta = {n: v[:B] for n, v in x.items()}, {n: v[:B] for n, v in delta.items()}
    if update_stats:
        editor.update_stats(x, delta, mask)
    deltas = editor(x, delta, mask)
    with apply_deltas(model, deltas, row_index=torch.arange(3 * B, device=device) % B), replay(model, dict(fixed)):
        post_logits = answer_logits(model, batch)
    edit_loss = _row_nll(post_logits, batch)[:2 * B].mean()
    unrelated = batch["answer_mask"].nonzero()[:, 0] >= 2 * B   # answer tokens of the unrelated rows
    pre = torch.log_softmax(pre_logits[unrelated].float(), -1)
    post = torch.log_softmax(post_logits[unrelated].float(), -1)
    loc_loss = (pre.exp() * (pre - post)).sum(-1).mean()
    return edit_loss, loc_loss


def train(model, tok, cases, config=None, editor=None, log=None, **options):
    """Meta-train a MEND editor on `cases` (base model frozen); returns (editor, history of losses).

    Options: a TrainConfig and/or its fields as keywords (`steps=25, lr=1e-2`).
    """
    cfg = checks.config(TrainConfig, options, "mend", base=config)
    usable = [c for c in cases if c.paraphrase and c.locality]
    if not usable:
        raise EditError("cases: need edit cases with a paraphrase and a locality probe (e.g. CounterFact train)")
    device = next(model.parameters()).device
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    editor = (editor or MENDEditor.for_model(model, cfg.n_layers, cfg.rank, cfg.lr_init)).to(device).train()
    editor.check_model(model)
    opt = torch.optim.Adam([{"params": [p for n, p in editor.named_parameters() if n != "log_lr"], "lr": cfg.lr},
                            {"params": [editor.log_lr], "lr": cfg.lr_lr}])
    history, start = [], time.perf_counter()
    for step in range(cfg.steps):
        edit_loss, loc_loss = meta_step(model, tok, editor, rng.sample(usable, min(cfg.batch_size, len(usable))),
                                        cfg.c_loc)
        opt.zero_grad()
        (edit_loss + cfg.c_loc * loc_loss).backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), cfg.grad_clip)
        opt.step()
        history.append({"step": step + 1, "edit": edit_loss.item(), "loc": loc_loss.item(),
                        "seconds": time.perf_counter() - start})
        if log is not None:
            log(history[-1])
        if cfg.max_seconds is not None and history[-1]["seconds"] > cfg.max_seconds:
            break
    return editor.eval(), history


if __name__ == "__main__":  # `python -m kedit_lite.mend train ...` (chapter 9 names it) runs the training script
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "train_mend.py"), run_name="__main__")
