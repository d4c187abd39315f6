"""The Jupyter Book site: toc, config (Colab launch buttons, Chinese search), and notebook hygiene (chapter rules)."""
import ast
import json
import re
from pathlib import Path

import pytest
import yaml

import kedit_lite as ke

ROOT = Path(__file__).resolve().parent.parent
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
CHAPTERS = ["01_what_is_model_editing", "02_measuring_an_edit", "03_ike", "04_causal_tracing", "05_rome_memit",
            "06_mend", "07_t_patcher", "08_applications", "09_method_comparison"]


def toc_files():
    """Every file named in _toc.yml, root first, in order."""
    files = [TOC["root"]]
    for entry in TOC.get("chapters", []):
        files.append(entry["file"])
        files += [sub["file"] for sub in entry.get("sections", [])]
    return files


def resolve(entry):
    """The file a toc entry means (Jupyter Book lets the suffix be left out)."""
    for suffix in ("", ".md", ".ipynb"):
        path = ROOT / f"{entry}{suffix}"
        if path.is_file():
            return path
    return None


def notebooks():
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_toc_order():
    files = toc_files()
    assert files[:3] == ["book/intro", "book/how_to_use", "book/instructor"]
    n = len(CHAPTERS)
    assert files[3:3 + n] == [f"notebooks/{c}" for c in CHAPTERS]
    assert files[3 + n:] == ["book/glossary", "book/references", "book/execution", "book/lab_notes"]


@pytest.mark.parametrize("entry", toc_files())
def test_toc_entry_exists(entry):
    assert resolve(entry) is not None, f"_toc.yml lists {entry!r} but no such .md/.ipynb exists"


def test_every_notebook_is_in_the_toc():
    listed = {resolve(e) for e in toc_files()}
    assert notebooks(), "no notebooks found"
    missing = [p.name for p in notebooks() if p not in listed]
    assert not missing, f"notebooks not in _toc.yml (the site would skip them): {missing}"


def test_config_builds_only_the_book():
    assert CONFIG["only_build_toc_files"] is True
    for pattern in (".venv", "_build", ".cache", "tests", "scripts", "kedit_lite", "README.md", "CONTRIBUTING.md"):
        assert pattern in CONFIG["exclude_patterns"], f"exclude_patterns should contain {pattern}"
    execute = CONFIG["execute"]
    assert execute["execute_notebooks"] in ("force", "cache")
    assert execute["timeout"] >= 600 and execute["allow_errors"] is False


def test_config_colab_launch_buttons():
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    repo = CONFIG["repository"]
    assert repo["url"] == ke.course.REPOSITORY and repo["branch"] == ke.course.BRANCH == "main"
    # sphinx-book-theme builds colab_url/github/<org>/<repo>/blob/<branch>/<path_to_book>/<page>.ipynb
    book_relpath = str(repo.get("path_to_book", "")).strip("/")
    book_relpath = book_relpath + "/" if book_relpath else ""
    org_repo = repo["url"].split("github.com/")[1]
    link = f"{CONFIG['launch_buttons']['colab_url']}/github/{org_repo}/blob/{repo['branch']}/" \
           f"{book_relpath}notebooks/01_what_is_model_editing.ipynb"
    assert link == ke.course.colab_url("notebooks/01_what_is_model_editing.ipynb")


