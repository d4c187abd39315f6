"""Debiasing by a constrained MLP edit (chapter 8), in the spirit of LSDM / DAMA.

Measure a gender–profession bias with pronoun probes ("The nurse said that" -> he / she): the stereotype gap
is how much more the model prefers "he" after male-stereotyped jobs than after female-stereotyped ones.
Then edit a few MLP output projections so every job gets the same he-vs-she preference, with a KL term on
neutral text and a bound on each weight change to limit side effects. The edit is undoable.
"""
import torch

from .adapters import check_layer, device_of, mlp_out_weight_name
from .editing import edit_weights
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


def equalize(model, tok, layers, professions=None, neutral_texts=(), template=TEMPLATE, steps=30, lr=1e-3,
             kl_weight=1.0, norm_constraint=2e-3):
    """Constrained edit (LSDM/DAMA spirit): tune `layers`' MLP output weights so every profession gets the same
    he-vs-she gap, with a KL term keeping `neutral_texts` predictions and an L-inf bound on each weight change."""
    professions = list(professions or FEMALE_STEREOTYPED + MALE_STEREOTYPED)
    if len(professions) < 2:
        raise EditError("professions: pass at least two professions to equalize")
    layers = [check_layer(model, layer, "layers") for layer in layers]
    names = [mlp_out_weight_name(model, layer) for layer in layers]
    neutral = [tok(t, return_tensors="pt", add_special_tokens=False).input_ids.to(device_of(model))
               for t in neutral_texts]
    with torch.no_grad():
        reference = [model(input_ids=ids).logits.float().log_softmax(-1) for ids in neutral]
    losses = []

    def update(weights):
        originals = {n: w.detach().clone() for n, w in weights.items()}
        optimizer = torch.optim.Adam(list(weights.values()), lr=lr)
        with torch.enable_grad():
            for w in weights.values():
                w.requires_grad_(True)
            try:
                for _ in range(steps):
                    optimizer.zero_grad()
                    gaps = _pronoun_logits_gap(model, tok, professions, template)
                    loss = ((gaps - gaps.mean()) ** 2).mean()  # same gap for every job: no stereotype
                    for ids, ref in zip(neutral, reference):
                        logp = model(input_ids=ids).logits.float().log_softmax(-1)
                        loss = loss + kl_weight * torch.nn.functional.kl_div(logp, ref, log_target=True,
                                                                             reduction="batchmean") / len(neutral)
                    losses.append(loss.item())
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        for n, w in weights.items():
                            w.copy_(torch.clamp(w, originals[n] - norm_constraint, originals[n] + norm_constraint))
            finally:
                for w in weights.values():
                    w.requires_grad_(False)
                    w.grad = None
    result = edit_weights(model, names, update, method="debias-equalize", info={"layers": layers, "losses": losses})
    return result
