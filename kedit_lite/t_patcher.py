"""T-Patcher (Huang et al. 2023): fix a mistake by adding a neuron to an FFN, not by changing weights (chapter 7).

The textbook (§5.3, 附加参数法) reads the FFN as a key–value memory: FFN(q) = Σ_i act(q·k_i + b_i) v_i. A patch is
one more neuron, FFN_p(q) = FFN(q) + a_p · v_p with a_p = act(q·k_p + b_p), trained alone with
    edit loss        cross-entropy of the target (the patch must fix the mistake);
    activation loss  exp(-(q_e·k_p + b_p)): the patch must fire on the edit query q_e;
    memory losses    (q_i·k_p + b_p - β)_+ on unrelated queries q_i (stay off), and
                     ((q_i - q_e)·k_p + γ)_+ (the edit query beats every memory query by a margin γ).

For decoder-only models (the original code covers BERT/BART): one patch per target-token position, each keyed on
its own query; a ReLU key on the MLP input for every architecture, so a query below threshold adds exactly nothing
(gated SiLU and GELU leak); the last block by default, where a patch cannot leak to other positions through
attention. Patches live in a forward hook (base weights untouched, undo removes it); the memory set is built-in
unrelated text plus the edit prompt's other positions and (`contrast=True`) its template with other subjects.
The reasons in full: book/results/tuning_history.md.
"""
import weakref

import torch
from tqdm.auto import tqdm

from . import checks
from .adapters import check_layer, module_name, num_layers
from .hooks import first_tensor, replace_first_tensor
from .requests import EditError
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
_MEMORY_CACHE = weakref.WeakKeyDictionary()
# model -> [PatchNeurons] currently installed, in the order they were added.
_PATCHES = weakref.WeakKeyDictionary()


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


def _mlp(model, layer):
    from .adapters import get_module
    return get_module(model, module_name(model, "mlp", layer))


def _install(model, patch):
    """Add the patch's output to the MLP's output on every forward (a hook; the base weights stay as they are)."""
    def hook(module, args, kwargs, output):
        q = args[0] if args else next(iter(kwargs.values()))
        out = first_tensor(output)
        return replace_first_tensor(output, out + patch(q).to(out.dtype))
    patch.handle = _mlp(model, patch.layer).register_forward_hook(hook, with_kwargs=True)
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


def _input_at(model, layer, batch):
    """The FFN input q at `layer` for every token of `batch`: (B, S, d)."""
    from .hooks import record
    with torch.no_grad(), record(model, module_name(model, "mlp", layer), what="input") as store:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return store[module_name(model, "mlp", layer)]


@torch.no_grad()
def memory_queries(model, tok, layer=None, texts=MEMORY_TEXT):
    """FFN inputs at `layer` for every token of `texts` (N, d), float32; cached per model, layer and texts."""
    layer = _layer(model, layer)
    key = (layer, tuple(texts))
    cache = _MEMORY_CACHE.setdefault(model, {})
    if key not in cache:
        device = next(model.parameters()).device
        rows = []
        for text in texts:
            ids = torch.tensor([tok(text, add_special_tokens=False).input_ids], device=device)
            q = _input_at(model, layer, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            rows.append(q[0].float())
        cache[key] = torch.cat(rows)
    return cache[key]


@torch.no_grad()
def contrast_queries(model, tok, requests, layer, subjects=CONTRAST_SUBJECTS):
    """FFN inputs of every token of each request's template filled with other subjects: (M, d) float32."""
    texts = [r.template.replace("{}", s) for r in requests for s in subjects if s != r.subject]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    return _input_at(model, layer, batch)[batch["attention_mask"].bool()].float()


@torch.no_grad()
def activations(model, tok, prompts, patch=None, position=-1):
    """Patch activations a_p at one token `position` of each prompt: (n_prompts, P) for `patch` or all patches."""
    chosen = [patch] if patch is not None else patches(model)
    if not chosen:
        raise EditError("patch: no T-Patcher patch is installed in this model; edit with method='t-patcher' first")
    device = next(model.parameters()).device
    rows = []
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids], device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        per_layer = {layer: _input_at(model, layer, batch)[0, position] for layer in {p.layer for p in chosen}}
        rows.append(torch.cat([p.activation(per_layer[p.layer]) for p in chosen]))
    return torch.stack(rows).cpu()


def _layer(model, layer):
    """The patched layer: the last block by default (the paper's choice)."""
    if layer is None:
        return num_layers(model) - 1
    try:
        return check_layer(model, layer, "layer")
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err