def test_config_chinese_search():
    assert CONFIG["sphinx"]["config"]["html_search_language"] == "zh"
    import jieba  # noqa: F401  (Sphinx's Chinese search splitter needs it)


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_stored_without_outputs(path):
    for i, cell in enumerate(load(path)["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, \
                f"{path.name} cell {i} has outputs; run python scripts/strip_notebooks.py {path.name}"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_colab_badge_points_at_itself(path):
    first = load(path)["cells"][0]
    assert first["cell_type"] == "markdown"
    text = "".join(first["source"])
    links = re.findall(r"\]\((https://colab\.research\.google\.com/github/[^)]+)\)", text)
    assert "colab-badge.svg" in text and links, f"{path.name}: the first cell must carry the Colab badge"
    assert links[0] == ke.course.colab_url(f"notebooks/{path.name}"), f"{path.name}: badge links {links[0]}"
    assert re.search(r"^# ", text, re.M), f"{path.name}: the first cell must have the chapter title"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_first_code_cell_is_the_setup(path):
    code = [c for c in load(path)["cells"] if c["cell_type"] == "code"]
    src = "".join(code[0]["source"])
    for needle in ('"google.colab" in sys.modules', "cfg = ke.course.setup()",
                   "ke.load_model(cfg.model, device=cfg.device)"):
        assert needle in src, f"{path.name}: the first code cell lacks {needle!r}"


def _calls_input(source):
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return re.search(r"(?<![\w.])input\s*\(", source) is not None
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "input"
               for n in ast.walk(tree))


def test_input_detector():
    assert _calls_input("x = input('name? ')") and not _calls_input("x = model_input(3)\ny = 'input()'")


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_never_calls_input(path):
    for i, cell in enumerate(load(path)["cells"]):
        if cell["cell_type"] == "code":
            assert not _calls_input("".join(cell["source"])), f"{path.name} cell {i} calls input()"


def test_glossary_has_the_terms_and_valid_links():
    text = (ROOT / "book" / "glossary.md").read_text(encoding="utf-8")
    for term in ("模型编辑", "后训练", "准确性", "可靠性", "泛化性", "可迁移性", "局部性", "高效性", "上下文知识编辑",
                 "因果跟踪", "秩一模型编辑", "超网络", "元学习", "补丁", "知识神经元", "外部拓展法", "内部修改法",
                 "知识缓存", "定位-编辑"):
        assert term in text, f"glossary lacks {term}"
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) >= 30
    for target in set(re.findall(r"\]\(\.\./(notebooks/[^)]+)\)", text)):
        assert (ROOT / target).is_file(), f"glossary links to missing {target}"



def test_glossary_links_to_the_chapter_that_teaches_the_term():
    """Each term's chapter link goes to a chapter whose text names the term (in English or in Chinese)."""
    text = (ROOT / "book" / "glossary.md").read_text(encoding="utf-8")
    chapter_text = {p.name: " ".join("".join(c["source"]) for c in load(p)["cells"]).lower() for p in notebooks()}
    wrong = []
    for row in text.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 4 or "](../notebooks/" not in cells[3]:
            continue
        names = [t.strip().lower() for t in re.split(r"[/(),]", cells[0]) + cells[1].split("/") if t.strip()]
        for nb in re.findall(r"notebooks/([\w.]+\.ipynb)", cells[3]):
            if not any(name in chapter_text[nb] for name in names):
                wrong.append(f"{cells[0]} -> {nb}")
    assert not wrong, f"glossary terms linked to a chapter that never names them: {wrong}"

# Loaders that need a data directory or the network; a chapter's default path must not call them directly
# (it asks ke.course.facts, which serves the shipped course facts unless KEDIT_DATA / KEDIT_FULL_RUN say otherwise).
NEEDS_DATA = re.compile(r"\b(load_counterfact|load_zsre|counterfact_subjects)\(|load_cases\(\s*[\"'](counterfact|zsre)")


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_default_path_needs_no_dataset(path):
    for i, cell in enumerate(load(path)["cells"]):
        if cell["cell_type"] == "code":
            hit = NEEDS_DATA.search("".join(cell["source"]))
            assert not hit, f"{path.name} cell {i} calls {hit.group(0)!r}: use ke.course.facts(cfg, ...)"


SEEDS = ROOT.parent / "shared" / "seeds" / "README.md"


def _seed_table_rows():
    """Table 5.2 rows as written in ../shared/seeds/README.md: (method, [five ratings])."""
    rows = []
    for line in SEEDS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].endswith("法"):
            rows.append((cells[1], cells[2:]))
    return rows


@pytest.mark.skipif(not SEEDS.exists(), reason="the course's source documents (../shared/seeds) are not beside the repo")
def test_table_5_2_is_the_textbooks_exactly():
    ours = json.loads((ROOT / "kedit_lite" / "data" / "textbook_table_5_2.json").read_text(encoding="utf-8"))
    props = list(ours["properties"])
    mine = [(r["method"], [r[p] for p in props]) for r in ours["rows"]]
    assert mine == _seed_table_rows() and len(mine) == 8


