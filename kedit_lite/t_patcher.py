"""T-Patcher (Huang et al. 2023): fix a mistake by adding a neuron to an FFN, not by changing weights (chapter 7).

The textbook (§5.3, 附加参数法) reads the FFN as a key–value memory: FFN(q) = Σ_i act(q·k_i + b_i) v_i. A patch is
one more neuron, FFN_p(q) = FFN(q) + a_p·v_p with a_p = ReLU(q·k_p + b_p), trained alone on L_p = l_e + a·l_a + m·L_m
(textbook 5.8–5.14): the edit loss l_e, the activation loss l_a = exp(-(q_e·k_p + b_p)), and the memory hinges
(q_i·k_p + b_p - β)_+ (stay off on unrelated queries q_i) and ((q_i - q_e)·k_p + γ)_+ (the edit beats them by γ).
`reference_edit` is that algorithm in plain code; `apply` is the same maths, fast: q and the blocks below the patch
cannot change while the patch trains, so they are computed once and each step runs only the patched block onwards.
For decoder-only models (the original code covers BERT/BART): one neuron per target token, a ReLU key on every
architecture (an input below threshold adds exactly nothing), the last block by default; the memory set D_M is
built-in unrelated text plus the edit prompt's other positions. Our options, off by default and together in
`IMPROVED`: `contrast` (D_M also holds the edit's template with other subjects) and `violators_mean` (each hinge
averaged over its violators). Patches live in a forward hook (base weights untouched, undo removes it).
"""
import weakref
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import checks
from .adapters import check_layer, module_name, num_layers
from .caches import Cache
from .forward import split_below
from .hooks import attach, first_tensor, patch as patched_output, record, replace_first_tensor, replay
from .requests import EditError, as_request_list
from .tokens import encode_pairs

# Unrelated text for the memory set: many relations, subjects that no course probe uses, and plain prose.
MEMORY_TEXT = (
    "The capital of Spain is Madrid.",
    "The capital of Egypt is Cairo.",
    "The capital of Argentina is Buenos Aires.",
    "The capital of Norway is Oslo.",
    "The capital of Thailand is Bangkok.",
    "The Taj Mahal is located in the city of Agra.",
    "The Parthenon is located in the city of Athens.",
    "The Kremlin is located in the city of Moscow.",
    "The Sagrada Familia is located in the city of Barcelona.",
    "Machu Picchu is located in the country of Peru.",
    "Mexico is located on the continent of North America.",
    "Vietnam is located on the continent of Asia.",
    "Samsung is a company from the country of South Korea.",
    "Nokia is a company from the country of Finland.",
    "The headquarters of Nestlé are in the city of Vevey.",
    "Wolfgang Amadeus Mozart was born in the city of Salzburg.",
    "Frida Kahlo was born in the country of Mexico.",
    "The mother tongue of Pablo Neruda is Spanish.",
    "Lionel Messi plays the position of forward.",
    "Yo-Yo Ma plays the cello.",
    "The Hobbit was written by J. R. R. Tolkien.",
    "The telephone was invented by Alexander Graham Bell.",
    "The boiling point of water at sea level is 100 degrees Celsius.",
    "A spider has eight legs.",
    "The fastest land animal is the cheetah.",
    "The longest river in Africa is the Nile.",
    "The primary language spoken in Portugal is Portuguese.",
    "The official currency of Switzerland is the Swiss franc.",
    "Hinduism is the main religion in Nepal.",
    "Ice hockey is a popular sport in Finland.",
    "Bread is made from flour, water, salt and yeast, and it is baked in an oven until the crust turns brown.",
    "She opened the window, looked at the rain, and decided to stay at home with a good book and a cup of tea.",
    "To write a function in Python, use the def keyword, give it a name, and list its arguments in parentheses.",
    "The meeting was moved to Thursday afternoon because two of the speakers were travelling on Wednesday.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "Please summarize the following paragraph in two sentences and keep the tone friendly.",
    "Once upon a time, a young fox lived at the edge of a quiet forest near a small river.",
    "Regular exercise, enough sleep and a balanced diet help people stay healthy as they grow older.",
)

