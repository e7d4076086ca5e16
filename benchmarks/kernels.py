"""Do the verdicts depend on the floating-point kernel? Run ``deqref reproduce`` once per kernel
and compare the claims.json files with the first run's.

    python benchmarks/kernels.py [--kernels Haswell Sandybridge Haswell+noavx512] [--out DIR]
                                 [-- reproduce options]

Each run is a separate process with ``OPENBLAS_CORETYPE`` set (OpenBLAS picks its kernel at load
time); the kernels round differently in the last bit (Sandybridge has no FMA). A name ending in
"+noavx512" also switches off NumPy's AVX-512 loops (``NPY_DISABLE_CPU_FEATURES``), as on a CPU
without AVX-512. The runs are sequential, so that their timings are comparable. Writes
DIR/<kernel>/ (the figures and JSON) and DIR/kernels.json: per claim every run's verdict and the
largest relative difference of its numbers (measured and interval) from the first run's, and the
counts. Exit status 1 if any verdict differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


NO_AVX512 = "X86_V4 AVX512_ICL AVX512_SPR"     # NumPy 2.x's AVX-512 dispatch targets


def numbers(row: dict) -> list:
    vals = row["measured"] if isinstance(row["measured"], list) else [row["measured"]]
    vals = vals + (row["interval"] or [])
    return [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]


def rel_diff(a: list, b: list) -> float | None:
    if len(a) != len(b) or not a:
        return None
    return max(abs(x - y) / max(abs(x), abs(y), 1e-300) for x, y in zip(a, b))


def recompute(out: Path) -> dict:
    """claims.json of a finished run in ``out``, recomputed from its experiments' JSON records."""
    from deqref import claims as C
    from deqref.experiments import ORDER
    old = json.loads((out / "claims.json").read_text())
    rows = []
    for name in ORDER:
        if (out / f"{name}.json").exists():
            rows += C.rows_of(name, json.loads((out / f"{name}.json").read_text()), old["setting"]["mode"])
    return {"claims": rows, "counts": C.counts(rows), "setting": old["setting"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", nargs="+", default=["Haswell", "Sandybridge", "Haswell+noavx512"])
    p.add_argument("--out", type=Path, default=Path("kernels-out"))
    p.add_argument("--no-run", action="store_true",
                   help="reuse DIR/<kernel>/, recomputing its claims with the current rules")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to deqref reproduce (after --)")
    a = p.parse_args(argv)
    extra = [x for x in a.rest if x != "--"]
    docs, wall = {}, {}
    for kernel in a.kernels:
        out = a.out / kernel
        env = dict(os.environ, OPENBLAS_CORETYPE=kernel.split("+")[0])
        if kernel.endswith("+noavx512"):
            env["NPY_DISABLE_CPU_FEATURES"] = NO_AVX512
        if a.no_run:
            docs[kernel] = recompute(out)
            wall[kernel] = None
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, "-c", "import sys; from deqref.cli import main; sys.exit(main(sys.argv[1:]))",
               "reproduce", "--out", str(out), *extra]
        subprocess.run(cmd, env=env, check=True)
        wall[kernel] = time.perf_counter() - t0
        docs[kernel] = json.loads((out / "claims.json").read_text())
    first, others = a.kernels[0], a.kernels[1:]
    rows = []
    for i, r1 in enumerate(docs[first]["claims"]):
        row = {"id": r1["id"], first: r1["verdict"]}
        for k in others:
            r2 = docs[k]["claims"][i]
            if r2["id"] != r1["id"]:
                raise SystemExit(f"the runs hold different claims: {r1['id']} / {r2['id']}")
            row[k] = r2["verdict"]
            row[f"max_rel_diff_{k}"] = rel_diff(numbers(r1), numbers(r2))
        row["same_verdict"] = all(row[k] == r1["verdict"] for k in others)
        rows.append(row)
    same = sum(r["same_verdict"] for r in rows)
    result = {"kernels": a.kernels, "reproduce_options": extra, "wall_s": wall,
              "kernels_seen": {k: docs[k]["setting"].get("kernels") for k in a.kernels},
              "same_verdicts": same, "claims": len(rows), "counts": {k: docs[k]["counts"] for k in a.kernels},
              "rows": rows}
    (a.out / "kernels.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        diffs = " ".join("—" if r[f"max_rel_diff_{k}"] is None else f"{r[f'max_rel_diff_{k}']:.1e}"
                         for k in others)
        print(f"{r['id']:38s} " + " ".join(f"{r[k]:15s}" for k in a.kernels) + f" {diffs}")
    print(f"{same} of {len(rows)} claims have the same verdict under {', '.join(a.kernels)}; wall {wall}")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
