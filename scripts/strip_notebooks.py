"""Remove outputs and execution counts from notebooks (they are stored clean; the book build executes them),
and give every cell an id (nbformat 4.5 requires one; new cells written by scripts lack it).

    python scripts/strip_notebooks.py notebooks/*.ipynb
"""
import json
import sys
import uuid

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        cell.setdefault("id", uuid.uuid4().hex[:8])
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)
    nb.get("metadata", {}).pop("widgets", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