# Other subjects to put in the edit's own template ("{} is located in the city of"): their queries join the memory
# set, so the patch learns to key on the *subject* and not on the relation (CounterFact's neighbourhood prompts).
CONTRAST_SUBJECTS = ("Marie Curie", "the Louvre", "Volkswagen", "Leo Tolstoy", "the Danube", "Serena Williams",
                     "Mount Kilimanjaro", "Harvard University", "Ludwig van Beethoven", "the Great Wall of China",
                     "Honda", "Nelson Mandela", "the Amazon rainforest", "Coca-Cola", "Johann Sebastian Bach",
                     "Lake Victoria", "Pelé", "the BBC", "Vincent van Gogh", "Oxford")

# model -> {(layer, memory texts): (N, d) float32 queries}; computed once, freed with the model.
MEMORY_QUERIES = Cache("t_patcher.memory_queries")
# model -> [PatchNeurons] currently installed, oldest first. Not a cache: the live patches undo() removes.
_PATCHES = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Config:
    """T-Patcher's options; a, m, β, γ are the textbook's 5.12–5.14 (`act_weight`, `memory_weight`, `beta`, `gamma`)."""
    layer: int | None = None       # the patched FFN; None: the last block (the paper's choice)
    steps: int = 60                # Adam steps at most
    lr: float = 0.05
    act_weight: float = 1.0        # a: weight of the activation loss l_a
    memory_weight: float = 1.0     # m: weight of the memory loss L_m
    beta: float = -1.0             # β: memory queries must score below it (<= 0, so a ReLU patch is off)
    gamma: float = 3.0             # γ: margin by which the edit query beats every memory query
    target_loss: float = 0.02      # stop once l_e is below this and both memory hinges are zero
    memory: tuple | None = None    # unrelated texts for D_M; None: MEMORY_TEXT
    contrast: bool = False         # ours: D_M also holds the edit's template filled with CONTRAST_SUBJECTS
    violators_mean: bool = False   # ours: average each hinge over its violators (False: over all of D_M, the paper)
    progress: bool = False         # show a progress bar

    def __post_init__(self):
        if self.layer is not None and not checks.is_integer(self.layer):
            raise EditError(f"layer: expected an integer layer index, or None for the last block; got {self.layer!r}")
        checks.integer("steps", self.steps, 1)
        checks.learning_rate(self.lr)
        for name in ("act_weight", "memory_weight", "gamma", "target_loss"):
            checks.number(name, getattr(self, name), 0, desc="a finite number >= 0")
        checks.number("beta", self.beta, high=0, desc="a finite threshold <= 0 (memory queries must stay below it, "
                      "and a ReLU patch is off only below 0)")
        if self.memory is not None:
            if (not isinstance(self.memory, (list, tuple)) or not self.memory
                    or not all(isinstance(t, str) and t.strip() for t in self.memory)):
                raise EditError("memory: expected a non-empty list of unrelated texts (or None for the built-in set)")
            object.__setattr__(self, "memory", tuple(self.memory))
        for name in ("contrast", "violators_mean", "progress"):
            checks.flag(name, getattr(self, name))

    @classmethod
    def improved(cls, **options):
        """Our configuration (IMPROVED): the paper's patch with the contrast memory and the violators' mean."""
        return cls(**{**IMPROVED, **options})


# Our configuration: the template-contrast memory keeps the patch off for the edit's neighbours (chapter 7).
IMPROVED = dict(contrast=True, violators_mean=True)


