"""The ``deqref`` command.

    deqref list                                   name the experiments
    deqref reproduce [NAME ...] [--out DIR] [--seed N] [--jobs N] [--quick | --full]
    deqref golden --out DIR                       write golden reference files (npz)
    deqref crosscheck FILE.npz [--tol T]          check another implementation's gradients
    deqref bench [--quick] [--only fair] [--out DIR]  run the benchmarks
    deqref --version

Bad input never ends in a Python traceback: a wrong argument, a refused crosscheck file or an
output folder that cannot be written ends in one line on stderr, ``deqref <command>: error:
<what was expected>``, and exit code 2. Arguments are checked before any work starts; while a
command runs only the errors that mean bad input are turned into that line (a refused
crosscheck file, an output path that cannot be written), so a bug in deqref still shows its
traceback.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .checks import check_int, check_real
from .solvers import ConvergenceWarning

COMMANDS = ("list", "reproduce", "golden", "crosscheck", "bench")
SEED_MAX = 2 ** 32 - 1
# errno values that say "this output cannot be written", whether or not the error names a file
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class _UsageError(Exception):
    """A command line argparse refuses; the message is already ``prog: error: ...``."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with its errors raised (one line, exit 2 in ``main``) instead of a
    usage block and ``sys.exit`` from inside the parser."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("deqref")
    except PackageNotFoundError:          # run from a source tree that is not installed
        from . import __version__
        return __version__


def _kernels_line(short: bool = False) -> str:
    """Which floating-point kernels made these numbers: the same seed and the same kernels give
    the same bits; other kernels round differently in the last bit."""
    from .experiments.machine import numerics
    rec = numerics()
    if short:
        return f"BLAS {rec['blas_kernel']}, NumPy SIMD {rec['numpy_simd']}"
    return (f"floating-point kernels: BLAS {rec['blas_kernel']}, NumPy SIMD {rec['numpy_simd']} "
            f"(the same seed and the same kernels give the same bits; the verdicts are meant not to "
            f"depend on the kernels)")


# ------------------------------------------------------------------ argument checks
def _output_dir(option: str, value: str) -> Path:
    """``value`` as a folder deqref can write into: an existing directory or one it creates.
    Raises ``ValueError`` naming the option and why not."""
    out = Path(value)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {str(out)!r}: cannot create the directory "
                         f"({e.strerror or e})") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"{option} {str(out)!r}: cannot write into the directory "
                         f"({e.strerror or e})") from None
    return out


def _unknown_experiments(names, valid) -> str | None:
    """None when every name is an experiment, else one line naming the unknown ones, each with
    the closest valid name (difflib) where there is one, and the valid names otherwise."""
    unknown = [n for n in names if n not in valid]
    if not unknown:
        return None
    close = {n: difflib.get_close_matches(n, valid, n=1) for n in unknown}
    if len(unknown) == 1 and close[unknown[0]]:
        return f"unknown experiment {unknown[0]!r}; did you mean {close[unknown[0]][0]!r}?"
    named = ", ".join(f"{n!r}" + (f" (did you mean {close[n][0]!r}?)" if close[n] else "")
                      for n in unknown)
    return (f"unknown experiment{'s' if len(unknown) > 1 else ''} {named}; "
            f"valid: {', '.join(valid)}")


def _check_args(args) -> None:
    """Every argument of the chosen command, before any work; ``ValueError`` naming it."""
    if args.cmd == "reproduce":
        from .experiments import EXPERIMENTS
        message = _unknown_experiments(args.names, list(EXPERIMENTS))
        if message:
            raise ValueError(message)
        check_int("--seed", args.seed, minimum=0, maximum=SEED_MAX)
        if args.jobs is None:
            from .experiments.parallel import available_cores
            args.jobs = available_cores()
        check_int("--jobs", args.jobs, minimum=1)
    if args.cmd == "crosscheck":
        check_real("--tol", args.tol, lo=0, lo_open=True)
    if args.cmd in ("reproduce", "golden", "bench"):        # last: it creates the folder
        args.out = _output_dir("--out", args.out)


