"""Meta-train MEND's editor for the default model (chapter 6); same as `python -m kedit_lite.mend train ...`.

    python scripts/train_mend.py --steps 600 --out kedit_lite/checkpoints/mend_smollm2.safetensors
"""
import sys

from kedit_lite.mend import _main

if __name__ == "__main__":
    _main(["train"] + sys.argv[1:])