class PatchNeurons(torch.nn.Module):
    """P extra FFN neurons for one edit (chapter 7): keys (P, d), biases (P,), values (P, d); ReLU switch."""

    def __init__(self, queries, layer, value_dim=None):
        super().__init__()
        p, d = queries.shape
        self.layer = layer
        self.key = torch.nn.Parameter(queries.detach().float().clone())
        self.bias = torch.nn.Parameter(torch.zeros(p, device=queries.device))
        self.value = torch.nn.Parameter(torch.zeros(p, value_dim or d, device=queries.device))
        self.handle = None

    def scores(self, q):
        """q·k_p + b_p for every patch neuron, in float32: (..., P)."""
        return q.float() @ self.key.float().T + self.bias.float()

    def activation(self, q):
        """a_p = ReLU(q·k_p + b_p): exactly zero when the switch is off."""
        return torch.relu(self.scores(q))

    def forward(self, q):
        """The patch's contribution a_p·v_p to the FFN output (float32)."""
        return self.activation(q) @ self.value.float()

    def n_parameters(self):
        """Parameters this patch adds to the model (keys, biases, values)."""
        return sum(p.numel() for p in self.parameters())


def _install(model, patch):
    """Add the patch's output to the MLP's output on every forward (a hook; the base weights stay as they are)."""
    def hook(module, args, kwargs, output):
        q = args[0] if args else next(iter(kwargs.values()))
        out = first_tensor(output)
        return replace_first_tensor(output, out + patch(q).to(out.dtype))
    patch.handle = attach(model, module_name(model, "mlp", patch.layer), hook, with_kwargs=True)
    _PATCHES.setdefault(model, []).append(patch)


def _remove(model, patch):
    """Take one patch out of the model (undo)."""
    if patch.handle is not None:
        patch.handle.remove()
        patch.handle = None
    installed = _PATCHES.get(model, [])
    if any(p is patch for p in installed):
        installed[:] = [p for p in installed if p is not patch]


def patches(model):
    """The patches currently installed in `model`, oldest first."""
    return list(_PATCHES.get(model, []))


def parameters_added(model):
    """Total number of parameters all installed patches add (the memory cost of T-Patcher grows per edit)."""
    return sum(p.n_parameters() for p in patches(model))


def remove_all(model):
    """Remove every patch from `model` (for notebooks that lost their EditResults)."""
    for patch in patches(model):
        _remove(model, patch)


def resolve_layer(model, layer):
    """The patched layer: the last block by default (the paper's choice), else `layer` checked against the model."""
    if layer is None:
        return num_layers(model) - 1
    try:
        return check_layer(model, layer, "layer")
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err


def _device(model):
    return next(model.parameters()).device


def _input_at(model, layer, batch):
    """The FFN input q at `layer` for every token of `batch` (one forward, no LM head: q is all we need): (B, S, d)."""
    name = module_name(model, "mlp", layer)
    with torch.no_grad(), record(model, name, what="input") as store:
        model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return store[name]


@torch.no_grad()
def text_queries(model, tok, texts, layer):
    """FFN inputs at `layer` for every token of `texts`, one text per forward (no padding): (N, d) float32."""
    rows = []
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids], device=_device(model))
        rows.append(_input_at(model, layer, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0].float())
    return torch.cat(rows)


def memory_queries(model, tok, layer=None, texts=MEMORY_TEXT):
    """text_queries of the memory texts (N, d), float32; computed once per model, layer and texts."""
    layer, texts = resolve_layer(model, layer), tuple(texts)
    return MEMORY_QUERIES.get((layer, texts), lambda: text_queries(model, tok, texts, layer), owner=model)


@torch.no_grad()
def contrast_queries(model, tok, requests, layer, subjects=CONTRAST_SUBJECTS):
    """FFN inputs of every token of each request's template filled with other subjects: (M, d) float32."""
    texts = [r.template.replace("{}", s) for r in requests for s in subjects if s != r.subject]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = {k: v.to(_device(model)) for k, v in batch.items()}
    return _input_at(model, layer, batch)[batch["attention_mask"].bool()].float()


