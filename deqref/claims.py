"""The claims table: one row per claim of the source documents, its verdict computed by a rule.

A row (``claim(...)``) holds ``id`` (stable, e.g. ``"geng.fig3.upg_beats_npg"``), ``source``
(document and table / figure / equation), ``claim`` (one sentence), ``paper`` (their number or
statement), ``measured`` (deqref's: a number, a list, or None where this mode does not measure
it), ``interval`` ([lo, hi], the 95 % interval where the claim is statistical, else None), ``n``
(the seeds, pairs or samples behind it), ``rule`` (the rule in words), ``rule_spec`` (the same
rule as data) and ``verdict``. The verdict is never written by hand: ``verdict(rule_spec,
measured, interval)`` computes it, and ``check_row`` recomputes it from a stored row.

The rules compare a *span* with thresholds. The span is the 95 % interval where there is one,
else [min, max] of ``measured`` (a single number gives a span of width 0):

- ``above(t)``: reproduced if the span lies above t, not reproduced if it lies below t, else
  (t inside the span) not resolved;
- ``below(t)``: the mirror image;
- ``between(a, b)``: reproduced if the span lies inside (a, b), not reproduced if it lies
  wholly outside, else not resolved.

A minimum effect δ enters as the threshold. "A is better than B" with differences below δ
counted as none is ``above(δ)`` on the interval of A − B: an interval above δ reproduces the
claim, an interval below δ says any advantage is smaller than δ (not reproduced), one that
contains δ cannot decide (the "region of practical equivalence" rule of Kruschke, 2018).
"A is no worse than B" is ``above(−δ)``, "A matches B" is ``between(−δ, δ)``. Anything
missing or not finite (None, NaN) is "not resolved".

Intervals (``mean_interval``, ``ratio_interval``) are Student t intervals from ``scipy.stats``
over independent units — seeds, or pairs of runs that share a seed — never over the steps of
one run, which are correlated.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

VERDICTS = ("reproduced", "not reproduced", "not resolved")
CONFIDENCE = 0.95
FIELDS = ("id", "source", "claim", "paper", "measured", "interval", "n", "rule", "rule_spec", "verdict")


# ---------------------------------------------------------------- rules
def above(t: float) -> dict:
    return {"kind": "above", "threshold": float(t)}


def below(t: float) -> dict:
    return {"kind": "below", "threshold": float(t)}


def between(a: float, b: float) -> dict:
    if not a < b:
        raise ValueError(f"between: need a < b, got a = {a}, b = {b}")
    return {"kind": "between", "lo": float(a), "hi": float(b)}


def _numbers(measured) -> list | None:
    """The finite numbers in ``measured`` (a number or a list of them); None if any is missing."""
    values = measured if isinstance(measured, (list, tuple)) else [measured]
    if not values:
        return None
    out = []
    for v in values:
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        out.append(float(v))
    return out


def span(measured, interval) -> tuple | None:
    """(lo, hi): the interval where given, else the range of ``measured``; None if undefined."""
    if interval is not None:
        iv = _numbers(list(interval))
        if iv is None or len(iv) != 2 or iv[0] > iv[1]:
            return None
        return iv[0], iv[1]
    values = _numbers(measured)
    return None if values is None else (min(values), max(values))


def verdict(rule_spec: dict, measured, interval=None) -> str:
    """The verdict of a rule (``above``, ``below``, ``between``) on measured / interval."""
    s = span(measured, interval)
    if s is None:
        return "not resolved"
    lo, hi = s
    kind = rule_spec["kind"]
    if kind == "above":
        t = rule_spec["threshold"]
        return "reproduced" if lo > t else "not reproduced" if hi < t else "not resolved"
    if kind == "below":
        t = rule_spec["threshold"]
        return "reproduced" if hi < t else "not reproduced" if lo > t else "not resolved"
    if kind == "between":
        a, b = rule_spec["lo"], rule_spec["hi"]
        if a < lo and hi < b:
            return "reproduced"
        return "not reproduced" if hi < a or lo > b else "not resolved"
    raise ValueError(f"rule_spec: unknown kind {kind!r}; valid: above, below, between")


def describe(rule_spec: dict, what: str, statistical: bool) -> str:
    """The rule in words, e.g. "reproduced if the 95 % interval of UPG − NPG lies above 0.5 ..."."""
    of = f"the 95 % interval of {what}" if statistical else what
    kind = rule_spec["kind"]
    if kind == "between":
        a, b = rule_spec["lo"], rule_spec["hi"]
        return (f"reproduced if {of} lies inside ({a:g}, {b:g}); not reproduced if it lies wholly "
                f"outside; else not resolved")
    t = rule_spec["threshold"]
    other = "below" if kind == "above" else "above"
    return f"reproduced if {of} lies {kind} {t:g}; not reproduced if it lies {other} {t:g}; else not resolved"


# ---------------------------------------------------------------- statistics
def mean_interval(values) -> tuple[float | None, list | None]:
    """Mean of independent values and its 95 % Student t interval (None for n < 2 or non-finite
    values; an interval of width 0 where all values are equal)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not np.all(np.isfinite(x)):
        return None, None
    m = float(x.mean())
    if x.size < 2:
        return m, None
    sem = float(stats.sem(x))
    if sem == 0.0:
        return m, [m, m]
    lo, hi = stats.t.interval(CONFIDENCE, x.size - 1, loc=m, scale=sem)
    return m, [float(lo), float(hi)]


