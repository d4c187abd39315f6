"""Draw the course's diagrams as SVG into book/figures/ (our own drawings of the ideas the chapters teach).

Run `python scripts/draw_figures.py` after changing a figure; the SVGs are committed and the chapters embed them.
Text stays text in the SVG (`svg.fonttype = none`), so Chinese terms render with the reader's fonts.
Output is deterministic (no dates, fixed ids), so a regenerated file differs only where a drawing changed.
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "book" / "figures"
plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "kedit-lite", "font.size": 10,
                     "font.family": "sans-serif"})
BLUE, ORANGE, GREEN, GREY, RED, PURPLE = "#dbe9f6", "#fde2c4", "#d9f0d3", "#eeeeee", "#f8d0d0", "#e5d8f0"


def canvas(width, height):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width), ax.set_ylim(0, height), ax.axis("off")
    return fig, ax


def box(ax, x, y, w, h, text, color=BLUE, size=10, bold=False, edge="#555555"):
    """A rounded box centred at (x, y) with centred text."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor=edge, linewidth=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, fontweight="bold" if bold else "normal")


def arrow(ax, start, end, text="", color="#444444", style="-|>", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, linewidth=1.2,
                                 connectionstyle=f"arc3,rad={rad}"))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, text, ha="center", fontsize=8.5,
                color=color)


def taxonomy():
    """The families of editing methods (the textbook's figure 5.4), with the ones this course runs marked."""
    fig, ax = canvas(11, 4.6)
    box(ax, 5.5, 4.1, 3.2, 0.5, "model editing  模型编辑", GREY, 11, True)
    branches = [(2.75, "external extension  外部拓展法", ORANGE,
                 [("memory-based  知识缓存法", ["SERAC", "Language Patch"]),
                  ("extra parameters  附加参数法", ["CaliNET", "T-Patcher", "GRACE"])]),
                (8.25, "internal modification  内部修改法", BLUE,
                 [("meta-learning  元学习法", ["ENN", "KE", "MEND"]),
                  ("locate-then-edit  定位编辑法", ["KN", "ROME", "MEMIT"])])]
    ran = {"T-Patcher", "MEND", "ROME", "MEMIT"}
    for x, name, color, families in branches:
        box(ax, x, 3.15, 3.6, 0.5, name, color, 10, True)
        arrow(ax, (5.5, 3.85), (x, 3.42))
        for j, (family, methods) in enumerate(families):
            fx = x - 1.35 + 2.7 * j
            box(ax, fx, 2.2, 2.45, 0.5, family, color, 9)
            arrow(ax, (x, 2.9), (fx, 2.47))
            for i, method in enumerate(methods):
                my = 1.45 - 0.5 * i
                box(ax, fx, my, 1.9, 0.38, method, GREEN if method in ran else "white", 9, method in ran)
            arrow(ax, (fx, 1.95), (fx, 1.66))
    ax.text(0.2, 0.1, "green: run in this course. Also run: IKE (in-context editing, the lecture's; it stores the fact "
            "in the prompt, like a memory) and FT-L (the fine-tuning baseline)", fontsize=8.5, color="#333333")
    return fig


def properties():
    """One edit and the probes of each property (the textbook's zebra, figure 5.3)."""
    fig, ax = canvas(11, 4.4)
    box(ax, 5.5, 2.3, 3.4, 0.9, "edit: a zebra's skin is black\n斑马的皮肤是黑色的", RED, 10, True)
    probes = [(1.9, 3.65, GREEN, "reliability  准确性", "What colour is a zebra's skin?  → black"),
              (9.1, 3.65, ORANGE, "generalization  泛化性",
               "A shaved zebra is what colour?\nTell me the colour of a zebra's skin.  → black"),
              (1.9, 0.85, BLUE, "portability  可迁移性",
               "Which horse has black skin?  → the zebra\nSame colour as its stripes' hair?\n"
               "A horse with black and white stripes?"),
              (9.1, 0.85, GREY, "locality  局部性",
               "Red Hare's skin colour?  (unchanged)\nWhat do zebras eat?  (unchanged)\nCan ostriches fly?  "
               "(unchanged)")]
    for x, y, color, name, text in probes:
        box(ax, x, y, 3.5, 1.15, "", color)
        ax.text(x, y + 0.38, name, ha="center", fontsize=10, fontweight="bold")
        ax.text(x, y - 0.08, text, ha="center", va="center", fontsize=8.3)
        arrow(ax, (5.5 + (-1.7 if x < 5 else 1.7), 2.3 + (0.3 if y > 2 else -0.3)),
              (x + (1.8 if x < 5 else -1.8), y))
    ax.text(5.5, 0.05, "efficiency  高效性: the time and memory the edit costs (batch editing: many facts at once)",
            ha="center", fontsize=8.5)
    return fig


