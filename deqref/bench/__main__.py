"""``python -m deqref.bench [--quick] [--only fair] [--out DIR]``: the benchmarks without the
``deqref`` CLI."""
import argparse
import sys
from pathlib import Path

from . import main

ap = argparse.ArgumentParser(prog="python -m deqref.bench")
ap.add_argument("--quick", action="store_true")
ap.add_argument("--only", choices=("fair",), help="run only this section")
ap.add_argument("--out", default="benchmarks/results")
a = ap.parse_args()
sys.exit(main(Path(a.out), a.quick, a.only))