def ratio_interval(ratios) -> tuple[float | None, list | None]:
    """Geometric mean of positive ratios (speed-ups) and its 95 % interval, from the t interval
    of their logarithms."""
    r = np.asarray(ratios, dtype=float)
    if r.size == 0 or not np.all(np.isfinite(r)) or np.any(r <= 0):
        return None, None
    m, iv = mean_interval(np.log(r))
    return float(np.exp(m)), (None if iv is None else [float(np.exp(iv[0])), float(np.exp(iv[1]))])


# ---------------------------------------------------------------- rows
def _plain(v):
    """JSON-ready: NumPy scalars and arrays to Python numbers and lists, rounded to 10 digits."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(a) for a in np.asarray(v, dtype=object).tolist()] if isinstance(v, np.ndarray) \
            else [_plain(a) for a in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(f"{float(v):.10g}") if math.isfinite(v) else None
    return v


def claim(id: str, source: str, text: str, paper, measured, rule_spec: dict, *, what: str,
          interval=None, n: int | None = None, unit: str = "", note: str = "", mode: str = "") -> dict:
    """One row of the claims table, its verdict computed from ``measured`` and ``interval``.

    ``what`` names the measured quantity for the rule's wording (e.g. "UPG − NPG, points").
    Numbers are stored to 10 significant digits, and the verdict is computed from the stored
    values, so that a row read back from claims.json gives the same verdict (``check_row``).
    """
    measured, interval = _plain(measured), (None if interval is None else _plain(interval))
    row = {"id": id, "source": source, "claim": text, "paper": paper, "measured": measured,
           "interval": interval, "n": n, "unit": unit,
           "rule": describe(rule_spec, what, interval is not None), "rule_spec": rule_spec,
           "verdict": verdict(rule_spec, measured, interval)}
    if note:
        row["note"] = note
    if mode:
        row["mode"] = mode
    return row


def check_row(row: dict) -> None:
    """Raise ValueError if a stored row lacks a field or its verdict is not its rule's."""
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"claims row {row.get('id', '?')!r}: missing field(s) {missing}")
    if row["verdict"] not in VERDICTS:
        raise ValueError(f"claims row {row['id']!r}: verdict {row['verdict']!r} not in {VERDICTS}")
    again = verdict(row["rule_spec"], row["measured"], row["interval"])
    if again != row["verdict"]:
        raise ValueError(f"claims row {row['id']!r}: stored verdict {row['verdict']!r}, its rule gives {again!r}")


def counts(rows: list) -> dict:
    return {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}


def write(path: Path, rows: list, setting: dict, order: tuple = ()) -> dict:
    """Write claims.json: rows of earlier runs of other experiments are kept, this run's replace
    those of the experiments it ran; rows are sorted by their experiment's place in ``order``.
    This run's rows must pass ``check_row`` (ValueError otherwise); an earlier row that does not
    (edited by hand, or from a file that is not a claims file) is dropped with a warning."""
    path = Path(path)
    kept = []
    if path.exists():
        try:
            old = json.loads(path.read_text())["claims"]
        except (ValueError, KeyError, TypeError):
            old = []
        ran = {r.get("experiment") for r in rows}
        kept = [r for r in old if isinstance(r, dict) and r.get("experiment") not in ran]
    for r in rows:
        check_row(r)
    valid = []
    for r in kept:                       # an earlier row whose verdict is not its rule's is dropped
        try:
            check_row(r)
            valid.append(r)
        except (ValueError, KeyError, TypeError) as err:
            warnings.warn(f"{path}: an earlier claims row is dropped: {err}", stacklevel=2)
    rank = {name: i for i, name in enumerate(order)}
    merged = sorted(valid + rows, key=lambda r: rank.get(r.get("experiment"), len(rank)))
    doc = {"claims": merged, "counts": counts(merged), "setting": setting}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    return doc


