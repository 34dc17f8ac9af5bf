"""The figures in docs/benchmarks.md are the committed results files' figures: the tables are
regenerated here from ``docs/*results.json``, ``docs/oracle_*.json`` (written by
``bench/quality.py`` and ``bench/oracle.py``) and ``docs/bench_*.json`` (the micro-benchmarks'
``--out``), which also record the command, host, accelerator and library versions, so a stale
number fails this test."""

import glob
import json
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import common  # noqa: E402  (bench/common.py)
import oracle as oracle_bench  # noqa: E402  (bench/oracle.py)
import quality  # noqa: E402  (bench/quality.py)


def read(name):
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def results(name):
  return json.loads(read(os.path.join("docs", name)))


def quoted(table: str) -> bool:
  """Whether ``table`` is in docs/benchmarks.md verbatim, at any indentation (tables inside
  list items)."""
  text = "\n".join(line.lstrip() for line in read("docs/benchmarks.md").splitlines())
  return table in text


@pytest.mark.parametrize("name", ["quality_methods_results.json", "quality_mnist5k_results.json"])
def test_every_mean_fid_and_spread_is_quoted(name):
  text = read("docs/benchmarks.md")
  for e in results(name)["summary"]:
    cell = f"{e['fid']:.1f}" + (f" +- {e['fid_spread']:.1f}" if len(e["seeds"]) > 1 else "")
    assert cell in text, (name, e["row"], e["cfg"], cell)


@pytest.mark.parametrize(
  "name", ["quality_hypotheses_results.json", "quality_noprecond_results.json"]
)
def test_hypotheses_table_is_its_results_file(name):
  d = results(name)
  assert d["provenance"]["command"].startswith("python bench/quality.py")
  assert quoted(quality.table(quality.summarise(d["runs"])))


def test_finetune_table_is_its_results_file():
  d = results("quality_finetune_results.json")
  assert d["provenance"]["command"].startswith("python bench/quality.py")
  assert quoted(quality.table(quality.summarise(d["runs"])))


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


BENCH_FILES = sorted(
  os.path.basename(p) for p in glob.glob(os.path.join(REPO, "docs", "bench_*.json"))
)
# Benchmarks whose figures need hardware this project's CI lacks; their sections say so.
WITHOUT_RESULTS_FILE = {"gpu_throughput.py": "needs an NVIDIA GPU"}


def script_of(d: dict) -> str:
  """The bench script that wrote a results file (``python bench/<script>.py ...``)."""
  return d["provenance"]["command"].split()[1]


@pytest.mark.parametrize("name", BENCH_FILES)
def test_benchmark_tables_and_headline_are_its_results_file(name):
  """Every table a micro-benchmark printed is in docs/benchmarks.md verbatim, and so is its
  headline."""
  d = results(name)
  script = script_of(d)
  assert re.fullmatch(r"bench/\w+\.py", script) and os.path.exists(os.path.join(REPO, script))
  for t in d["tables"]:
    assert quoted(common.format_table(t["headers"], t["rows"])), (name, t["title"])
  assert d["headline"] in read("docs/benchmarks.md"), (name, d["headline"])


def test_every_summary_row_quotes_a_results_file():
  """Each script in the summary table at the top of docs/benchmarks.md has a committed results
  file whose headline the row quotes (quality.py: its results files, checked above)."""
  text = read("docs/benchmarks.md")
  headlines = {}
  for name in BENCH_FILES:
    d = results(name)
    headlines.setdefault(script_of(d), []).append(d["headline"])
  rows = re.findall(r"^\| `(\w+\.py)`[^|]*\| [^|]+ \| (.+) \|$", text, flags=re.M)
  assert len(rows) >= 8
  for script, headline in rows:
    if script in WITHOUT_RESULTS_FILE or script == "quality.py":
      continue
    assert any(h in headline for h in headlines.get(f"bench/{script}", [])), (script, headline)


def test_readme_benchmark_headlines_are_the_results_files():
  """The README's table of benchmark headlines quotes each results file's headline figures."""
  readme = read("README.md")
  table = readme[readme.index("Headlines on this 2-core CPU") :]
  table = table[: table.index("\n### ")]
  for name in BENCH_FILES:
    for figure in re.findall(r": ([\d.]*\d)", results(name)["headline"]):
      assert figure in table, (name, figure)


def test_readme_quality_table_quotes_the_benchmarks_document():
  """Every mean +- spread in the README's quality table is a figure of docs/benchmarks.md
  (whose tables the tests above check against the results files)."""
  readme = read("README.md")
  table = readme[readme.index("| method | seeds | FID | classifier FD | class accuracy |") :]
  table = table[: table.index("\n\n")]
  figures = re.findall(r"\d+\.\d%? \+- \d+\.\d%?", table)
  assert len(figures) >= 20
  text = read("docs/benchmarks.md")
  for figure in figures:
    assert figure in text, figure


def parity_tolerances() -> dict[str, tuple[float, list[str]]]:
  """Each parity test's tolerance and the (network: output) rows of docs/bench_parity.json it
  bounds."""
  from tests import test_autoencoders, test_dinov2, test_i3d, test_inception  # noqa: PLC0415

  return {
    "TAEF2": (test_autoencoders.TAEF2_ATOL, ["TAEF2: encode", "TAEF2: decode"]),
    "KL": (
      test_autoencoders.ATOL,
      [f"KL ({k}): {o}" for k in ("SD", "FLUX.1") for o in ("encode", "decode")],
    ),
    "Inception features": (
      test_inception.REL_TOL,
      ["FID Inception: pool3", "FID Inception: logits"],
    ),
    "Inception preprocessing": (
      test_inception.PREPROCESS_ATOL,
      ["FID Inception: preprocessing (absolute)"],
    ),
    "DINOv2": (
      test_dinov2.REL_TOL,
      ["DINOv2 (FDD): CLS features, every input size", "DINOv2 (FDD): all tokens, 126x196"],
    ),
    "I3D": (
      test_i3d.REL_TOL,
      ["I3D (FVD): pre-pool features", "I3D (FVD): logits", "I3D (FVD): pool"],
    ),
    "I3D preprocessing": (test_i3d.PREPROCESS_REL_TOL, ["I3D (FVD): preprocessing"]),
  }


