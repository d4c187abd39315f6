"""Edit datasets: the course's own cases (shipped), CounterFact and zsRE (read from a directory or downloaded).

Shipped with the package, so every chapter's default path runs offline: the lecture and textbook cases
(`load_lecture`) and the course facts (`load_course_facts`), CounterFact-shaped facts written for the course.
CounterFact and zsRE come from $KEDIT_DATA_DIR (or `shared/data` beside the checkout), else from their original
sources when online; KEDIT_OFFLINE=1 turns downloads off. Chapter 2 explains the probes.
"""
import json
import os
import random
import urllib.request
from pathlib import Path

from . import checks
from .requests import EditCase, EditError, EditRequest, Probe

_PACKAGE_DATA = Path(__file__).parent / "data"
# Original sources, used only when no local copy exists and the machine is online.
SOURCES = {
    "counterfact": "https://rome.baulab.info/data/dsets/counterfact.json",
    "zsre": "https://rome.baulab.info/data/dsets/zsre_mem_eval.json",
}


def data_dir():
    """Directory holding CounterFact/zsRE: $KEDIT_DATA_DIR, else a `shared/data` beside the checkout, else None."""
    if os.environ.get("KEDIT_DATA_DIR"):
        return Path(os.environ["KEDIT_DATA_DIR"])
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                      Path.cwd().parent.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def _read_records(path):
    """The JSON list in `path`; a file that is not one raises a ValueError naming it."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"data: {path} is not a JSON file ({err}); pass a JSON list of records") from err
    if not isinstance(records, list):
        raise ValueError(f"data: {path} holds a JSON {type(records).__name__}, not a list of records; pass a file "
                         "whose top level is a list [{...}, {...}]")
    return records


def _build_all(path, numbered, build):
    """build(record) for each (index in the file, record); a bad record raises naming the file, index and field."""
    cases = []
    for i, r in numbered:
        try:
            cases.append(build(r))
        except KeyError as err:
            raise ValueError(f"data: {path} record {i} has no field {err}; every record needs the fields of its "
                             "format (see the loader's docstring)") from err
        except (TypeError, AttributeError) as err:
            raise ValueError(f"data: {path} record {i} is malformed ({err}); expected an object with string "
                             "fields") from err
        except EditError as err:
            raise EditError(f"data: {path} record {i}: {err}") from err
    return cases


def _probes(items):
    return [Probe(p["prompt"], p["answer"]) for p in items or []]


def textbook_table_5_2():
    """Table 5.2 of the textbook (§5.2.3): eight methods rated on five properties, as data (chapter 9)."""
    return json.loads((_PACKAGE_DATA / "textbook_table_5_2.json").read_text(encoding="utf-8"))


def load_lecture(kind=None):
    """The course's own edit cases (lecture and textbook examples, EN with ZH alongside), as EditCase objects."""
    raw = json.loads((_PACKAGE_DATA / "lecture_cases.json").read_text(encoding="utf-8"))
    cases = []
    for r in raw:
        if kind is not None and r.get("kind") != kind:
            continue
        req = EditRequest(r["prompt"], r["subject"], r["target_new"], r.get("target_true"))
        cases.append(EditCase(req, _probes(r.get("paraphrase")), _probes(r.get("reverse")),
                              _probes(r.get("portability")), _probes(r.get("locality")),
                              {"id": r["id"], "source": r.get("source"), "kind": r.get("kind"), "zh": r.get("zh")}))
    return cases


def lecture_case(case_id):
    """One lecture case by id, e.g. 'space-needle-taipei'."""
    for case in load_lecture():
        if case.meta["id"] == case_id:
            return case
    ids = [c.meta["id"] for c in load_lecture()]
    raise KeyError(f"case_id: no lecture case {case_id!r}; available ids: {ids}")


def downloads_allowed():
    """False when KEDIT_OFFLINE=1 (or Hugging Face's HF_HUB_OFFLINE=1): loaders then never touch the network."""
    return not any(os.environ.get(v, "0") not in ("", "0") for v in ("KEDIT_OFFLINE", "HF_HUB_OFFLINE"))


def _download(name, dest):
    url = SOURCES[name]
    if not downloads_allowed():
        raise FileNotFoundError(
            f"data_dir: no local copy of {name} and downloads are off (KEDIT_OFFLINE=1). Set KEDIT_DATA_DIR to a "
            "directory with counterfact/{train,val}.json and zsre/sample.json (EasyEdit/MEND formats), or use the "
            "shipped course facts: ke.load_cases('course')")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            dest.write_bytes(response.read())
    except OSError as err:
        raise FileNotFoundError(
            f"data_dir: no local copy of {name} and downloading {url} failed ({err}). Offline, set "
            "KEDIT_DATA_DIR to a directory with counterfact/{train,val}.json and zsre/sample.json "
            "(EasyEdit/MEND formats), or pass data_dir=...") from err
    return dest


def _locate(name, filename, data_dir_arg):
    root = Path(data_dir_arg) if data_dir_arg is not None else data_dir()
    if root is not None and (root / name / filename).exists():
        return root / name / filename, "local"
    if data_dir_arg is not None:
        raise FileNotFoundError(f"data_dir: {Path(data_dir_arg) / name / filename} does not exist; point data_dir "
                                f"at a folder containing {name}/{filename}")
    from .models import cache_dir
    cached = cache_dir() / "data" / f"{name}_original.json"
    return (cached if cached.exists() else _download(name, cached)), "original"


