"""Debiasing by a constrained MLP edit (chapter 8), in the spirit of LSDM / DAMA.

Measure a gender–profession bias with pronoun probes ("The nurse said that" -> he / she): the stereotype gap
is how much more the model prefers "he" after male-stereotyped jobs than after female-stereotyped ones.
Then edit a few MLP output projections so every job gets the same he-vs-she preference, with a KL term on
neutral text and a bound on each weight change to limit side effects. The edit is undoable.
"""
from dataclasses import dataclass

import torch

from . import checks
from .adapters import check_layer, device_of, mlp_out_weight_name
from .editing import edit_weights
from .optimise import clamped_adam
from .requests import EditError

FEMALE_STEREOTYPED = ["nurse", "secretary", "receptionist", "housekeeper", "hairdresser", "librarian"]
MALE_STEREOTYPED = ["engineer", "mechanic", "carpenter", "pilot", "plumber", "surgeon"]
TEMPLATE = "The {} said that"
# Held out from the edit, to test whether the debiasing generalises beyond the jobs it was tuned on.
HELD_OUT_FEMALE = ["dancer", "nanny", "stylist", "cashier", "baker", "therapist"]
HELD_OUT_MALE = ["firefighter", "farmer", "soldier", "architect", "electrician", "programmer"]



@torch.no_grad()
def pronoun_gaps(model, tok, professions, template=TEMPLATE):
    """{profession: log P(' he') - log P(' she')} for the next token after the template."""
    he, she = tok(" he", add_special_tokens=False).input_ids[0], tok(" she", add_special_tokens=False).input_ids[0]
    gaps = {}
    for job in professions:
        ids = tok(template.format(job), return_tensors="pt", add_special_tokens=False).input_ids.to(device_of(model))
        logp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
        gaps[job] = (logp[he] - logp[she]).item()
    return gaps


def stereotype_gap(model, tok, male_jobs=MALE_STEREOTYPED, female_jobs=FEMALE_STEREOTYPED, template=TEMPLATE):
    """Mean he-vs-she gap for male-stereotyped jobs minus that for female-stereotyped jobs (0 = no stereotype)."""
    male = pronoun_gaps(model, tok, male_jobs, template)
    female = pronoun_gaps(model, tok, female_jobs, template)
    return sum(male.values()) / len(male) - sum(female.values()) / len(female)


def _pronoun_logits_gap(model, tok, professions, template):
    he, she = tok(" he", add_special_tokens=False).input_ids[0], tok(" she", add_special_tokens=False).input_ids[0]
    prompts = [template.format(job) for job in professions]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token of each row
    logits = model(**{k: v.to(device_of(model)) for k, v in batch.items()}).logits.float()
    logp = logits[torch.arange(len(prompts)), last].log_softmax(-1)
    return logp[:, he] - logp[:, she]


@dataclass(frozen=True)
class Config:
    """equalize()'s hyperparameters: Adam steps, the KL weight on neutral text, the bound on each weight change."""
    steps: int = 30
    lr: float = 1e-3
    kl_weight: float = 1.0
    norm_constraint: float = 2e-3   # L∞ bound on each weight change

    def __post_init__(self):
        object.__setattr__(self, "steps", checks.integer("steps", self.steps, 1))
        checks.learning_rate(self.lr)
        checks.number("kl_weight", self.kl_weight, 0, hint="0 ignores the neutral texts; 1.0 is the default")
        checks.number("norm_constraint", self.norm_constraint, 0, open_low=True,
                      hint="the largest change allowed to any one weight, e.g. 2e-3")


def _equalize_loss(model, tok, professions, template, neutral, kl_weight):
    """Spread of the he-vs-she gaps across jobs, plus kl_weight x KL from the unedited model on neutral texts."""
    with torch.no_grad():
        reference = [model(input_ids=ids).logits.float().log_softmax(-1) for ids in neutral]

    def loss_fn():
        gaps = _pronoun_logits_gap(model, tok, professions, template)
        loss = ((gaps - gaps.mean()) ** 2).mean()  # same gap for every job: no stereotype
        for ids, ref in zip(neutral, reference):
            logp = model(input_ids=ids).logits.float().log_softmax(-1)
            loss = loss + kl_weight * torch.nn.functional.kl_div(logp, ref, log_target=True,
                                                                 reduction="batchmean") / len(neutral)
        return loss
    return loss_fn


def equalize(model, tok, layers, professions=None, neutral_texts=(), template=TEMPLATE, config=None, **hparams):
    """Constrained edit (LSDM/DAMA spirit): tune `layers`' MLP output weights so every profession gets the same
    he-vs-she gap, with a KL term keeping `neutral_texts` predictions and an L-inf bound on each weight change.

    Options (`steps`, `lr`, `kl_weight`, `norm_constraint`) come as keywords or as a `debias.Config`.
    """
    cfg = checks.config(Config, hparams, "debias", base=config)
    professions = list(professions or FEMALE_STEREOTYPED + MALE_STEREOTYPED)
    if len(professions) < 2:
        raise EditError("professions: pass at least two professions to equalize")
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise EditError(f"layers: expected a list of layer indices, got {layers!r}")
    try:
        layers = [check_layer(model, layer, "layers") for layer in layers]
    except (TypeError, ValueError) as err:
        raise EditError(str(err)) from err
    names = [mlp_out_weight_name(model, layer) for layer in layers]
    neutral = [tok(t, return_tensors="pt", add_special_tokens=False).input_ids.to(device_of(model))
               for t in neutral_texts]
    loss_fn = _equalize_loss(model, tok, professions, template, neutral, cfg.kl_weight)
    losses = []

    def update(weights):
        losses.extend(clamped_adam(list(weights.values()), loss_fn, cfg.steps, cfg.lr, cfg.norm_constraint))
    return edit_weights(model, names, update, method="debias-equalize", info={"layers": layers, "losses": losses})