@torch.no_grad()
def activations(model, tok, prompts, patch=None, position=-1):
    """Patch activations a_p at one token `position` of each prompt: (n_prompts, P) for `patch` or all patches."""
    chosen = [patch] if patch is not None else patches(model)
    if not chosen:
        raise EditError("patch: no T-Patcher patch is installed in this model; edit with method='t-patcher' first")
    rows = []
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids], device=_device(model))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        per_layer = {layer: _input_at(model, layer, batch)[0, position] for layer in {p.layer for p in chosen}}
        rows.append(torch.cat([p.activation(per_layer[p.layer]) for p in chosen]))
    return torch.stack(rows).cpu()


def touched_parameters(model, requests, cfg):
    """T-Patcher changes no base weight: it adds patch neurons (checks the layer against the model)."""
    resolve_layer(model, cfg.layer)
    return []


def edit_batch(model, tok, requests):
    """The prompt + target batch of the edit loss (labels already shifted to the positions that predict them)."""
    return encode_pairs(tok, [r.prompt_text for r in requests], [r.target_new for r in requests], _device(model))


def memory_set(q_memory_texts, q_all, batch, q_contrast=None):
    """D_M: the memory texts' queries, the edit prompt's other positions, and the contrast queries if any."""
    others = q_all[batch["attention_mask"].bool() & ~batch["answer_mask"]]
    return torch.cat([q_memory_texts, others] + ([] if q_contrast is None else [q_contrast]))


def initial_patch(q_edit, q_memory, layer):
    """One neuron per edit query: key along the query, bias halfway between it and the highest memory score."""
    patch = PatchNeurons(q_edit, layer).to(q_edit.device)
    with torch.no_grad():
        patch.key.copy_(q_edit / q_edit.norm(dim=1, keepdim=True).clamp(min=1e-6))
        on = (q_edit * patch.key).sum(1)
        off = (q_memory @ patch.key.T).max(0).values
        patch.bias.copy_(-(on + off) / 2)
    return patch


def _hinge_mean(x, violators_mean):
    """Mean of a hinge over all of D_M (the paper), or over the queries that violate it (ours, see Config)."""
    return x.sum() / (x > 0).sum().clamp(min=1) if violators_mean else x.mean()


def patch_losses(l_e, patch, q_edit, q_memory, cfg):
    """L_p = l_e + a·l_a + m·(l_m1 + l_m2) (textbook 5.14) from the edit loss l_e; also each term, for logging."""
    s_edit = patch.scores(q_edit).diagonal()                         # patch j on its own edit query q_j
    l_a = torch.exp(-s_edit.clamp(min=-30.0, max=30.0)).mean()       # 5.9; clamped so exp cannot overflow
    s_mem = patch.scores(q_memory)                                   # (N, P): q_i·k_p + b_p
    l_m1 = _hinge_mean(torch.relu(s_mem - cfg.beta), cfg.violators_mean)            # 5.12
    l_m2 = _hinge_mean(torch.relu(s_mem - s_edit + cfg.gamma), cfg.violators_mean)  # 5.13 (the bias cancels)
    total = l_e + cfg.act_weight * l_a + cfg.memory_weight * (l_m1 + l_m2)   # 5.14, with L_m = l_m1 + l_m2 (5.11)
    return total, {"edit": l_e.item(), "act": l_a.item(), "mem_over": l_m1.item(), "mem_margin": l_m2.item()}


def _done(parts, cfg):
    """Early stop: the target is likely enough and no memory query violates a hinge."""
    return parts["edit"] < cfg.target_loss and parts["mem_over"] == 0 and parts["mem_margin"] == 0


def _optimise(patch, losses, cfg):
    """Adam on the patch alone: `losses()` -> (L_p, parts) each step, until _done or cfg.steps; returns the log."""
    optimizer = torch.optim.Adam(patch.parameters(), lr=cfg.lr)
    history = []
    with torch.enable_grad():
        for _ in tqdm(range(cfg.steps), desc="T-Patcher", disable=not cfg.progress):
            optimizer.zero_grad()
            loss, parts = losses()
            history.append(parts)
            if _done(parts, cfg):
                break
            loss.backward()
            optimizer.step()
    return history


