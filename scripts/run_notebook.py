"""Execute a notebook and save it with outputs elsewhere (for reading results; the repo stores notebooks clean).

    python scripts/run_notebook.py notebooks/05_rome_memit.ipynb /tmp/05_executed.ipynb
"""
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

source, target = Path(sys.argv[1]), Path(sys.argv[2])
nb = nbformat.read(source, as_version=4)
NotebookClient(nb, timeout=1800, kernel_name="python3", allow_errors=True,
               resources={"metadata": {"path": str(source.parent)}}).execute()
nbformat.write(nb, target)
errors = [c for c in nb.cells if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.outputs)]
print(f"{source}: {len(errors)} cell(s) raised")
