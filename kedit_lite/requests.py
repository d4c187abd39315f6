"""What an edit asks for, validated before any weight is touched (chapter 1: the definition of an edit)."""
from dataclasses import dataclass, field

from .checks import EditError, text

MAX_PROMPT_CHARS = 2000
MAX_SUBJECT_CHARS = 200  # an entity's name; CounterFact's and zsRE's longest is under 100
MAX_TARGET_CHARS = 200
_EXAMPLES = {"prompt": "'{} is located in the city of'", "subject": "'The Space Needle'", "target_new": "'Taipei'"}


@dataclass(frozen=True)
class EditRequest:
    """Make the model complete `prompt` (with `{}` standing for `subject`) with `target_new`.

    `target_true` (optional) is the answer the model should stop giving; it enables P(new) > P(true) scores.
    """
    prompt: str
    subject: str
    target_new: str
    target_true: str = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new"):   # no blank, invisible-only or broken-Unicode text
            text(name, getattr(self, name), f"{name}={_EXAMPLES[name]}")
        text("target_true", self.target_true, "the model's current answer, or None if unknown", required=False)
        if len(self.subject) > MAX_SUBJECT_CHARS:
            raise EditError(f"subject: {len(self.subject)} characters is over the {MAX_SUBJECT_CHARS}-character "
                            "limit; a subject is the name of one entity")
        if self.subject != self.subject.strip():
            raise EditError(f"subject: {self.subject!r} has leading/trailing whitespace; strip it")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise EditError(f"prompt: {len(self.prompt)} characters is over the {MAX_PROMPT_CHARS}-character limit; "
                            "an edit prompt is one short statement")
        if self.prompt.count("{}") > 1:
            raise EditError("prompt: '{}' appears more than once; use exactly one '{}' for the subject")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise EditError(f"prompt: the subject {self.subject!r} does not occur in the prompt {self.prompt!r}; "
                            "put '{}' where the subject goes, or include the subject verbatim")
        if self.prompt.rstrip() != self.prompt:
            raise EditError("prompt: ends with whitespace; remove it (the target is tokenized with its own "
                            "leading space)")
        if len(self.target_new) > MAX_TARGET_CHARS:
            raise EditError(f"target_new: {len(self.target_new)} characters is over the {MAX_TARGET_CHARS}-character "
                            "limit; an edit target is a short answer")
        if self.target_new != self.target_new.strip():
            raise EditError(f"target_new: {self.target_new!r} has leading/trailing whitespace; strip it "
                            "(a leading space is added when tokenizing)")
        if self.target_true is not None and self.target_true.strip().lower() == self.target_new.strip().lower():
            raise EditError(f"target_new: equals target_true ({self.target_true!r}); an edit must change the answer")
        if self.prompt_text.strip().endswith(self.target_new):
            raise EditError("target_new: the prompt already ends with the target; the prompt must stop right "
                            "before the answer")

    @property
    def template(self):
        """The prompt with `{}` in place of the subject."""
        return self.prompt if "{}" in self.prompt else self.prompt.replace(self.subject, "{}", 1)

    @property
    def prompt_text(self):
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject) if "{}" in self.prompt else self.prompt

    @classmethod
    def coerce(cls, request):
        """Accept an EditRequest or a dict with the same fields (the shape EasyEdit users know)."""
        if isinstance(request, cls):
            return request
        if isinstance(request, dict):
            unknown = set(request) - {"prompt", "subject", "target_new", "target_true"}
            if unknown:
                raise EditError(f"request: unknown field(s) {sorted(unknown)}; use prompt, subject, target_new, "
                                "target_true")
            return cls(*(request.get(k) for k in ("prompt", "subject", "target_new", "target_true")))
        raise EditError(f"request: expected an EditRequest or a dict, got {type(request).__name__}")


def as_request_list(requests):
    """Normalise one request or a list of them into a non-empty list of EditRequest."""
    if isinstance(requests, (EditRequest, dict)):
        return [EditRequest.coerce(requests)]
    if isinstance(requests, (list, tuple)):
        if not requests:
            raise EditError("requests: empty list; pass at least one EditRequest")
        return [EditRequest.coerce(r) for r in requests]
    raise EditError(f"request: expected an EditRequest, a dict or a list of them, got {type(requests).__name__}")


@dataclass
class Probe:
    """One prompt and the answer expected from it."""
    prompt: str
    answer: str


@dataclass
class EditCase:
    """An edit plus the probes that measure it (chapter 2): the lecture's metrics, one list per kind."""
    request: EditRequest
    paraphrase: list = field(default_factory=list)   # [Probe] same question, other words -> target_new
    reverse: list = field(default_factory=list)      # [Probe] asked backwards -> the subject
    portability: list = field(default_factory=list)  # [Probe] a fact that should follow from the edit
    locality: list = field(default_factory=list)     # [Probe] unrelated; should keep the model's old answer
    meta: dict = field(default_factory=dict)          # source, ids, Chinese text...
