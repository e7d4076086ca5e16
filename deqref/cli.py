"""The ``deqref`` command.

    deqref list                                   name the experiments
    deqref reproduce [NAME ...] [--out DIR] [--seed N] [--quick | --full]
    deqref golden --out DIR                       write golden reference files (npz)
    deqref crosscheck FILE.npz [--tol T]          check another implementation's gradients
    deqref bench [--quick] [--out DIR]            run the benchmarks
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _kernels_line() -> str:
    """Which floating-point kernels made these numbers. The trained experiments depend on them in
    the last bit, and chaotically from there (README, "How far the trained numbers can be trusted")."""
    from .experiments.machine import numerics
    rec = numerics()
    return (f"floating-point kernels: BLAS {rec['blas_kernel']}, NumPy SIMD {rec['numpy_simd']}. "
            f"The committed figures used OpenBLAS's SkylakeX kernel and NumPy's AVX-512 loops; "
            f"with others the trained experiments' numbers differ (see the README).")


def _reproduce(args) -> int:
    from .experiments import EXPERIMENTS
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        print(f"deqref: unknown experiment(s) {unknown}; valid: {sorted(EXPERIMENTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    mode = "quick" if args.quick else "full" if args.full else "default"
    t_all = time.perf_counter()
    for name in args.names or list(EXPERIMENTS):
        t0 = time.perf_counter()
        data = EXPERIMENTS[name].run(out, seed=args.seed, mode=mode)
        print(EXPERIMENTS[name].summary(data))
        print(f"  [{name}: {time.perf_counter() - t0:.1f} s, written to {out}/]\n")
    print(f"deqref reproduce: done in {time.perf_counter() - t_all:.1f} s")
    print(_kernels_line())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="deqref", description="deqref: how DEQs are trained, "
                                "the exact implicit gradient and its cheaper estimates")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="name the experiments")
    rp = sub.add_parser("reproduce", help="run experiments, write figures and data, print a summary")
    rp.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (default: all)")
    rp.add_argument("--out", default="figures", help="output folder (default: figures/)")
    rp.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    size = rp.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    size.add_argument("--full", action="store_true", help="the papers' settings where feasible")
    gp = sub.add_parser("golden", help="write golden reference files for other frameworks")
    gp.add_argument("--out", required=True, help="output folder")
    cp = sub.add_parser("crosscheck", help="check another implementation's gradients in an npz file")
    cp.add_argument("file", help="an npz file in the golden format (see README)")
    cp.add_argument("--tol", type=float, default=1e-8, help="max relative error (default 1e-8)")
    bp = sub.add_parser("bench", help="run the benchmarks, write JSON and a Markdown table")
    bp.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    bp.add_argument("--out", default="benchmarks/results", help="output folder")
    args = p.parse_args(argv)

    if args.cmd == "list":
        from .experiments import EXPERIMENTS
        for name, mod in EXPERIMENTS.items():
            print(f"{name:22s} {(mod.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.cmd == "reproduce":
        return _reproduce(args)
    if args.cmd == "golden":
        from .crosscheck import write_golden
        for path in write_golden(Path(args.out)):
            print(path)
        return 0
    if args.cmd == "crosscheck":
        from .crosscheck import crosscheck_file
        return crosscheck_file(Path(args.file), tol=args.tol)
    if args.cmd == "bench":
        from .bench import main as bench_main
        return bench_main(out=Path(args.out), quick=args.quick)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
