"""Do the verdicts depend on the floating-point kernel? Run ``deqref reproduce`` once per OpenBLAS
kernel and compare the claims.json files.

    python benchmarks/kernels.py [--kernels Haswell Sandybridge] [--out DIR] [-- reproduce options]

Each run is a separate process with ``OPENBLAS_CORETYPE`` set (OpenBLAS picks its kernel at load
time); the two kernels round differently in the last bit (Sandybridge has no FMA). The runs are
sequential, so that their timings are comparable. Writes DIR/<kernel>/ (the figures and JSON)
and DIR/kernels.json: per claim the two verdicts and the largest relative difference of its
numbers (measured and interval), and the counts. Exit status 1 if any verdict differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def numbers(row: dict) -> list:
    vals = row["measured"] if isinstance(row["measured"], list) else [row["measured"]]
    vals = vals + (row["interval"] or [])
    return [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]


def rel_diff(a: list, b: list) -> float | None:
    if len(a) != len(b) or not a:
        return None
    return max(abs(x - y) / max(abs(x), abs(y), 1e-300) for x, y in zip(a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", nargs=2, default=["Haswell", "Sandybridge"])
    p.add_argument("--out", type=Path, default=Path("kernels-out"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to deqref reproduce (after --)")
    a = p.parse_args(argv)
    extra = [x for x in a.rest if x != "--"]
    docs, wall = {}, {}
    for kernel in a.kernels:
        out = a.out / kernel
        env = dict(os.environ, OPENBLAS_CORETYPE=kernel)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-c", "import sys; from deqref.cli import main; sys.exit(main(sys.argv[1:]))",
               "reproduce", "--out", str(out), *extra]
        subprocess.run(cmd, env=env, check=True)
        wall[kernel] = time.perf_counter() - t0
        docs[kernel] = json.loads((out / "claims.json").read_text())
    k1, k2 = a.kernels
    rows = []
    for r1, r2 in zip(docs[k1]["claims"], docs[k2]["claims"]):
        if r1["id"] != r2["id"]:
            raise SystemExit(f"the two runs hold different claims: {r1['id']} / {r2['id']}")
        rows.append({"id": r1["id"], k1: r1["verdict"], k2: r2["verdict"],
                     "same_verdict": r1["verdict"] == r2["verdict"],
                     "max_rel_diff": rel_diff(numbers(r1), numbers(r2))})
    same = sum(r["same_verdict"] for r in rows)
    result = {"kernels": a.kernels, "reproduce_options": extra, "wall_s": wall,
              "kernels_seen": {k: docs[k]["setting"].get("kernels") for k in a.kernels},
              "same_verdicts": same, "claims": len(rows), "counts": {k: docs[k]["counts"] for k in a.kernels},
              "rows": rows}
    (a.out / "kernels.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        d = "—" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        print(f"{r['id']:38s} {r[k1]:15s} {r[k2]:15s} {d:>8s}")
    print(f"{same} of {len(rows)} verdicts agree between {k1} and {k2}; wall {wall}")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