def reference_edit(model, tok, requests, cfg=Config()):
    """T-Patcher in plain code (full forwards, no caches): the trained patch (not installed) and its loss log.

    With `cfg.violators_mean=False` and `contrast=False` the objective is the paper's exactly (see Config).
    """
    requests = as_request_list(requests)
    layer = resolve_layer(model, cfg.layer)
    mlp = module_name(model, "mlp", layer)
    batch = edit_batch(model, tok, requests)
    q_all = _input_at(model, layer, batch).float()
    q_edit = q_all[batch["answer_mask"]]                             # q_e: one query per target token
    texts = cfg.memory or MEMORY_TEXT                                # D_M: unrelated inputs the patch must ignore
    q_memory = memory_set(text_queries(model, tok, texts, layer), q_all, batch,
                          contrast_queries(model, tok, requests, layer) if cfg.contrast else None)
    patch = initial_patch(q_edit, q_memory, layer)

    def losses():
        with record(model, mlp, what="input") as q, \
                patched_output(model, mlp, lambda out: out + patch(q[mlp]).to(out.dtype)):   # FFN_p = FFN + a_p·v_p
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
        l_e = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                                ignore_index=-100)   # 5.10: the target's cross-entropy
        return patch_losses(l_e, patch, q_edit, q_memory, cfg)
    history = _optimise(patch, losses, cfg)
    _finish(patch, next(model.parameters()).dtype)
    return patch, history



def answer_logits(model, batch, fixed):
    """Logits at the answer positions only, computing the blocks from the patched one on (those below replay)."""
    with replay(model, fixed):
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[batch["answer_mask"]])


def _fast_losses(model, batch, fixed, patch, q_edit, q_memory, cfg):
    """patch_losses with l_e from answer_logits (the installed patch acts in the recomputed blocks)."""
    logits = answer_logits(model, batch, fixed)
    l_e = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][batch["answer_mask"]])
    return patch_losses(l_e, patch, q_edit, q_memory, cfg)


def _finish(patch, dtype):
    """Freeze the trained patch in the model's dtype (its maths stay float32); refuse a non-finite one."""
    for p in patch.parameters():
        p.requires_grad_(False)
    patch.to(dtype)
    if not all(torch.isfinite(p).all() for p in patch.parameters()):
        raise EditError("lr: the patch became non-finite; lower lr")


def apply(model, tok, requests, cfg):
    """Add one trained patch neuron per target token in `layer`'s FFN; returns restore (removes them) and info."""
    layer = resolve_layer(model, cfg.layer)
    batch = edit_batch(model, tok, requests)
    q_all, fixed = split_below(model, batch, layer)
    q_edit = q_all[batch["answer_mask"]]                             # (P, d): one query per target token
    q_memory = memory_set(memory_queries(model, tok, layer, cfg.memory or MEMORY_TEXT), q_all, batch,
                          contrast_queries(model, tok, requests, layer) if cfg.contrast else None)
    patch = initial_patch(q_edit, q_memory, layer)
    _install(model, patch)
    try:
        history = _optimise(patch, lambda: _fast_losses(model, batch, fixed, patch, q_edit, q_memory, cfg), cfg)
        _finish(patch, next(model.parameters()).dtype)
    except BaseException:
        _remove(model, patch)
        raise
    with torch.no_grad():
        s_edit, s_mem = patch.scores(q_edit).diagonal(), patch.scores(q_memory)
    info = {"layer": layer, "patch": patch, "n_patches": len(q_edit), "parameters_added": patch.n_parameters(),
            "steps": len(history), "losses": history, "edit_activation": torch.relu(s_edit).tolist(),
            "memory_fired": int((s_mem > 0).any(1).sum()), "memory_size": len(q_memory)}
    return {"restore": lambda: _remove(model, patch), "info": info}
