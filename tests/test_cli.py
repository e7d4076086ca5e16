"""The deqref command: list, reproduce (quick), and errors for bad names."""
import json

import pytest

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


def test_help_says_outputs_duration_and_defaults(capsys):
    """Every subcommand's --help says what it writes or answers, how long it takes, and the
    default of every option that has one."""
    import re
    from deqref.cli import COMMANDS
    for cmd in COMMANDS:
        if cmd == "list":
            continue
        try:
            code = main([cmd, "--help"])
        except SystemExit as exit_:                  # argparse's own exit, where main lets it through
            code = exit_.code
        assert code in (0, None)
        text = " ".join(capsys.readouterr().out.split())
        assert re.search(r"\b(writes?|exit 0)\b", text, re.I), (cmd, text)            # outputs
        assert re.search(r"\b(seconds?|minutes?|\d+ s)\b", text), (cmd, text)         # duration
        for option in re.findall(r"(--\w+) (?:OUT|SEED|TOL)\b", text.split("options:")[-1]):
            line = text.split("options:")[-1].split(option, 2)[-1][:160]
            assert "default" in line or "required" in line or "created if needed" in line, (cmd, option)


CLOCKS = ("wall_s", "time_epoch", "loadavg_1_5_15min", "loadavg_after")   # what a record notes of the run


def _without_clocks(record):
    """A record with its wall times and the machine's load left out (the rest must be equal)."""
    if isinstance(record, dict):
        return {k: _without_clocks(v) for k, v in record.items() if k not in CLOCKS}
    if isinstance(record, list):
        return [_without_clocks(v) for v in record]
    return record


def test_reproduce_in_workers_gives_the_same_records(tmp_path, capsys):
    """--jobs 2 runs the experiments whose claims no clock enters in worker processes and the
    timed ones here, alone and first; their records are the same, bit for bit, as with --jobs 1
    (everything here): byte for byte, or (gdeq_precision) all but the wall times and load it notes."""
    names = ["solver_traces", "static_precision", "theorem1", "gdeq_precision", "complexity"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["reproduce", *names, "--quick", "--jobs", "1", "--out", str(one)]) == 0
    assert "(worker)" not in capsys.readouterr().out
    assert main(["reproduce", *names, "--quick", "--jobs", "2", "--out", str(two)]) == 0
    out = capsys.readouterr().out
    assert "[1/5] complexity: " in out                          # timed: here, before the others
    for name in names[:4]:
        assert f"] {name} (worker): " in out
        a, b = ((d / f"{name}.json").read_bytes() for d in (one, two))
        if name == "gdeq_precision":
            a, b = (_without_clocks(json.loads(r)) for r in (a, b))
            assert "wall_s" in json.loads((one / f"{name}.json").read_text())["setting"]
        assert a == b, name
    rows = [json.loads((d / "claims.json").read_text())["claims"] for d in (one, two)]
    untimed = [[r for r in rs if r["experiment"] != "complexity"] for rs in rows]
    assert untimed[0] == untimed[1] and len(untimed[0]) > 0
    assert [r["id"] for r in rows[0]] == [r["id"] for r in rows[1]]     # in the same order


def test_an_error_in_a_worker_is_raised_here(tmp_path):
    """An experiment that fails in a worker process (here: its output folder is a file) raises
    the same error in the caller, and nothing more is started."""
    from deqref.experiments import parallel
    out = tmp_path / "a_file"
    out.write_text("not a folder")
    with pytest.raises(OSError, match="a_file"):
        list(parallel.run_in_workers(["solver_traces", "theorem1", "static_precision"], out, 0,
                                     "quick", 2))
