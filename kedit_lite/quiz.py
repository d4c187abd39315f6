"""Each chapter's self-check quiz: interactive in Jupyter (ipywidgets), a click-to-reveal list on the static site.

The questions live in `data/quizzes_en.json` (one list per chapter), so the chapters' code cells stay the same
in every language edition. `show("ch5")` returns an object whose display carries both forms: a notebook with a
widget manager shows radio buttons and a Check button; the book renders the HTML with folded answers.
"""
import html
import json
from dataclasses import dataclass
from pathlib import Path

from .checks import EditError

QUIZ_FILE = Path(__file__).parent / "data" / "quizzes_en.json"


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: the options, the index of the right one, and why it is right."""
    question: str
    options: tuple
    answer: int
    why: str

    def __post_init__(self):
        if not (isinstance(self.options, tuple) and len(self.options) >= 2
                and isinstance(self.answer, int) and 0 <= self.answer < len(self.options)):
            raise EditError(f"quiz: {self.question!r} needs ≥ 2 options and an answer index among them")


def load(chapter, path=QUIZ_FILE):
    """The questions of one chapter ("ch1" … "ch9")."""
    quizzes = json.loads(Path(path).read_text(encoding="utf-8"))
    if chapter not in quizzes:
        raise EditError(f"chapter: no quiz named {chapter!r}; the quizzes are {sorted(quizzes)}")
    return [Question(q["question"], tuple(q["options"]), q["answer"], q["why"]) for q in quizzes[chapter]]


def as_html(questions):
    """The static form: each question with lettered options and its answer folded under a click."""
    parts = []
    for i, q in enumerate(questions, 1):
        options = "".join(f"<li>{html.escape(o)}</li>" for o in q.options)
        answer = f"{'ABCDEFGH'[q.answer]}. {html.escape(q.options[q.answer])} — {html.escape(q.why)}"
        parts.append(f"<p><b>{i}. {html.escape(q.question)}</b></p><ol type=\"A\">{options}</ol>"
                     f"<details><summary>Answer</summary><p>{answer}</p></details>")
    return "<div class=\"kedit-quiz\">" + "".join(parts) + "</div>"


def grade(questions, choices):
    """[(right?, feedback)] for the chosen option indices (None: not answered)."""
    out = []
    for q, choice in zip(questions, choices):
        if choice is None:
            out.append((False, "not answered yet"))
        elif choice == q.answer:
            out.append((True, f"right — {q.why}"))
        else:
            out.append((False, f"not quite: the answer is {'ABCDEFGH'[q.answer]}. {q.why}"))
    return out


class Quiz:
    """Displays as a widget quiz where widgets work, and as `as_html` everywhere else."""

    def __init__(self, questions):
        self.questions = list(questions)
        self._widget = None

    def widget(self):
        """Radio buttons per question, one Check button, one feedback line per question."""
        import ipywidgets as w
        radios = [w.RadioButtons(options=[(o, k) for k, o in enumerate(q.options)], value=None,
                                 layout=w.Layout(width="auto")) for q in self.questions]
        feedback = [w.HTML() for _ in self.questions]
        button, score = w.Button(description="Check", button_style="primary"), w.HTML()

        def check(_=None):
            results = grade(self.questions, [r.value for r in radios])
            for line, (ok, text) in zip(feedback, results):
                line.value = f"<span style='color:{'green' if ok else '#b00'}'>{html.escape(text)}</span>"
            score.value = f"<b>{sum(ok for ok, _ in results)} of {len(results)} right</b>"
        button.on_click(check)
        rows = [w.VBox([w.HTML(f"<b>{i}. {html.escape(q.question)}</b>"), r, f])
                for i, (q, r, f) in enumerate(zip(self.questions, radios, feedback), 1)]
        self.check = check
        self.radios = radios
        return w.VBox(rows + [w.HBox([button, score])])

    def _repr_mimebundle_(self, include=None, exclude=None):
        data = {"text/plain": "\n".join(f"{i}. {q.question}" for i, q in enumerate(self.questions, 1)),
                "text/html": as_html(self.questions)}
        try:
            self._widget = self._widget or self.widget()
            bundle = self._widget._repr_mimebundle_() or {}
            data.update({k: v for k, v in bundle.items() if k != "text/plain"})
        except ImportError:   # no ipywidgets: the HTML is the quiz
            pass
        return data


def show(chapter):
    """The chapter's self-check quiz, ready to display (the last line of a cell)."""
    return Quiz(load(chapter))
