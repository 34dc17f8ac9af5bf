"""The TPU compile check: topology table, one-line errors, and a real compile for a v4-8 slice.

The compile tests need libtpu (requirements-test.txt pins it) but no TPU: libtpu's compile-only
devices stand in for the chips, and JAX itself runs on the CPU.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dfm_jax import compile_check as cc
from dfm_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(depth: int = 2):
  """configs/default.py (3-stage DFM on 32x32x1) shrunk to compile in seconds."""
  spec = importlib.util.spec_from_file_location(
    "default_config", os.path.join(REPO, "configs", "default.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.hidden_size = 32
  c.model.depth = depth
  c.model.num_heads = 2
  c.batch_size = 8
  c.sampler.steps_per_stage = (1, 1, 1)
  c.sampler.batch_size = 8
  return c


def test_topology_table():
  t = cc.lookup_topology("v5p-64")
  assert (t.topology_name, t.num_chips, t.chip_config_name, t.hbm_gib) == (
    "v5:2x4x4",
    32,
    "megacore",
    95.0,
  )
  assert cc.lookup_topology("v4-32").topology_name == "v4:2x2x4"
  v5e = cc.lookup_topology("v5e-256")
  assert (v5e.topology_name, v5e.num_chips, v5e.wrap) == ("v5e:16x16", 256, (True, True, False))
  assert cc.lookup_topology("v6e-8").chips_per_host_bounds == (2, 4, 1)
  assert cc.lookup_topology("v4-128").wrap == (True, True, True)


def test_unknown_topology_is_one_line():
  with pytest.raises(cc.CompileCheckError, match=r"unknown TPU topology 'v5p-63'.*v5p-\{"):
    cc.lookup_topology("v5p-63")
  with pytest.raises(cc.CompileCheckError, match="unknown mesh"):
    cc.with_mesh(tiny_config(), "tp")


def test_missing_libtpu_is_one_line(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
  )
  with pytest.raises(cc.CompileCheckError, match="libtpu is not installed.*requirements-tpu"):
    cc.topology_devices(cc.lookup_topology("v4-8"))


def test_does_not_fit_lines():
  topology = cc.lookup_topology("v5e-4")
  big = cc.Result(
    "train step",
    "dp",
    (4, 1, 1),
    64,
    int(16 * cc.GIB),
    memory=cc.Memory(int(2 * cc.GIB), int(2 * cc.GIB), int(2 * cc.GIB), int(15 * cc.GIB), 0),
  )
  assert not big.fits and big.memory.total == 17 * cc.GIB
  assert "DOES NOT FIT" in cc.format_result(big, topology)
  refused = cc.Result(
    "sampler", "fsdp", (1, 4, 1), 64, int(16 * cc.GIB), error="Used 20G of 15.75G hbm."
  )
  assert not refused.fits
  assert "DOES NOT FIT" in cc.format_result(refused, topology)
  assert "**NO**" in cc.summary_table([big, refused], topology, "x")
  assert cc.config_label("configs/imagenet512.py:fm") == "imagenet512:fm"
  argv = ["--topology=v4-8", "--config.model.remat_policy=none", "--config.batch_size", "64"]
  assert cc.config_name("configs/imagenet512.py", argv) == (
    "imagenet512 model.remat_policy=none batch_size=64"
  )


def test_mesh_splits_torus_axes_where_no_whole_axis_fits():
  """A 128-way FSDP axis on a 16x16 v6e slice matches no product of whole torus axes, so JAX's
  make_mesh refuses it; the project's mesh splits physical axes and keeps every chip once."""
  import jax  # pylint: disable=g-import-not-at-top

  devices = cc.topology_devices(cc.lookup_topology("v6e-256"))
  with pytest.raises(NotImplementedError):
    jax.make_mesh((2, 128, 1), sharding.MESH_AXES, devices=devices)
  mesh = sharding.make_mesh((2, 128, 1), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 128, "tensor": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def _compile_check_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "dfm_jax.compile_check", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_cli_unwritable_json_path_exits_before_compiling(tmp_path):
  (tmp_path / "file").write_text("")
  proc = _compile_check_cli(
    "--config=configs/default.py", "--topology=v4-8", f"--json={tmp_path}/file/out.json"
  )
  assert proc.returncode == 2
  assert f"compile_check: cannot write --json results to {tmp_path}/file: a file is in the way" in (
    proc.stderr
  )
  assert "Traceback" not in proc.stderr and "compiled in" not in proc.stdout


def test_cli_unknown_topology_exits_without_traceback():
  proc = _compile_check_cli("--config=configs/default.py", "--topology=v9-8")
  assert proc.returncode == 2
  assert "compile_check: unknown TPU topology 'v9-8'" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
  "config, message",
  [
    ("configs/nope.py", "error: cannot load the config file: [Errno 2] No such file"),
    ("configs/default.py:bogus", "error: config configs/default.py:bogus: unknown config variant"),
  ],
)
def test_cli_bad_config_is_one_line(config, message):
  proc = _compile_check_cli(f"--config={config}", "--topology=v4-8")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_compiles_train_step_and_sampler_for_v4_8():
  topology = cc.lookup_topology("v4-8")
  devices = cc.topology_devices(topology)
  assert len(devices) == 4 and devices[0].platform == "tpu"
  config = tiny_config(depth=4)
  results = cc.check(config, topology, ["fsdp"], devices, log=lambda s: None)
  assert [(r.program, r.mesh, r.mesh_shape) for r in results] == [
    ("train step", "fsdp", (1, 4, 1)),
    ("sampler", "fsdp", (1, 4, 1)),
  ]
  for r in results:
    assert r.fits and r.memory.arguments > 0 and r.memory.total < r.hbm_bytes
  step = results[0]
  # The reported count (global unrolled count / 4 devices) matches XLA's per-device count of the
  # unrolled step compiled for the topology; the compiled scanned step holds fewer blocks.
  exact = cc._flops(
    cc.compile_train_step(cc.build_run(cc._unrolled(cc.with_mesh(config, "fsdp"), 4), devices))
  )
  assert step.flops == pytest.approx(exact, rel=0.1)
  assert step.flops_compiled < 0.75 * step.flops


