"""The README's quick start runs as written and prints what its comments say.

The block is taken from README.md itself, so a change of the API or of the numbers that leaves the
README behind fails here. The cosines are printed to 4 decimals: rounding-level changes of the
estimators (~1e-15) cannot move them, a wrong estimator or layout does.
"""
import contextlib
import io
import re
from pathlib import Path

from deqref.backend import use_backend

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_and_prints_its_comments():
    code = quick_start()
    out = io.StringIO()
    with use_backend("numpy"), contextlib.redirect_stdout(out):   # the README's default backend
        exec(compile(code, "README.md quick start", "exec"), {})
    printed = out.getvalue().splitlines()
    # every "# cos(...) = v" comment is a line the block must print, to the digit
    promised = re.findall(r"#\s*(cos\(\w+, exact\) = [0-9.]+)", code)
    assert len(promised) == 2
    for line in promised:
        assert line in printed, f"README promises {line!r}; the block printed {printed}"
    assert printed[0].startswith("broyden_lowrank: 32/32 converged")
    assert printed[-1] == "True ()"


def test_claims_table_is_the_committed_claims_json():
    """The README's claims table is generated from figures/claims.json (and figures/full/ for
    the rows only ``--full`` measures): a hand edit of either side fails here. Every committed
    row's verdict is its rule's."""
    import json

    from deqref import claims as C
    figures = README.parent / "figures"
    default = json.loads((figures / "claims.json").read_text(encoding="utf-8"))
    full_path = figures / "full" / "claims.json"
    full = json.loads(full_path.read_text(encoding="utf-8")) if full_path.exists() else None
    for row in default["claims"] + (full or {}).get("claims", []):
        C.check_row(row)
    text = README.read_text(encoding="utf-8")
    table = text.split(C.BEGIN, 1)[1].split(C.END, 1)[0].strip()
    assert table == C.table(C.merged_rows(default, full))
