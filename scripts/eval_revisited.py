#!/usr/bin/env python
"""Revisited Oxford/Paris evaluation, as a script (a thin wrapper over ``simret eval``).

    python scripts/eval_revisited.py roxford5k --data-root ~/data/revisitop --model resnet50 --gamma 2.0 \
        --weights simpool:resnet50-dino-simpool-ep100 --scales 1,0.707,0.5 --out roxford5k.json

Every option of ``simret eval --help`` works here. To reproduce the usual table, run it for both datasets,
with and without ``--distractors r1m``, and with ``--qe 2`` for query expansion.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simret.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]])