def ike_prompt():
    """Anatomy of an IKE prompt: copy, update and retain demonstrations, then the new fact and the query."""
    fig, ax = canvas(10, 4.6)
    rows = [(GREEN, "copy  复制", "New Fact: Paris is the capital of Italy.\nQ: Paris is the capital of?  A: Italy"),
            (ORANGE, "update  更新", "New Fact: Paris is the capital of Italy.\nQ: Which country has Paris as "
                                    "its capital?  A: Italy"),
            (GREY, "retain  保留", "New Fact: Paris is the capital of Italy.\nQ: Berlin is the capital of?  "
                                  "A: Germany  (old answer kept)")]
    for i, (color, name, text) in enumerate(rows):
        y = 3.95 - 0.95 * i
        box(ax, 1.1, y, 1.7, 0.72, name, color, 10, True)
        box(ax, 5.9, y, 7.6, 0.72, text, "white", 8.8)
    ax.text(0.25, 1.2, "k demonstrations, retrieved by similarity to the new fact (several of each kind)",
            fontsize=8.5, style="italic")
    box(ax, 5.9, 0.55, 7.6, 0.72, "New Fact: The Space Needle is in Taipei.\nQ: The Space Needle is in?  A: ___",
        RED, 9, True)
    box(ax, 1.1, 0.55, 1.7, 0.72, "the edit\n+ query", RED, 10, True)
    return fig


def causal_tracing():
    """Causal tracing's three runs: clean, corrupted, and corrupted with one hidden state restored."""
    fig, ax = canvas(11, 3.8)
    tokens = ["The", "Space", "Needle*", "is", "in"]
    for r, (title, color) in enumerate([("1. clean run", GREEN), ("2. corrupted run:\nnoise on the subject",
                                                                   RED), ("3. corrupted, one state restored",
                                                                          ORANGE)]):
        x0 = 0.5 + 3.6 * r
        ax.text(x0 + 1.5, 3.55, title, ha="center", fontsize=10, fontweight="bold")
        for i, t in enumerate(tokens):
            for layer in range(4):
                noisy = r > 0 and t in ("Space", "Needle*") and layer == 0
                restored = r == 2 and t == "Needle*" and layer == 1
                fill = GREEN if r == 0 else (RED if noisy else ORANGE if restored else "white")
                ax.add_patch(plt.Rectangle((x0 + 0.6 * i, 0.75 + 0.55 * layer), 0.45, 0.4, facecolor=fill,
                                           edgecolor="#777777"))
            ax.text(x0 + 0.6 * i + 0.22, 0.45, t, ha="center", fontsize=7.5, rotation=0)
        answer = {0: "Seattle: P high", 1: "Seattle: P low", 2: "P recovered?\n= indirect effect"}[r]
        ax.text(x0 + 1.5, 0.02, answer, ha="center", fontsize=8.5)
        ax.text(x0 + 2.95, 2.65, "→ next token", fontsize=7.5, rotation=90, va="center")
    ax.text(0.05, 1.9, "layers ↑", rotation=90, fontsize=8.5, va="center")
    return fig


def ffn_memory():
    """The FFN as a key–value memory: rows of W_in are keys, columns of W_out are values."""
    fig, ax = canvas(10, 3.6)
    box(ax, 1.0, 1.8, 1.4, 0.7, "hidden x\n(d_model)", BLUE, 9)
    box(ax, 3.5, 1.8, 2.2, 1.9, "W_in: keys\nk_i · x = how much\nthis input matches\nkey i", ORANGE, 9)
    box(ax, 5.9, 1.8, 1.5, 1.3, "σ(·)\nactivation\nm_i", GREY, 9)
    box(ax, 8.3, 1.8, 2.3, 1.9, "W_out: values\nΣ_i m_i v_i\n(the down projection,\nthe matrix ROME edits)",
        GREEN, 9)
    arrow(ax, (1.7, 1.8), (2.4, 1.8)), arrow(ax, (4.6, 1.8), (5.15, 1.8)), arrow(ax, (6.65, 1.8), (7.15, 1.8))
    ax.text(5.0, 0.25, "ROME's key k = the input of W_out at the subject's last token; its value v = W_out k",
            ha="center", fontsize=9)
    return fig


