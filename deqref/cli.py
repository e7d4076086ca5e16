"""The ``deqref`` command: ``deqref list`` and ``deqref reproduce [NAME ...]``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from .experiments import EXPERIMENTS
    p = argparse.ArgumentParser(prog="deqref", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="name the experiments")
    rp = sub.add_parser("reproduce", help="run experiments, write figures and data, print a summary")
    rp.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (default: all)")
    rp.add_argument("--out", default="figures", help="output folder (default: figures/)")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name, mod in EXPERIMENTS.items():
            print(f"{name:20s} {(mod.__doc__ or '').strip().splitlines()[0]}")
        return 0
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        print(f"deqref: unknown experiment(s) {unknown}; valid: {sorted(EXPERIMENTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    for name in args.names or list(EXPERIMENTS):
        t0 = time.perf_counter()
        data = EXPERIMENTS[name].run(out, seed=args.seed, quick=args.quick)
        print(EXPERIMENTS[name].summary(data))
        print(f"  [{name}: {time.perf_counter() - t0:.1f} s, written to {out}/]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
