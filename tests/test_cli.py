import subprocess
import sys

from .conftest import DEFAULT_STUDY, ROOT


def _fedcare(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_study_check_prints_hash():
    proc = _fedcare("study", "check", str(DEFAULT_STUDY))
    assert proc.returncode == 0
    assert "valid study 'depression-risk'" in proc.stdout


def test_invalid_study_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_STUDY.read_text().replace("epsilon = 3.0", "epsilon = -1.0"))
    proc = _fedcare("study", "check", str(bad))
    assert proc.returncode == 2
    assert proc.stderr == f"fedcare: error: {bad}: privacy.epsilon: must be > 0, got -1.0\n"


def test_too_few_hospitals_is_refused_before_anything_runs(tmp_path):
    proc = _fedcare("simulate", "--hospitals", "2", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "--hospitals: 2 is fewer than the study's strategy.min_sites (3)" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_bad_epsilon_override_is_refused(tmp_path):
    proc = _fedcare("simulate", "--epsilon", "0", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "--epsilon: must be a finite number > 0, got 0.0" in proc.stderr


def test_run_refuses_zero_rounds_or_epsilon_before_touching_the_federation(tmp_path):
    """`--rounds 0` / `--epsilon 0` used to mean "the study's value" and spent real budget; now they are refused."""
    for flag, value, message in (("--rounds", "0", "--rounds: must be >= 1, got 0"),
                                 ("--epsilon", "0", "--epsilon: must be a finite number > 0, got 0.0"),
                                 ("--epsilon", "500", "--epsilon: must be in the accepted range 0 < ε <= 20, got 500.0")):
        proc = _fedcare("run", "--kit", str(tmp_path / "no-kit"), flag, value)
        assert (proc.returncode, proc.stderr) == (2, f"fedcare: error: {message}\n")