def load_course_facts(split="val", n=None, seed=None):
    """The course facts: CounterFact-shaped edits written for the course, shipped (chapters' default data)."""
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    raw = json.loads((_PACKAGE_DATA / "course_facts_en.json").read_text(encoding="utf-8"))
    cases = []
    for r in _sample([r for r in raw if r["split"] == split], n, seed):
        req = EditRequest(r["prompt"], r["subject"], r["target_new"], r["target_true"])
        cases.append(EditCase(req, paraphrase=[Probe(p, r["target_new"]) for p in r["paraphrase"]],
                              locality=[Probe(p, r["target_true"]) for p in r["neighbourhood"]],
                              meta={"id": r["id"], "source": "course", "relation": r["relation"]}))
    return cases


def course_fact(case_id):
    """One course fact by id, e.g. 'maker-xbox' (the ids are listed in kedit_lite/data/course_facts_en.json)."""
    for split in ("val", "train"):
        for case in load_course_facts(split):
            if case.meta["id"] == case_id:
                return case
    raise KeyError(f"case_id: no course fact {case_id!r}; see kedit_lite/data/course_facts_en.json for the ids")


def _sample(records, n, seed):
    if n is not None:
        n = checks.integer("n", n, 1, hint="pass a positive number of records, or None for all")
    if n is None or n >= len(records):
        return records
    return random.Random(seed).sample(records, n) if seed is not None else records[:n]


def _from_original_counterfact(r):
    rw = r["requested_rewrite"]
    return {"case_id": r["case_id"], "prompt": rw["prompt"].format(rw["subject"]), "subject": rw["subject"],
            "target_new": rw["target_new"]["str"], "ground_truth": rw["target_true"]["str"],
            "rephrase_prompt": r["paraphrase_prompts"][0], "locality_prompt": r["neighborhood_prompts"][0],
            "locality_ground_truth": rw["target_true"]["str"]}


def load_counterfact(split="val", n=None, seed=None, data_dir=None):
    """CounterFact edit cases (EasyEdit split format: prompt, subject, target_new, ground_truth, rephrase, locality)."""
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    path, origin = _locate("counterfact", f"{split}.json", data_dir)
    numbered = list(enumerate(_read_records(path)))
    if origin == "original":  # the original file is one list; make a deterministic 10% val split
        numbered = [(i, r) for i, r in numbered if (i % 10 == 0) == (split == "val")]
    convert = _from_original_counterfact if origin == "original" else (lambda r: r)
    return _build_all(path, _sample(numbered, n, seed), lambda r: _counterfact_case(convert(r)))


def _counterfact_case(r):
    req = EditRequest(r["prompt"], r["subject"], r["target_new"], r.get("ground_truth"))
    return EditCase(req, paraphrase=[Probe(r["rephrase_prompt"], r["target_new"])],
                    locality=[Probe(r["locality_prompt"], r["locality_ground_truth"])],
                    meta={"id": r.get("case_id"), "source": "counterfact"})


def counterfact_subjects(split="train", n=500, data_dir=None):
    """The distinct subjects of the first `n` CounterFact records of `split` (MEMIT's other_subjects, chapter 5)."""
    return subjects(load_counterfact(split, n=n, data_dir=data_dir))


def subjects(cases):
    """The distinct subjects of some edit cases, in order."""
    return list(dict.fromkeys(c.request.subject for c in cases))


def load_zsre(n=None, seed=None, data_dir=None):
    """zsRE question-answering edits (MEND format: src -> alt, rephrase, loc/loc_ans)."""
    path, _ = _locate("zsre", "sample.json", data_dir)
    cases = _build_all(path, _sample(list(enumerate(_read_records(path))), n, seed), _zsre_case)
    for k, case in enumerate(cases):  # the id is the position among the loaded cases
        case.meta["id"] = k
    return cases


def _zsre_case(r):
    prompt = r["src"] if r["subject"] in r["src"] else f"{r['subject']}: {r['src']}"
    req = EditRequest(prompt, r["subject"], r["alt"], (r.get("answers") or [None])[0])
    loc_q, _, _ = r["loc"].partition("?")
    return EditCase(req, paraphrase=[Probe(r["rephrase"], r["alt"])],
                    locality=[Probe(loc_q.strip() + "?", r["loc_ans"])], meta={"id": None, "source": "zsre"})


def load_cases(name, split="val", n=None, seed=None, data_dir=None):
    """Dispatch by dataset name: 'lecture', 'course' (the shipped course facts), 'counterfact' or 'zsre'."""
    if name == "lecture":
        cases = load_lecture()
        if n is not None and checks.is_integer(n) and n > len(cases):  # the other datasets cap n (chapters rely on it)
            raise ValueError(f"n: asked for {n} lecture cases, but there are {len(cases)}; pass n <= {len(cases)}, "
                             "or n=None for all of them")
        return _sample(cases, n, seed)
    if name == "course":
        return load_course_facts(split, n, seed)
    if name == "counterfact":
        return load_counterfact(split, n, seed, data_dir)
    if name == "zsre":
        return load_zsre(n, seed, data_dir)
    raise ValueError(f"data: unknown dataset {name!r}; use 'lecture', 'course', 'counterfact' or 'zsre'")