# ---------------------------------------------------------------- the table
def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        digits = 4                   # more where 4 would round a value like 0.999999998 to 1
        while digits < 12 and abs(v) != 1 and abs(float(f"{v:.{digits}g}")) == 1:
            digits += 1
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        items = [_fmt(a) for a in v]
        return ", ".join(items) if len(items) <= 6 else ", ".join(items[:3] + ["…"] + items[-2:])
    return str(v)


def deqref_cell(row: dict) -> str:
    """What deqref measured, with its interval and n, for the table."""
    unit = f" {row['unit']}" if row.get("unit") else ""
    if row["measured"] is None:
        return "not measured" + (f": {row['note']}" if row.get("note") else "")
    text = _fmt(row["measured"]) + unit
    if row["interval"] is not None:
        text += f" [{_fmt(row['interval'][0])}, {_fmt(row['interval'][1])}]"
    if row.get("n"):
        text += f", n = {row['n']}"
    if row.get("note"):
        text += f" ({row['note']})"
    return text


def table(rows: list) -> str:
    """The Markdown table of claims: id, claim, paper, deqref (95 % interval, n), verdict.

    A Markdown table is one join per row; a table library (tabulate) would add a dependency and
    no clarity."""
    lines = ["| claim | source | paper | deqref [95 % interval] | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['claim']} (`{r['id']}`)", r["source"], _fmt(r["paper"]), deqref_cell(r),
                 f"**{r['verdict']}**" + (f" ({r['mode']})" if r.get("mode") not in (None, "", "default") else "")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    c = counts(rows)
    lines.append("")
    lines.append(f"{len(rows)} claims: {c['reproduced']} reproduced, {c['not reproduced']} not reproduced, "
                 f"{c['not resolved']} not resolved.")
    return "\n".join(lines)



def rows_of(experiment: str, data: dict, mode: str) -> list:
    """The claims of one experiment's record (``deqref.experiments.<name>.claims``), tagged
    with the experiment and the mode; [] for an experiment without claims."""
    from .experiments import EXPERIMENTS
    mod = EXPERIMENTS[experiment]
    rows = mod.claims(data) if hasattr(mod, "claims") else []
    for r in rows:
        r["experiment"], r["mode"] = experiment, mode
    return rows


def text_table(rows: list) -> str:
    """The claims for a terminal: verdict, id, what deqref measured."""
    lines = [f"  {r['verdict']:15s} {r['id']:38s} {deqref_cell(r)}" for r in rows]
    c = counts(rows)
    lines.append(f"  {len(rows)} claims: {c['reproduced']} reproduced, {c['not reproduced']} not "
                 f"reproduced, {c['not resolved']} not resolved")
    return "\n".join(lines)


# ---------------------------------------------------------------- the README's table
BEGIN, END = "<!-- claims table: generated by `python -m deqref.claims`; do not edit -->", "<!-- end of claims table -->"


def merged_rows(default_doc: dict, full_doc: dict | None = None) -> list:
    """The default run's rows, where a row was not measured in that mode (``measured`` is None)
    and the ``--full`` run measured it, the full run's row instead (its verdict says "full")."""
    full = {r["id"]: r for r in (full_doc or {}).get("claims", []) if r["measured"] is not None}
    return [full.get(r["id"], r) if r["measured"] is None else r for r in default_doc["claims"]]


def update_readme(readme: Path, default_json: Path, full_json: Path | None = None) -> bool:
    """Rewrite the table between BEGIN and END in ``readme``; True if it changed."""
    readme = Path(readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no claims table markers ({BEGIN!r} … {END!r})")
    full = json.loads(Path(full_json).read_text()) if full_json and Path(full_json).exists() else None
    rows = merged_rows(json.loads(Path(default_json).read_text()), full)
    head, rest = text.split(BEGIN, 1)
    new = head + BEGIN + "\n" + table(rows) + "\n" + END + rest.split(END, 1)[1]
    readme.write_text(new)
    return new != text


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m deqref.claims",
                                description="Rewrite the README's claims table from claims.json files.")
    p.add_argument("readme", type=Path)
    p.add_argument("claims", type=Path, help="the default run's claims.json (figures/claims.json)")
    p.add_argument("full", type=Path, nargs="?", help="a --full run's claims.json, for rows only it measures")
    a = p.parse_args(argv)
    changed = update_readme(a.readme, a.claims, a.full)
    print(f"{a.readme}: claims table {'rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
