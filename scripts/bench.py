#!/usr/bin/env python
"""Run simret's benchmarks and write BENCHMARKS.md.

    python scripts/bench.py                  # every section
    python scripts/bench.py encoder search   # some sections
    python scripts/bench.py --quick          # smaller sizes, for a smoke run (not for the record)
    python scripts/bench.py --assemble       # only rebuild BENCHMARKS.md from benchmarks/*.json
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simret.bench import SECTIONS, load_sections, render_markdown, save_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help="sections to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes; results are not written")
    parser.add_argument("--assemble", action="store_true", help="only rebuild BENCHMARKS.md from benchmarks/*.json")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks", help="where section JSON lives")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if not args.assemble:
        for name in args.sections or SECTIONS:
            try:
                module = importlib.import_module(f"simret.bench.{name}")
            except ModuleNotFoundError:
                print(f"[bench] section {name}: not implemented yet, skipped", file=sys.stderr)
                continue
            print(f"[bench] {module.TITLE} …", file=sys.stderr)
            section = module.run(quick=args.quick)
            for row in section.rows:
                ratio = f"  ratio {row.ratio:.3g}x" if row.ratio is not None else ""
                met = "" if row.met is None else ("  target met" if row.met else "  TARGET MISSED")
                print(f"  {row.what}: {row.value:.4g} {row.unit}{ratio}{met}", file=sys.stderr)
            if not args.quick:
                save_section(section, args.results)
    if not args.quick:
        args.out.write_text(render_markdown(load_sections(args.results)))
        print(f"[bench] wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
