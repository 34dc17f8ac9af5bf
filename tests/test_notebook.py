"""launch/colab_demo.ipynb: its install cell finds what to install, and it runs end to end.

The end-to-end test executes the notebook with nbclient in a fresh kernel, the way Jupyter runs
it from launch/, with ``RUNLOCAL = True`` and a temporary workdir appended to its parameter cell.
"""

import http.server
import json
import os
import pathlib
import threading

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_demo.ipynb"


def _notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, cell_id):
  (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
  return cell


def _install_functions():
  """The install cell's definitions, without its last line (which installs)."""
  source = _cell(_notebook(), "install").source
  body, last = source.rstrip().rsplit("\n", 1)
  assert last == "REPO_ROOT = install_dfm_jax()"
  namespace = {"REPO": "", "REF": ""}
  exec(compile(body, "install-cell", "exec"), namespace)  # noqa: S102
  return namespace


def test_notebook_is_valid_and_names_no_placeholder():
  nb = _notebook()
  nbformat.validate(nb)
  code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert "YOUR_ORG" not in code and "git clone https://" not in code
  assert "parameters" in _cell(nb, "parameters").metadata["tags"]


def test_github_origin_from_colab_session_paths():
  ns = _install_functions()
  origin = ns["github_origin"]
  quoted = "https%3A%2F%2Fgithub.com%2Facme%2Fdfm_jax%2Fblob%2Fmain%2Flaunch%2Fcolab_demo.ipynb"
  assert origin("fileId=" + quoted) == ("https://github.com/acme/dfm_jax.git", "main")
  # Branch names may hold slashes; the notebook's folder ends the ref.
  assert origin("fileId=https://github.com/a-b/r.x/blob/feat/pod/launch/colab_demo.ipynb") == (
    "https://github.com/a-b/r.x.git",
    "feat/pod",
  )
  assert origin("fileId=1AbCdEfG_drive_id") is None
  assert origin("fileId=https://github.com/acme/dfm_jax/blob/main/other.ipynb") is None


def test_colab_origin_asks_the_runtime_jupyter_server(monkeypatch):
  path = "fileId=https%3A%2F%2Fgithub.com%2Facme%2Fdfm%2Fblob%2Fv1.0%2Flaunch%2Fcolab_demo.ipynb"

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
      body = json.dumps([{"name": "colab_demo.ipynb", "path": path}]).encode()
      self.send_response(200 if self.path == "/api/sessions" else 404)
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    ns = _install_functions()
    monkeypatch.delenv("COLAB_JUPYTER_IP", raising=False)
    assert ns["colab_origin"]() is None  # not in Colab
    monkeypatch.setenv("COLAB_JUPYTER_IP", "127.0.0.1")
    monkeypatch.setenv("KMP_TARGET_PORT", str(server.server_address[1]))
    assert ns["colab_origin"]() == ("https://github.com/acme/dfm.git", "v1.0")
  finally:
    server.shutdown()
    server.server_close()


def test_install_finds_the_checkout_or_says_what_to_do(tmp_path, monkeypatch):
  ns = _install_functions()
  assert ns["find_checkout"](ROOT / "launch") == ROOT
  assert ns["find_checkout"](tmp_path) is None
  monkeypatch.delenv("COLAB_JUPYTER_IP", raising=False)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(RuntimeError, match="Open in Colab"):
    ns["install_dfm_jax"]()


@pytest.mark.integration
def test_notebook_runs_end_to_end_on_cpu(tmp_path):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top

  nb = _notebook()
  workdir = tmp_path / "workdir"
  params = _cell(nb, "parameters")
  params.source += f"\nRUNLOCAL = True\nWORKDIR = {str(workdir)!r}\n"
  # Run from launch/ as Jupyter would; the kernel inherits this process's environment (JAX on
  # the CPU with 8 host devices, tests/conftest.py).
  client = NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "launch")}}
  )
  client.execute(env=dict(os.environ, JAX_PLATFORMS="cpu"))
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if o.get("output_type") == "error"
  ]
  assert not errors
  install_out = "".join(o.get("text", "") for o in _cell(nb, "install").outputs)
  assert "already installed" in install_out  # the test must not pip install
  assert (workdir / "stages.png").stat().st_size > 0
  for cell in ("pretrained", "sample"):  # the shipped model's samples, then the run's
    assert any(o.get("output_type") == "display_data" for o in _cell(nb, cell).outputs), cell
