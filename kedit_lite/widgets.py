"""The Edit Lab (chapter 8): a live panel to apply, measure and undo edits with any method.

The logic lives in plain functions and in `EditLab` methods that tests drive by setting widget values and
calling `.click()` on buttons; the browser only renders. Every user string shown is HTML-escaped.
"""
import html
import importlib.util
import time

from .editing import METHODS, edit
from .metrics import KINDS, evaluate, score_edit
from .requests import EditCase, EditError, EditRequest, Probe

PROBE_KINDS = ("paraphrase", "reverse", "portability", "locality")
METHOD_LABELS = {"ft": "FT-L (fine-tune one layer)", "ike": "IKE (in-context)", "rome": "ROME (rank-one)",
                 "memit": "MEMIT (mass edit)", "mend": "MEND (learned editor)", "t-patcher": "T-Patcher (extra neuron)",
                 "grace": "GRACE (codebook adaptor)",
                 "calinet": "CaliNET (calibration slots)",
                 "serac": "SERAC (edit memory + scope classifier)",
                 "kn": "KN (knowledge neurons)"}


def available_methods():
    """Methods whose module exists in this installation, in course order."""
    return [m for m, module in METHODS.items() if importlib.util.find_spec(module) is not None]


def parse_probes(text):
    """Parse lines 'kind | prompt | answer' (kind: paraphrase, reverse, portability, locality) into probes."""
    probes = {k: [] for k in PROBE_KINDS}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or not all(parts):
            raise EditError(f"probes: line {number} ({line.strip()!r}) must look like 'kind | prompt | answer'")
        kind, prompt, answer = parts
        if kind not in probes:
            raise EditError(f"probes: line {number} has unknown kind {kind!r}; use one of {list(PROBE_KINDS)}")
        probes[kind].append(Probe(prompt, answer))
    return probes


def format_probes(case):
    """The editable text form of a case's probes (inverse of parse_probes)."""
    return "\n".join(f"{kind} | {p.prompt} | {p.answer}" for kind in PROBE_KINDS for p in getattr(case, kind))


def build_case(prompt, subject, target, probes_text=""):
    """An EditCase from the panel's fields; raises EditError naming the bad field."""
    return EditCase(EditRequest(prompt=prompt, subject=subject, target_new=target), **parse_probes(probes_text))