def rome_pipeline():
    """ROME: locate a layer, read the key k*, optimise the value v*, write them with one rank-one update."""
    fig, ax = canvas(11, 2.8)
    steps = [("1. locate\ncausal tracing:\nwhich layer's MLP\nrecalls the fact", GREY),
             ("2. key k*\nW_out's input at the\nsubject's last token,\naveraged over prefixes", ORANGE),
             ("3. value v*\noptimise δ so that\nv = W k* + δ makes\nthe target likely", BLUE),
             ("4. rank-one update\nŴ = W + Λ (C⁻¹k*)ᵀ\nΛ = (v* − W k*) /\n((C⁻¹k*)ᵀ k*)", GREEN)]
    for i, (text, color) in enumerate(steps):
        box(ax, 1.4 + 2.75 * i, 1.5, 2.35, 1.7, text, color, 9)
        if i:   # from the right edge of the box before to the left edge of this one
            arrow(ax, (1.4 + 2.75 * (i - 1) + 1.2, 1.5), (1.4 + 2.75 * i - 1.2, 1.5))
    ax.text(5.5, 0.2, "C = E[k kᵀ] over many texts: the other keys, whose values the update should leave alone",
            ha="center", fontsize=9)
    return fig


def mend_editor():
    """MEND: the gradient of one layer is rank one, δ uᵀ; a small network edits (u, δ) into the update."""
    fig, ax = canvas(11, 2.8)
    box(ax, 1.2, 1.5, 2.0, 1.3, "edit loss on\n(prompt, target)\none backward", RED, 9)
    box(ax, 3.8, 1.5, 2.2, 1.3, "per edited layer:\ninput u, output\ngradient δ\n∇W = δ uᵀ", ORANGE, 9)
    box(ax, 6.5, 1.5, 2.3, 1.3, "editor g (trained once)\nnormalise, low-rank\nMLP + residual\n→ ũ, δ̃", BLUE, 9)
    box(ax, 9.4, 1.5, 2.3, 1.3, "update\nW̃ = W − α δ̃ ũᵀ\n(no gradient steps\nat edit time)", GREEN, 9)
    arrow(ax, (2.2, 1.5), (2.7, 1.5)), arrow(ax, (4.9, 1.5), (5.35, 1.5)), arrow(ax, (7.65, 1.5), (8.25, 1.5))
    ax.text(5.5, 0.25, "a d_out × d_in gradient passes through the editor as two vectors: d_out + d_in numbers",
            ha="center", fontsize=9)
    return fig


def t_patcher_neuron():
    """T-Patcher: one extra neuron in the last FFN, firing only on the mistake it patches."""
    fig, ax = canvas(10, 3.6)
    box(ax, 1.1, 1.8, 1.6, 0.8, "hidden x\n(last layer)", BLUE, 9)
    for i in range(4):
        box(ax, 4.0, 2.9 - 0.55 * i, 2.2, 0.42, f"FFN neuron {i + 1}: k_{i + 1}, v_{i + 1}", "white", 8.5)
    box(ax, 4.0, 0.55, 2.2, 0.55, "patch: k_p, b_p, v_p", PURPLE, 9, True)
    box(ax, 8.2, 1.8, 2.6, 1.5, "output + a_p · v_p\na_p = act(k_p · x + b_p)\nfires on the edit input,\n"
        "silent on memory inputs", GREEN, 9)
    arrow(ax, (1.9, 1.8), (2.85, 2.4)), arrow(ax, (1.9, 1.8), (2.85, 0.6), color="#7a4fa0")
    arrow(ax, (5.15, 2.1), (6.85, 1.95)), arrow(ax, (5.15, 0.6), (6.85, 1.5), color="#7a4fa0")
    ax.text(5.0, 0.02, "total loss L = L_e + a·L_a + m·L_m: edit, activate on the edit, stay silent elsewhere",
            ha="center", fontsize=9)
    return fig


FIGURES = {"taxonomy": taxonomy, "properties": properties, "ike_prompt": ike_prompt,
           "causal_tracing": causal_tracing, "ffn_memory": ffn_memory, "rome_pipeline": rome_pipeline,
           "mend_editor": mend_editor, "t_patcher_neuron": t_patcher_neuron}


def main(out=OUT, names=None):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or FIGURES:
        fig = FIGURES[name]()
        path = out / f"{name}.svg"
        fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in main(names=sys.argv[1:] or None):
        print(p)
