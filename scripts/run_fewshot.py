#!/usr/bin/env python
"""Few-shot evaluation from a checkout: the same as ``simret fewshot`` (see ``simret fewshot --help``).

    python scripts/run_fewshot.py ~/data/miniimagenet --img-size 84 --model resnet50 --weights timm \\
        --shot 1,5 --method simpleshot,protonet,logreg --out results.json
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simret.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["fewshot", *sys.argv[1:]])