def test_parity_tolerances_are_about_ten_times_the_measured_error():
  """Every parity test allows 5-20x the largest error bench/parity.py measured for the outputs
  it checks: loose enough for other CPUs, tight enough that the docs' precision holds."""
  measured = {
    f"{net}: {out}": float(err)
    for net, out, err in results("bench_parity.json")["tables"][0]["rows"]
  }
  covered = []
  for name, (tolerance, rows) in parity_tolerances().items():
    worst = max(measured[r] for r in rows)
    assert 5 <= tolerance / worst <= 20, (name, tolerance, worst)
    covered += rows
  assert sorted(covered) == sorted(measured)


def test_readme_parity_figures_are_the_results_file():
  """The README's "measured" errors and tolerances are docs/bench_parity.json's and the tests'."""
  d = results("bench_parity.json")
  measured = {float(row[2]) for row in d["tables"][0]["rows"]}
  tolerances = {t for t, _ in parity_tolerances().values()}
  readme = read("README.md")
  claims = re.findall(
    r"tests' ([\d.e-]+) (?:absolute|relative) tolerance[ ,(]+measured ([^)]+)\)", readme
  )
  assert len(claims) == 3, claims
  for tolerance, figures in claims:
    assert float(tolerance) in tolerances, tolerance
    for figure in re.findall(r"\d\.\de-\d", figures):
      assert float(figure) in measured, figure
  psnr = {row[0]: row[1] for row in d["tables"][1]["rows"]}
  assert f"reconstructs Fashion-MNIST at {psnr['Fashion-MNIST test']} dB" in readme


COMPILE_CHECK_FILES = sorted(glob.glob(os.path.join(REPO, "docs", "compile_check", "*.json")))


def compile_check_rows(path: str) -> list[str]:
  """The table rows ``python -m dfm_jax.compile_check`` prints for a ``--json`` file."""
  from dfm_jax import compile_check as cc  # noqa: PLC0415

  with open(path) as f:
    d = json.load(f)
  assert d["provenance"]["command"].startswith("python -m dfm_jax.compile_check --config=")
  return cc.summary_of_json(d).splitlines()[2:]


@pytest.mark.parametrize("path", COMPILE_CHECK_FILES, ids=os.path.basename)
def test_compile_check_rows_are_its_results_files(path):
  """Every row `python -m dfm_jax.compile_check --json` wrote is in docs/compile_check.md."""
  doc = read("docs/compile_check.md")
  for row in compile_check_rows(path):
    assert row in doc, (os.path.basename(path), row)


def test_compile_check_document_has_no_row_without_a_results_file():
  rows = [
    line
    for line in read("docs/compile_check.md").splitlines()
    if re.match(r"\| [^|]+ \| v\d\w*-\d+ \(\d+\) \|", line)
  ]
  assert len(rows) >= 25
  quoted_rows = {row for path in COMPILE_CHECK_FILES for row in compile_check_rows(path)}
  assert set(rows) <= quoted_rows, sorted(set(rows) - quoted_rows)


def test_earlier_run_tables_are_its_results_file():
  """Section 5's earlier run (FID against training steps, and the sampler sweeps) quotes
  docs/quality_results.json."""
  d = results("quality_results.json")
  curve = {(e["variant"], e["steps"], e["cfg"]): e for e in d["curve"]}
  lines = []
  for steps, cfg in sorted({(s, c) for _, s, c in curve}):
    dfm, fm = curve["dfm", steps, cfg], curve["fm", steps, cfg]
    lines.append(
      f"| {steps} | {cfg:g} | {dfm['fid']:.1f} / {fm['fid']:.1f} | "
      f"{dfm['classifier_fd']:.1f} / {fm['classifier_fd']:.1f} | "
      f"{100 * dfm['classifier_accuracy']:.1f}% / {100 * fm['classifier_accuracy']:.1f}% |"
    )
  lines += [f"| {e['tau']} | {e['fid']:.1f} | {e['classifier_fd']:.1f} |" for e in d["tau_sweep"]]
  lines += [
    f"| {e['steps_per_stage']} | {e['fid']:.1f} | {e['classifier_fd']:.1f} |"
    for e in d["split_sweep"]
  ]
  doc = read("docs/benchmarks.md").splitlines()
  for line in lines:
    assert line in doc, line


def test_benchmark_results_file_round_trip_and_unwritable_out(tmp_path):
  """``Report`` writes what it printed, with provenance; an unwritable ``--out`` stops the
  benchmark before it measures anything."""
  out = tmp_path / "bench.json"
  report = common.Report(str(out))
  report.table("t", ["a", "b"], [[1, 2.5]])
  report.finish("headline: 1.0")
  d = json.loads(out.read_text())
  assert d["headline"] == "headline: 1.0" and d["tables"][0]["rows"] == [["1", "2.5"]]
  assert d["provenance"]["versions"]["jax"]
  (tmp_path / "file").write_text("")
  with pytest.raises(
    SystemExit, match="cannot write --out results to .*file: a file is in the way"
  ):
    common.Report(str(tmp_path / "file" / "bench.json"))
