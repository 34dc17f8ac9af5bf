"""The package as a user installs it: pyproject's ranges against the pins CI tests, config names
that resolve to the shipped configs, and a built wheel in a fresh venv running the default job
from another folder through its console command (integration)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dfm_jax import cli_errors

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("dfm-train", "dfm-sample", "dfm-encode", "dfm-fid", "dfm-compile-check")


def _project() -> dict:
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
  return re.split(r"[\[<>=! ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(path: Path) -> dict[str, str]:
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if "==" in line:
      spec, version = line.split("==", 1)
      pins[_name(spec)] = version.strip()
  return pins


def test_dependency_floors_are_the_pinned_versions_ci_tests():
  """Every dependency has a lower bound and no upper one; where requirements.txt (the lock the
  README's commands and CI install) pins a version, the floor is that version, so the oldest
  version a user may get is the tested one."""
  pins = _pins(REPO / "requirements.txt")
  deps = {_name(d): d for d in _project()["dependencies"]}
  assert set(pins) <= set(deps), f"pinned but not a dependency: {set(pins) - set(deps)}"
  for name, spec in deps.items():
    floor = re.search(r">=([^,; ]+)", spec)
    assert floor and "<" not in spec, spec
    if name in pins:
      assert floor.group(1) == pins[name], (spec, pins[name])


def test_extras_and_console_commands():
  project = _project()
  extras = project["optional-dependencies"]
  assert {"tpu", "cuda", "test", "bench"} <= set(extras)
  jax_pin = _pins(REPO / "requirements.txt")["jax"]
  assert extras["tpu"] == [f"jax[tpu]>={jax_pin}"]
  assert extras["cuda"] == [f"jax[cuda12]>={jax_pin}"]
  assert set(project["scripts"]) == set(COMMANDS)
  for target in project["scripts"].values():  # every entry point exists
    module, _, func = target.partition(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func)), target


def test_bare_config_names_resolve_to_the_shipped_configs(tmp_path, monkeypatch):
  shipped = REPO / "configs" / "imagenet512.py"
  out = cli_errors.resolve_config_names(["prog", "--config=imagenet512:fm", "--workdir=w"])
  assert out == ["prog", f"--config={shipped}:fm", "--workdir=w"]
  out = cli_errors.resolve_config_names(["prog", "--config", "default.py"])
  assert out == ["prog", "--config", str(REPO / "configs" / "default.py")]
  monkeypatch.chdir(tmp_path)  # a file of that name here wins over the shipped one
  (tmp_path / "default.py").write_text("")
  assert cli_errors.resolve_config_names(["p", "--config=default.py"]) == [
    "p",
    "--config=default.py",
  ]
  with pytest.raises(ValueError, match="neither a file nor a shipped config .*imagenet512"):
    cli_errors.resolve_config_names(["p", "--config=imagenet"])


def test_an_unknown_config_name_is_one_line_and_exit_2(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "dfm_jax.main", "--config=imagenet", f"--workdir={tmp_path}"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config 'imagenet' is neither")
  assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_a_built_wheel_runs_the_default_job_from_another_folder(tmp_path):
  """Build the wheel (no network: the test requirements pin setuptools), install it into a fresh
  venv (dependencies from this environment), and run ``dfm-train --config=default:runlocal`` and
  ``dfm-sample`` from a folder without the repository."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "dfm_jax", "configs"):
    copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
    copy(REPO / name, src / name)
  for cache in src.rglob("__pycache__"):
    shutil.rmtree(cache)
  wheels = tmp_path / "wheels"
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    + ["-w", str(wheels), str(src)],
    check=True,
  )
  (wheel,) = wheels.glob("dfm_jax-*.whl")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
  bin_dir = venv / "bin"
  subprocess.run(
    [bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
    check=True,
  )
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  where = subprocess.run(
    [bin_dir / "python", "-c", "import dfm_jax, os; print(os.path.dirname(dfm_jax.__file__))"],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert Path(where.stdout.strip()).is_relative_to(venv)  # the wheel, not the checkout
  for command in COMMANDS:
    assert (bin_dir / command).is_file(), command
  common = ["--config=default:runlocal", "--workdir=run"]
  train = subprocess.run(
    [bin_dir / "dfm-train", *common], cwd=elsewhere, env=env, capture_output=True, text=True
  )
  assert train.returncode == 0, train.stderr[-3000:]
  assert any((elsewhere / "run" / "checkpoints").iterdir())
  sample = subprocess.run(
    [bin_dir / "dfm-sample", *common], cwd=elsewhere, env=env, capture_output=True, text=True
  )
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert any(p.suffix == ".png" for p in (elsewhere / "run" / "samples").rglob("*"))
  taef2 = subprocess.run(  # the shipped weights load from the installed package
    [
      bin_dir / "python",
      "-c",
      "from dfm_jax import autoencoders as a; a.build('taef2', a.shipped_weights('taef2'))",
    ],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
  )
  assert taef2.returncode == 0, taef2.stderr[-2000:]
  bad = subprocess.run(
    [bin_dir / "dfm-train", "--mode=sample", *common],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
  )
  assert bad.returncode == 2 and "drop --mode" in bad.stderr
