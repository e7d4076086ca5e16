"""The deqref command: list, reproduce (quick), and errors for bad names."""
import json

from deqref.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    assert "solver_traces" in capsys.readouterr().out


def test_reproduce_quick_writes_files(tmp_path, capsys):
    assert main(["reproduce", "solver_traces", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "solver_traces.json").read_text())
    assert all(r["converged"] == r["n"] for r in data["rows"])
    assert (tmp_path / "solver_traces.png").stat().st_size > 1000
    out = capsys.readouterr().out          # it ends by naming the kernels the numbers came from
    assert out.splitlines()[-1].startswith("floating-point kernels: BLAS ")


def test_unknown_experiment_is_an_error(capsys):
    assert main(["reproduce", "figure99"]) == 2
    assert "unknown experiment 'figure99'; valid: solver_traces" in capsys.readouterr().err