def results_html(before, after=None):
    """A before/after table: one row per probe, greedy answer and token accuracy; all text escaped."""
    def cell(row):
        if row is None:
            return "<td></td><td></td>"
        mark = "✅" if row["gen"] else "❌"
        return f"<td>{mark} {html.escape((row['generated'] or '').strip())}</td><td>{row['token_acc']:.2f}</td>"
    lines = ["<table class='kedit-lab'><tr><th>kind</th><th>prompt</th><th>expected</th>"
             "<th>before: says</th><th>acc</th><th>after: says</th><th>acc</th></tr>"]
    for kind in KINDS:
        for i, row in enumerate(before["details"].get(kind, [])):
            after_row = after["details"][kind][i] if after is not None else None
            expected = "(unchanged)" if kind == "locality" and after is not None else row["answer"]
            lines.append(f"<tr><td>{kind}</td><td>{html.escape(row['prompt'])}</td><td>{html.escape(expected)}</td>"
                         f"{cell(row)}{cell(after_row)}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def summary_row(scores):
    """{kind: token_acc} from one evaluate() result (for the compare view)."""
    return {kind: round(scores[kind]["token_acc"], 3) for kind in KINDS if kind in scores}


def compare_methods(model, tok, case, methods=None, **hparams_by_method):
    """Edit `case` with each method in turn (undoing after each) and return a table of scores and seconds."""
    import pandas as pd
    before = evaluate(model, tok, case)
    rows = {"(before)": {**summary_row(before), "seconds": 0.0}}
    for method in methods or available_methods():
        scored = score_edit(model, tok, case, method, before, **hparams_by_method.get(method, {}))
        rows[method] = {**summary_row(scored.after), "seconds": round(scored.seconds, 2)}
    return pd.DataFrame.from_dict(rows, orient="index")


class EditLab:
    """Model info, method choice, prompt/subject/target, editable probes, Apply/Undo, before/after table."""

    def __init__(self, model, tok, case=None, methods=None):
        import ipywidgets as w
        from .adapters import describe
        self.model, self.tok, self.result, self.before, self.after = model, tok, None, None, None
        info = describe(model)
        self.info = w.HTML(f"<b>{html.escape(str(model.config.name_or_path))}</b> · {info['layers']} layers · "
                           f"d_model {info['d_model']} · {info['parameters'] / 1e6:.0f}M parameters · "
                           f"{info['device']}")
        methods = methods or available_methods()
        self.method = w.Dropdown(options=[(METHOD_LABELS.get(m, m), m) for m in methods], description="method")
        self.prompt = w.Text(description="prompt", layout=w.Layout(width="95%"))
        self.subject = w.Text(description="subject")
        self.target = w.Text(description="target")
        self.probes = w.Textarea(description="probes", layout=w.Layout(width="95%", height="120px"))
        self.apply_button = w.Button(description="Apply edit", button_style="primary")
        self.undo_button = w.Button(description="Undo", disabled=True)
        self.compare_button = w.Button(description="Compare all methods")
        self.status = w.HTML()
        self.table = w.HTML()
        self.apply_button.on_click(lambda _: self.apply())
        self.undo_button.on_click(lambda _: self.undo())
        self.compare_button.on_click(lambda _: self.compare())
        if case is not None:
            self.load_case(case)
        self.widget = w.VBox([self.info, self.method, self.prompt, w.HBox([self.subject, self.target]), self.probes,
                              w.HBox([self.apply_button, self.undo_button, self.compare_button]), self.status,
                              self.table])

    def load_case(self, case):
        """Fill the fields from an EditCase (e.g. ke.lecture_case('space-needle-taipei'))."""
        self.prompt.value, self.subject.value = case.request.prompt, case.request.subject
        self.target.value, self.probes.value = case.request.target_new, format_probes(case)

    def _say(self, text, ok=True):
        colour = "green" if ok else "crimson"
        self.status.value = f"<span style='color:{colour}'>{html.escape(text)}</span>"

    def apply(self):
        """Undo any active edit, then apply the current fields with the chosen method and show before/after."""
        try:
            case = build_case(self.prompt.value, self.subject.value, self.target.value, self.probes.value)
            if self.result is not None:
                self.undo()
            self.before = evaluate(self.model, self.tok, case)
            start = time.perf_counter()
            self.result = edit(self.model, self.tok, case.request, method=self.method.value)
            self.after = self.result.evaluate(self.model, self.tok, case, before=self.before)
        except (EditError, ValueError, TypeError) as err:
            self._say(f"Not applied: {err}", ok=False)
            return None
        self.table.value = results_html(self.before, self.after)
        self.undo_button.disabled = False
        self._say(f"Applied {self.method.value} in {self.result.seconds:.2f} s "
                  f"(with scoring: {time.perf_counter() - start:.1f} s). Undo restores the exact weights.")
        return self.after

    def undo(self):
        """Undo the active edit (weights bit-identical to before)."""
        if self.result is None:
            self._say("Nothing to undo.", ok=False)
            return
        self.result.undo()
        self.result, self.undo_button.disabled = None, True
        if self.before is not None:
            self.table.value = results_html(self.before)
        self._say("Undone: the model is exactly as before the edit.")

    def compare(self):
        """Run every available method on the current fields and show one row per method."""
        try:
            case = build_case(self.prompt.value, self.subject.value, self.target.value, self.probes.value)
            if self.result is not None:
                self.undo()
            frame = compare_methods(self.model, self.tok, case, [value for _, value in self.method.options])
        except (EditError, ValueError, TypeError) as err:
            self._say(f"Not compared: {err}", ok=False)
            return None
        self.table.value = frame.to_html(escape=True)
        self._say("Compared; every edit was undone afterwards.")
        return frame


def edit_lab(model, tok, case=None, methods=None):
    """Build an EditLab and return it; display `lab.widget` in a notebook (tabs add the causal-trace explorer)."""
    import ipywidgets as w
    lab = EditLab(model, tok, case, methods)
    from .tracing import explorer
    lab.tabs = w.Tab(children=[lab.widget, explorer(model, tok)], titles=["Edit", "Causal trace"])
    return lab
