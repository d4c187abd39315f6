"""Shared input checks for every entry point: each error names the field and says how to fix it."""
import math
import numbers
import unicodedata


class EditError(ValueError):
    """A bad edit request or hyperparameter; the message names the field and the fix."""


MAX_LR = 10.0        # Adam moves each weight by about lr per step: far above this an edit only destroys the layer
CONTEXT_MARGIN = 32  # tokens kept free for what methods add around a request (ROME/MEMIT's random prefixes)
# Characters that render as nothing but are not whitespace to str.strip() (zero-width space, Hangul filler, ...).
_BLANK = {"\u115f", "\u1160", "\u2800", "\u3164", "\uffa0"}


def is_integer(value):
    """An int or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    """An int, float or numpy number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _visible(ch):
    return not ch.isspace() and ch not in _BLANK and unicodedata.category(ch) not in ("Cf", "Cc", "Cs", "Cn")


def _range_words(kind, low, high, open_low):
    """'a positive number', 'an integer from 0 to 5', ...: the words an error uses for the allowed range."""
    article = "an" if kind[0] in "aeiou" else "a"
    if low == 0 and high is None:
        return f"a {'positive' if open_low else 'non-negative'} {kind}"
    if low == 1 and high is None and kind == "integer":
        return "a positive integer"
    if low is not None and high is not None:
        return f"{article} {kind} from {low} to {high}" if not open_low else f"{article} {kind} > {low} and <= {high}"
    if low is not None:
        return f"{article} {kind} {'>' if open_low else '>='} {low}"
    return f"{article} {kind} <= {high}" if high is not None else f"{article} {kind}"


def _fail(name, desc, value, hint):
    raise EditError(f"{name}: expected {desc}, got {value!r}" + (f"; {hint}" if hint else ""))


def integer(name, value, low=None, high=None, hint=""):
    """`value` as an int (numpy integers welcome, bools refused), checked against [low, high]."""
    desc = _range_words("integer", low, high, False)
    if not is_integer(value) or (low is not None and value < low) or (high is not None and value > high):
        _fail(name, desc, value, hint)
    return int(value)


def number(name, value, low=None, high=None, open_low=False, desc=None, hint=""):
    """`value` unchanged if it is a finite real number in range (bools and strings refused)."""
    desc = desc or _range_words("number", low, high, open_low)
    if not is_number(value) or not math.isfinite(value):
        _fail(name, desc, value, hint)
    if low is not None and (value <= low if open_low else value < low):
        _fail(name, desc, value, hint)
    if high is not None and value > high:
        _fail(name, desc, value, hint)
    return value


def learning_rate(value, name="lr"):
    """A finite learning rate in (0, MAX_LR]."""
    return number(name, value, 0, MAX_LR, open_low=True, desc="a positive number (a finite learning rate)",
                  hint=f"learning rates above {MAX_LR:g} only destroy the edited weights; try 1e-3 to 1")


def flag(name, value):
    """True or False, nothing else."""
    if not isinstance(value, bool):
        raise EditError(f"{name}: expected True or False, got {value!r}")
    return value


def text(name, value, example="", required=True):
    """A string with at least one visible character and no unpaired surrogate; None only if not required."""
    if value is None:
        if required:
            raise EditError(f"{name}: missing; pass a non-empty string" + (f", e.g. {example}" if example else ""))
        return None
    if not isinstance(value, str):
        raise EditError(f"{name}: expected a string, got {type(value).__name__} ({value!r})")
    bad = next((i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        raise EditError(f"{name}: contains an unpaired surrogate ({value[bad]!r} at index {bad}), which is not "
                        "valid Unicode; decode the text properly (e.g. bytes.decode('utf-8')) before editing")
    if not any(_visible(ch) for ch in value):
        invisible = sorted({f"U+{ord(ch):04X}" for ch in value if not ch.isspace()})
        what = f" (only invisible characters: {', '.join(invisible)})" if invisible else ""
        raise EditError(f"{name}: empty{what}; pass visible text" + (f", e.g. {example}" if example else ""))
    return value


def context_window(model, tok=None):
    """The model's maximum sequence length in tokens (None if neither the config nor the tokenizer says)."""
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if n is None and tok is not None and 0 < getattr(tok, "model_max_length", 0) < 10**7:
        n = tok.model_max_length
    return n


def model_and_tokenizer(model, tok):
    """A loaded causal LM and its tokenizer (as ke.load_model returns them)."""
    import torch
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise EditError(f"model: expected a loaded language model (model, tok = ke.load_model()), got "
                        f"{type(model).__name__}")
    if not callable(tok) or not hasattr(tok, "decode"):
        raise EditError(f"tok: expected the model's tokenizer (model, tok = ke.load_model()), got {type(tok).__name__}")


def fits_context(model, tok, requests, margin=CONTEXT_MARGIN):
    """Each request (prompt with subject, plus target) leaves `margin` tokens of the model's context free."""
    from .tokens import join
    window = context_window(model, tok)
    if window is None:
        return
    for i, r in enumerate(requests):
        n = len(tok(r.prompt_text + join(r.prompt_text, r.target_new), add_special_tokens=False).input_ids)
        if n + margin > window:
            name = "subject" if len(r.subject) > len(r.template) else "prompt"
            raise EditError(f"{name}: request {i} is {n} tokens long with its target, and this model reads at most "
                            f"{window} tokens ({margin} of them kept for the methods' prefixes); shorten the {name}")


def no_conflicts(requests):
    """Refuse two requests in one call that ask the same prompt for different answers."""
    seen = {}
    for i, r in enumerate(requests):
        key = " ".join(r.prompt_text.split()).casefold()
        j = seen.setdefault(key, i)
        if requests[j].target_new.casefold() != r.target_new.casefold():
            raise EditError(f"requests: requests {j} and {i} both edit {r.prompt_text!r}, to "
                            f"{requests[j].target_new!r} and {r.target_new!r}; one edit cannot make both true, so "
                            "keep one of them (or edit them one after the other, the later one winning)")


def config(config_class, hparams, method, base=None):
    """A method's frozen config from keyword options (on top of `base`); unknown names are refused by name."""
    import dataclasses
    known = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise EditError(f"hparams: unknown option(s) {unknown} for method {method!r}; its options are {known}")
    if base is None:
        return config_class(**hparams)
    if not isinstance(base, config_class):
        raise EditError(f"config: expected a {config_class.__name__} for method {method!r}, got "
                        f"{type(base).__name__}")
    return dataclasses.replace(base, **hparams)
