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