# ------------------------------------------------------------------ commands
def _list(args) -> int:
    from .experiments import EXPERIMENTS
    for name, mod in EXPERIMENTS.items():
        print(f"{name:22s} {(mod.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _convergence_note(name, caught) -> None:
    """Say, in one line per experiment, that some of its solves did not converge (the papers'
    settings stop the forward at a set number of iterations, and some runs are inexact on purpose):
    the experiment's ConvergenceWarnings are summed up here instead of printed one by one. Other
    warnings are shown as usual."""
    conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if conv:
        first = str(conv[0].message)
        first = first if len(first) <= 160 else first[:157] + "..."
        print(f"  note: {len(conv)} ConvergenceWarning(s) in {name} (solves stopped at their "
              f"iteration budget or flagged); the first: {first}")


def _reproduce(args) -> int:
    from . import claims as C
    from .experiments import EXPERIMENTS, ORDER, parallel
    out = args.out
    mode = "quick" if args.quick else "full" if args.full else "default"
    names = sorted(set(args.names), key=ORDER.index) if args.names else list(EXPERIMENTS)
    here, in_workers = parallel.split(names, args.jobs)
    rows, t_all, shown = [], time.perf_counter(), iter(range(1, len(names) + 1))

    def report(name, data, caught, seconds, printed=""):
        nonlocal rows
        print(printed + EXPERIMENTS[name].summary(data))
        _convergence_note(name, caught)
        rows += C.rows_of(name, data, mode)
        print(f"  [{name}: {seconds:.1f} s, written to {out}/]\n", flush=True)

    def header(name, note=""):
        doc = (EXPERIMENTS[name].__doc__ or "").strip().splitlines()[0]
        print(f"[{next(shown)}/{len(names)}] {name}{note}: {doc}", flush=True)

    for name in here:                           # one by one; the timed ones alone on the machine
        header(name)
        report(name, *parallel.run_one(name, out, args.seed, mode))
    if in_workers:
        print(f"running {', '.join(in_workers)} in {min(args.jobs, len(in_workers))} worker "
              "processes (no clock enters their claims)\n", flush=True)
    for name, data, printed, caught, seconds in parallel.run_in_workers(
            in_workers, out, args.seed, mode, args.jobs):
        header(name, " (worker)")
        report(name, data, caught, seconds, printed)
    doc = C.write(out / "claims.json", rows, {"seed": args.seed, "mode": mode,
                                              "kernels": _kernels_line(short=True)}, ORDER)
    print(f"claims ({out / 'claims.json'}; this run's experiments: {', '.join(names)}):")
    print(C.text_table(doc["claims"]))
    print(f"deqref reproduce: done in {time.perf_counter() - t_all:.1f} s")
    print(_kernels_line())
    return 0


def _golden(args) -> int:
    from .crosscheck import write_golden
    for path in write_golden(args.out):
        print(path)
    return 0


def _crosscheck(args) -> int:
    from .crosscheck import crosscheck_file
    return crosscheck_file(Path(args.file), tol=args.tol)


def _bench(args) -> int:
    from .bench import main as bench_main
    return bench_main(out=args.out, quick=args.quick, only=args.only)


RUN = {"list": _list, "reproduce": _reproduce, "golden": _golden, "crosscheck": _crosscheck,
       "bench": _bench}


def _parser() -> _Parser:
    p = _Parser(prog="deqref", description="deqref: how DEQs are trained, "
                "the exact implicit gradient and its cheaper estimates")
    p.add_argument("-V", "--version", action="version", version=f"deqref {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="{" + ",".join(COMMANDS) + "}")
    sub.add_parser("list", help="name the experiments")
    rp = sub.add_parser(
        "reproduce", help="run experiments, write figures and data, print a summary",
        description="Run the experiments (default: all eleven, in the order of `deqref list`). Each writes "
                    "its figure (PNG) and its record (JSON) into --out; claims.json gets one row per claim "
                    "of the source documents with its computed verdict. Prints each experiment's summary, "
                    "a progress bar per training run on a terminal (not in worker processes), and the "
                    "verdict table. The experiments "
                    "whose claims rest on wall-clock times run first, one by one and alone; the others then "
                    "run in --jobs worker processes at once (the same numbers as one by one). Duration: "
                    "about 2 minutes on a 2-core machine in the default mode (up to 5 on a slow one), "
                    "seconds with --quick; --full runs the papers' settings where feasible and takes far "
                    "longer (jfb_batch alone, the JFB report's 3,000 epochs: about 5 minutes).")
    rp.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (default: all)")
    rp.add_argument("--out", default="figures", help="output folder, created if needed (default: figures/)")
    rp.add_argument("--seed", type=int, default=0,
                    help=f"base seed, an integer in [0, {SEED_MAX}] (default 0)")
    rp.add_argument("--jobs", type=int, default=None,
                    help="processes for the experiments whose claims no clock enters, an integer >= 1 "
                         "(default: the CPUs available); the timed ones run alone first")
    size = rp.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    size.add_argument("--full", action="store_true", help="the papers' settings where feasible")
    gp = sub.add_parser(
        "golden", help="write golden reference files for other frameworks",
        description="Write the golden files (tanh, relu and softplus layers; float64 .npz, format 2, "
                    "every convention inside the file) into --out, in about a second. "
                    "See docs/crosscheck.md.")
    gp.add_argument("--out", required=True, help="output folder (created if needed)")
    cp = sub.add_parser(
        "crosscheck", help="check another implementation's gradients in an npz file",
        description="Recompute the gradients in FILE with deqref and compare them, in about a second. "
                    "Exit 0: all agree within --tol; 1: some relative error above --tol (each named); "
                    "2: no verdict (a file deqref refuses, named in one line). Reads golden formats 1 "
                    "and 2; docs/crosscheck.md describes them and how to choose --tol.")
    cp.add_argument("file", help="an .npz file in the golden format (docs/crosscheck.md)")
    cp.add_argument("--tol", type=float, default=1e-8,
                    help="max relative error, a finite number > 0 (default 1e-8)")
    bp = sub.add_parser(
        "bench", help="run the benchmarks, write JSON and a Markdown table",
        description="Run the benchmarks (deqref/bench/): each estimator's cost against implicit "
                    "differentiation, deqref against the bare array calls, and against TorchDEQ when "
                    "torch and torchdeq import; section 6 (fair) against TorchDEQ and the machine's limit "
                    "with fixed threads. Writes bench.json, bench.md, fair.json and fair.md into --out and "
                    "prints the tables. About 5 minutes on an idle 2-core machine; --quick about 10 s.")
    bp.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    bp.add_argument("--only", choices=("fair",), default=None,
                    help="run only this section: fair = deqref against TorchDEQ and the machine's "
                         "limit, writes fair.json and fair.md (about 3 minutes; --quick seconds)")
    bp.add_argument("--out", default="benchmarks/results", help="output folder (default: benchmarks/results/)")
    return p


def _fail(cmd: str | None, message) -> int:
    """The one line for bad input, on stderr; exit code 2."""
    prefix = "deqref" + (f" {cmd}" if cmd else "")
    print(f"{prefix}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _is_output_error(err: OSError, out: Path | None) -> bool:
    """Whether ``err`` is about writing the command's output folder (bad input, one line) rather
    than about something else (a bug: its traceback stays)."""
    if out is None:
        return False
    if err.filename is None:
        return err.errno in _OUTPUT_ERRNOS
    try:
        Path(err.filename).resolve().relative_to(Path(out).resolve())
    except ValueError:
        return False
    return True


def main(argv=None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return 2
    except SystemExit as e:              # --help and --version print, then exit 0
        return e.code if isinstance(e.code, int) else 0
    if args.cmd is None:
        return _fail(None, f"no command given; expected one of {', '.join(COMMANDS)} "
                           f"(deqref --help says what each does)")
    try:
        _check_args(args)
    except (ValueError, TypeError) as e:
        return _fail(args.cmd, e)
    from .crosscheck import CrosscheckError
    try:
        return RUN[args.cmd](args)
    except CrosscheckError as e:
        return _fail(args.cmd, e)
    except OSError as e:
        if not _is_output_error(e, getattr(args, "out", None)):
            raise
        where = f"{e.filename}: " if e.filename else f"{args.out}: "
        return _fail(args.cmd, f"cannot write the output: {where}{e.strerror or e}")
    except KeyboardInterrupt:
        print(f"deqref {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