def _check_hparams(model, layer, steps, lr, act_weight, memory_weight, beta, gamma, target_loss, memory, contrast=True):
    _layer(model, layer)
    checks.flag("contrast", contrast)
    checks.integer("steps", steps, 1)
    for name, value in (("lr", lr), ("act_weight", act_weight), ("memory_weight", memory_weight),
                        ("gamma", gamma), ("target_loss", target_loss)):
        checks.number(name, value, 0, desc="a finite number >= 0")
    if lr == 0:
        raise EditError("lr: expected a positive learning rate, got 0")
    checks.learning_rate(lr)
    checks.number("beta", beta, high=0, desc="a finite threshold <= 0 (memory queries must stay below it, and a "
                  "ReLU patch is off only below 0)")
    if memory is not None and (not isinstance(memory, (list, tuple)) or not memory
                               or not all(isinstance(t, str) and t.strip() for t in memory)):
        raise EditError("memory: expected a non-empty list of unrelated texts (or None for the built-in set)")


def touched_parameters(model, requests, layer=None, steps=60, lr=0.05, act_weight=1.0, memory_weight=1.0,
                       beta=-1.0, gamma=3.0, target_loss=0.02, memory=None, contrast=True, **_):
    """T-Patcher changes no base weight: it adds patch neurons (validates the options)."""
    _check_hparams(model, layer, steps, lr, act_weight, memory_weight, beta, gamma, target_loss, memory, contrast)
    return []


def _losses(model, batch, patch, q_edit, q_memory, act_weight, memory_weight, beta, gamma):
    """Edit + activation + memory losses of T-Patcher (chapter 7), each returned for logging."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    edit = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                             ignore_index=-100)
    s_edit = patch.scores(q_edit).diagonal()                  # patch j on its own query q_j
    act = torch.exp(-s_edit.clamp(max=30.0, min=-30.0)).mean()  # clamped: exp must not overflow
    s_mem = patch.scores(q_memory)                            # (N, P)
    # Means over the violators only: a handful of near-duplicates must not be diluted by hundreds of easy queries.
    over = torch.relu(s_mem - beta)
    mem1 = over.sum() / (over > 0).sum().clamp(min=1)
    margin = torch.relu(s_mem - s_edit + gamma)
    mem2 = margin.sum() / (margin > 0).sum().clamp(min=1)
    total = edit + act_weight * act + memory_weight * (mem1 + mem2)
    return total, {"edit": edit.item(), "act": act.item(), "mem_over": mem1.item(), "mem_margin": mem2.item()}


def apply(model, tok, requests, layer=None, steps=60, lr=0.05, act_weight=1.0, memory_weight=1.0, beta=-1.0,
          gamma=3.0, target_loss=0.02, memory=None, contrast=True, progress=False):
    """Add one trained patch neuron per target token in `layer`'s FFN; returns restore (removes them) and info."""
    _check_hparams(model, layer, steps, lr, act_weight, memory_weight, beta, gamma, target_loss, memory, contrast)
    layer = _layer(model, layer)
    param = next(model.parameters())
    batch = encode_pairs(tok, [r.prompt_text for r in requests], [r.target_new for r in requests], param.device)
    q_all = _input_at(model, layer, batch).float()
    q_edit = q_all[batch["answer_mask"]]                      # (P, d): one query per target token
    others = q_all[batch["attention_mask"].bool() & ~batch["answer_mask"]]
    parts = [memory_queries(model, tok, layer, tuple(memory) if memory else MEMORY_TEXT), others]
    if contrast:
        parts.append(contrast_queries(model, tok, requests, layer))
    q_memory = torch.cat(parts)
    patch = PatchNeurons(q_edit, layer).to(param.device)
    with torch.no_grad():                                     # key = the edit query's direction, bias halfway
        patch.key.copy_(q_edit / q_edit.norm(dim=1, keepdim=True).clamp(min=1e-6))
        on = (q_edit * patch.key).sum(1)
        off = (q_memory @ patch.key.T).max(0).values
        patch.bias.copy_(-(on + off) / 2)
    _install(model, patch)
    optimizer = torch.optim.Adam(patch.parameters(), lr=lr)
    history = []
    try:
        with torch.enable_grad():
            for _ in tqdm(range(steps), desc="T-Patcher", disable=not progress):
                optimizer.zero_grad()
                loss, parts = _losses(model, batch, patch, q_edit, q_memory, act_weight, memory_weight, beta, gamma)
                history.append(parts)
                if parts["edit"] < target_loss and parts["mem_over"] == 0 and parts["mem_margin"] == 0:
                    break
                loss.backward()
                optimizer.step()
        for p in patch.parameters():
            p.requires_grad_(False)
        patch.to(param.dtype)                                  # live in the model's dtype; maths stay float32
        if not all(torch.isfinite(p).all() for p in patch.parameters()):
            raise EditError("hparams: the patch became non-finite; lower lr")
    except BaseException:
        _remove(model, patch)
        raise
    with torch.no_grad():
        s_edit = patch.scores(q_edit).diagonal()
        s_mem = patch.scores(q_memory)
    info = {"layer": layer, "patch": patch, "n_patches": len(q_edit), "parameters_added": patch.n_parameters(),
            "steps": len(history), "losses": history, "edit_activation": torch.relu(s_edit).tolist(),
            "memory_fired": int((s_mem > 0).any(1).sum()), "memory_size": len(q_memory)}
    return {"restore": lambda: _remove(model, patch), "info": info}
