"""The deqref command on bad input: exit code 2 and one line on stderr, ``deqref <command>:
error: ...``, naming the argument and what was expected — never a Python traceback. Errors
that do not mean bad input (a bug) still surface."""
import errno
import os
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

import deqref
import deqref.cli as cli
from deqref.cli import main
from deqref.crosscheck import write_golden


@pytest.fixture(scope="module")
def golden_file(tmp_path_factory):
    return write_golden(tmp_path_factory.mktemp("golden"))[0]


def one_line_error(capsys, argv, prefix, *fragments):
    """main(argv) returns 2, prints nothing on stdout and one line on stderr."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prefix}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    assert out == "" and "Traceback" not in err
    return lines[0]


def test_no_command(capsys):
    one_line_error(capsys, [], "deqref", "no command given", "list, reproduce, golden, crosscheck, bench")


def test_unknown_command(capsys):
    one_line_error(capsys, ["lst"], "deqref", "invalid choice: 'lst'")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(capsys, flag):
    """The installed distribution's version; a checkout on PYTHONPATH that is not installed (as on
    a GPU machine without pip access) reports ``deqref.__version__``, which must be the same."""
    try:
        expected = version("deqref")
        assert deqref.__version__ == expected, "deqref.__version__ differs from pyproject.toml's"
    except PackageNotFoundError:
        expected = deqref.__version__
    assert main([flag]) == 0
    assert capsys.readouterr().out == f"deqref {expected}\n"


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "crosscheck" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["--seed", "-1"], "--seed must be an integer >= 0 and <= 4294967295, got -1"),
    (["--seed", str(2 ** 32)], "--seed must be an integer >= 0 and <= 4294967295, got 4294967296"),
    (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["--quick", "--full"], "argument --full: not allowed with argument --quick"),
    (["--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
    (["--jobs", "two"], "argument --jobs: invalid int value: 'two'"),
    (["solver_trace"], "unknown experiment 'solver_trace'; did you mean 'solver_traces'?"),
    (["theorem"], "unknown experiment 'theorem'; did you mean 'theorem1'?"),
    (["figure99"], "unknown experiment 'figure99'; valid: solver_traces, static_precision"),
    (["figure99", "jfb_bach"], "unknown experiments 'figure99', 'jfb_bach' (did you mean 'jfb_batch'?)"),
])
def test_reproduce_bad_arguments(capsys, tmp_path, argv, fragment):
    out = tmp_path / "out"
    one_line_error(capsys, ["reproduce", *argv, "--out", str(out)], "deqref reproduce", fragment)
    assert not out.exists()                     # refused before any work


def output_dirs(tmp_path):
    """Output paths deqref cannot write: an existing file, a path under a file, and a
    directory without write permission (as root, /sys, which even root cannot write)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [(str(a_file), "exists and is not a directory"),
             (str(a_file / "sub"), "cannot create the directory (Not a directory)")]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        cases.append((str(locked), "cannot write into the directory (Permission denied)"))
    elif unwritable("/sys"):
        cases.append(("/sys", "cannot write into the directory"))
    return cases


def unwritable(folder) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("cmd", ["golden", "reproduce", "bench"])
def test_unwritable_output(capsys, tmp_path, cmd):
    extra = ["solver_traces", "--quick"] if cmd == "reproduce" else ["--quick"] if cmd == "bench" else []
    for out, fragment in output_dirs(tmp_path):
        one_line_error(capsys, [cmd, *extra, "--out", out], f"deqref {cmd}", f"--out '{out}'", fragment)


def test_golden_creates_its_folder(capsys, tmp_path):
    out = tmp_path / "new" / "golden"
    assert main(["golden", "--out", str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3 and len(list(out.iterdir())) == 3


@pytest.mark.parametrize("tol", ["nan", "inf", "-inf", "0", "-1e-8"])
def test_crosscheck_bad_tol(capsys, golden_file, tol):
    one_line_error(capsys, ["crosscheck", str(golden_file), f"--tol={tol}"], "deqref crosscheck",
                   f"--tol must be a finite number > 0, got {float(tol)!r}")


def test_crosscheck_tol_not_a_number(capsys, golden_file):
    one_line_error(capsys, ["crosscheck", str(golden_file), "--tol", "x"], "deqref crosscheck",
                   "argument --tol: invalid float value: 'x'")


def test_crosscheck_without_file(capsys):
    one_line_error(capsys, ["crosscheck"], "deqref crosscheck", "required: file")


def test_golden_without_out(capsys):
    one_line_error(capsys, ["golden"], "deqref golden", "required: --out")


# ------------------------------------------------------------------ errors while running
def test_an_unwritable_output_while_running_is_one_line(capsys, tmp_path, monkeypatch):
    """The disk fills while golden files are written: one line naming the file, exit 2."""
    def full(out):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "golden_tanh_d8.npz"))

    monkeypatch.setattr("deqref.crosscheck.write_golden", full)
    one_line_error(capsys, ["golden", "--out", str(tmp_path)], "deqref golden",
                   "cannot write the output", "golden_tanh_d8.npz: No space left on device")


@pytest.mark.parametrize("error", [ValueError("a bug"), TypeError("a bug"),
                                   FileNotFoundError(errno.ENOENT, "No such file", "/elsewhere/x")])
def test_bugs_still_surface(tmp_path, monkeypatch, error):
    """Only bad input becomes one line: an error inside a command that is not about the
    command's arguments or output folder keeps its traceback."""
    def broken(args):
        raise error

    monkeypatch.setitem(cli.RUN, "golden", broken)
    with pytest.raises(type(error)):
        main(["golden", "--out", str(tmp_path)])


# ------------------------------------------------------------------ the real process
@pytest.mark.parametrize("argv", [[], ["reproduce", "--seed", "-1"], ["crosscheck", "/nonexistent.npz"],
                                  ["reproduce", "figure99"], ["crosscheck", __file__]])
def test_the_process_prints_no_traceback(argv):
    """As run from a shell: exit code 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "deqref.cli", *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("deqref")