def test_figure_script_draws_every_figure(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("draw_figures", ROOT / "scripts" / "draw_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.main(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in (ROOT / "book" / "figures").glob("*.svg"))
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert text.lstrip().startswith("<?xml") and "<svg" in text and "<text" in text   # text stays text


TYPED_CHAPTER = re.compile(r"(?<![\[\w])[Cc]hapters? \d+(?!\d)(?!\]\()")


def _markdown_sources():
    for nb in notebooks():
        for i, cell in enumerate(load(nb)["cells"]):
            if cell["cell_type"] == "markdown":
                yield f"{nb.name} cell {i}", "".join(cell["source"])
    for page in sorted((ROOT / "book").glob("*.md")):
        yield page.name, page.read_text(encoding="utf-8")


def test_chapter_references_are_links():
    """'chapter 5' in prose is a link, so the -W build fails when its target moves; titles are not references."""
    typed = [f"{where}: {m.group(0)!r}" for where, text in _markdown_sources() for line in text.splitlines()
             if not line.startswith("# ") for m in TYPED_CHAPTER.finditer(line)]
    assert not typed, f"typed chapter references (write [chapter N](0N_name.ipynb)): {typed[:10]}"


def _exercises(cells):
    """[(header index, header text)] of every '### Exercise N' cell."""
    return [(i, "".join(c["source"])) for i, c in enumerate(cells)
            if c["cell_type"] == "markdown" and re.match(r"### Exercise \d+ — ", "".join(c["source"]))]


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_exercises_follow_the_pattern(path):
    """≥ 3 exercises: difficulty and importance, a stub, a checker, a folded solution after it, proved in a hidden cell."""
    cells = load(path)["cells"]
    found = _exercises(cells)
    assert len(found) >= 3, f"{path.name}: {len(found)} exercises"
    for i, head in found:
        assert re.search(r"\*\*Difficulty\*\* ⭐{1,3} · \*\*Importance\*\* [●○]{3}", head), head[:80]
        stub, checker, solution, proof = (cells[i + k] for k in range(1, 5))
        stub_src = "".join(stub["source"])
        assert stub["cell_type"] == "code" and "NotImplementedError" in stub_src and "solution" not in stub_src
        assert checker["cell_type"] == "code" and "def check_" in "".join(checker["source"])
        assert solution["cell_type"] == "markdown" and "".join(solution["source"]).startswith("<details>")
        assert proof["cell_type"] == "code" and "hide-input" in proof["metadata"].get("tags", [])
        assert proof["metadata"].get("jupyter", {}).get("source_hidden") and "assert check_" in "".join(proof["source"])


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_chapter_ends_with_its_quiz(path):
    cells = load(path)["cells"]
    chapter = f"ch{int(path.name[:2])}"
    assert "".join(cells[-1]["source"]).strip() == f'ke.quiz.show("{chapter}")'
    assert "## Self-check quiz" in "".join(cells[-2]["source"])


def test_every_figure_is_shown_in_a_chapter():
    shown = set()
    for nb in notebooks():
        for cell in load(nb)["cells"]:
            shown |= set(re.findall(r"\]\(\.\./book/figures/([\w-]+\.svg)\)", "".join(cell["source"])))
    drawn = {p.name for p in (ROOT / "book" / "figures").glob("*.svg")}
    assert drawn and drawn == shown, f"drawn but not shown: {drawn - shown}; shown but missing: {shown - drawn}"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_chapter_has_the_textbook_arc(path):
    """Goals, where it sits in the lecture and the textbook, a time estimate, then … a summary before the exercises."""
    cells = load(path)["cells"]
    intro = "".join(cells[0]["source"])
    assert "**Learning goals**" in intro and "*Where this sits:*" in intro and "*Time:*" in intro and "§5." in intro
    headings = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    summary = next(i for i, h in enumerate(headings) if "## Summary" in h)
    exercises = next(i for i, h in enumerate(headings) if "## Exercises" in h)
    assert summary <= exercises


SHOWN_REFERENCE = {"01_what_is_model_editing": ["ft.reference_edit"], "03_ike": ["ike.reference_context"],
                   "04_causal_tracing": ["reference_trace"], "05_rome_memit": ["rome.reference_edit"],
                   "06_mend": ["mend.reference_edit"], "07_t_patcher": ["t_patcher.reference_edit"]}


@pytest.mark.parametrize("chapter", sorted(SHOWN_REFERENCE))
def test_method_chapter_shows_its_reference_implementation(chapter):
    """The chapter prints the library's plain reference code for its method (the issue: read beside the chapter)."""
    code = [("".join(c["source"])) for c in load(ROOT / "notebooks" / f"{chapter}.ipynb")["cells"]
            if c["cell_type"] == "code"]
    for name in SHOWN_REFERENCE[chapter]:
        assert any(name in src and ("show_code(" in src or "getsource(" in src) for src in code), \
            f"{chapter} does not show {name}"
