"""The quality figures in docs/benchmarks.md are the committed results files' figures: the
tables are regenerated here from ``docs/*results.json`` and ``docs/oracle_*.json`` (written by
``bench/quality.py`` and ``bench/oracle.py``, which also record the command, host, accelerator
and library versions), so a stale number fails this test."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import oracle as oracle_bench  # noqa: E402  (bench/oracle.py)
import quality  # noqa: E402  (bench/quality.py)


def read(name):
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def results(name):
  return json.loads(read(os.path.join("docs", name)))


@pytest.mark.parametrize("name", ["quality_methods_results.json", "quality_mnist5k_results.json"])
def test_every_mean_fid_and_spread_is_quoted(name):
  text = read("docs/benchmarks.md")
  for e in results(name)["summary"]:
    cell = f"{e['fid']:.1f}" + (f" +- {e['fid_spread']:.1f}" if len(e["seeds"]) > 1 else "")
    assert cell in text, (name, e["row"], e["cfg"], cell)


def test_hypotheses_table_is_its_results_file():
  d = results("quality_hypotheses_results.json")
  assert d["provenance"]["command"].startswith("python bench/quality.py")
  assert quality.table(quality.summarise(d["runs"])) in read("docs/benchmarks.md")


def test_finetune_table_is_its_results_file():
  d = results("quality_finetune_results.json")
  assert d["provenance"]["command"].startswith("python bench/quality.py")
  table = quality.table(quality.summarise(d["runs"]))
  indented = "\n".join("   " + line for line in table.splitlines())
  assert indented in read("docs/benchmarks.md")


def test_oracle_table_is_its_results_file():
  d = results("oracle_fashion_mnist.json")
  assert d["provenance"]["command"].startswith("python bench/oracle.py")
  assert oracle_bench.table(d["rows"]) in read("docs/benchmarks.md")


def test_readme_default_run_table_is_its_results_file():
  """Each cfg row of the README's default-run table quotes docs/default_run_results.json."""
  d = results("default_run_results.json")
  assert d["provenance"]["command"].startswith(
    "python bench/quality.py --config=configs/default.py"
  )
  rows = {
    float(line.split("|")[1].split()[0]): line
    for line in read("README.md").splitlines()
    if line.startswith("| 3.0 ") or line.startswith("| 1.5 ")
  }
  assert sorted(rows) == sorted(r["cfg"] for r in d["runs"])
  for r in d["runs"]:
    cells = rows[r["cfg"]].replace("*", "")
    for figure in (
      f"{100 * r['classifier_accuracy']:.1f}%",
      f"{r['classifier_fd']:.1f}",
      f"{r['fid']:.1f}",
    ):
      assert f" {figure} " in cells, (r["cfg"], figure, cells)


def test_video_table_is_its_results_file():
  """Section 10 (moving digits, DFM against flow matching) and the README's video row."""
  d = results("quality_video_results.json")
  assert d["provenance"]["command"].startswith(
    "python bench/quality.py --config=configs/moving_digits.py"
  )
  summary = quality.summarise(d["runs"])
  assert quality.table(summary) in read("docs/benchmarks.md")
  fid = {(e["row"], e["cfg"]): e["frame_fid"] for e in summary}
  assert f"frame FID {fid['config', 1.0]:.1f} vs {fid['fm', 1.0]:.1f}" in read("README.md")