@pytest.mark.integration
def test_sampler_batch_that_does_not_divide_is_noted_and_unsplit():
  """A sampler batch of 6 on 4 FSDP devices cannot be split: each device samples all 6 (more
  temporaries than 8 split 2 per device), and the check says so."""
  topology = cc.lookup_topology("v4-8")
  devices = cc.topology_devices(topology)
  config = tiny_config(depth=2)
  temps, notes = {}, {}
  for batch in (6, 8):
    logs = []
    results = cc.check(config, topology, ["fsdp"], devices, sample_batch=batch, log=logs.append)
    temps[batch] = results[-1].memory.temporaries
    notes[batch] = [s for s in logs if "does not divide" in s]
  assert len(notes[6]) == 1 and "sampler batch 6" in notes[6][0] and not notes[8]
  assert temps[6] > temps[8]


@pytest.mark.integration
def test_cli_json_records_provenance_and_reprints_its_table(tmp_path):
  """`--json` keeps what the table printed (docs/compile_check.md is checked against such files)
  plus the command that made it."""
  out = tmp_path / "check.json"
  args = [
    "--config=configs/default.py",
    "--topology=v4-8",
    "--mesh=fsdp",
    "--nosampler",
    "--config.model.hidden_size=32",
    "--config.model.depth=2",
    "--config.model.num_heads=2",
    "--config.batch_size=8",
    f"--json={out}",
  ]
  proc = _compile_check_cli(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  d = json.loads(out.read_text())
  assert d["provenance"]["command"] == "python -m dfm_jax.compile_check " + " ".join(args)
  assert d["provenance"]["versions"]["jax"]
  assert d["config"] == "default model.hidden_size=32 model.depth=2 model.num_heads=2 batch_size=8"
  table = cc.summary_of_json(d)
  assert table in proc.stdout
  assert "| v4-8 (4) | fsdp 1x4x1 | train step | 8 |" in table
