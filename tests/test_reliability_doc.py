"""``docs/reliability.md`` stays true: its case table is the expectation that
``tests/test_reliability_cli.py`` checks every CLI run against (:func:`check_row`), and here,
without running anything, every row has a test and every test a row, and the exit-code table
matches ``dfm_jax.main``."""

from __future__ import annotations

import dataclasses
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "reliability.md")
CLI_TESTS = os.path.join(REPO, "tests", "test_reliability_cli.py")
ELLIPSIS = "\u2026"  # in a message: any text
_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+\S+:\d+\] ")


@dataclasses.dataclass(frozen=True)
class Row:
  case: str
  command: str
  exit: int
  message: str
  log: bool  # a log line (absl prefix stripped before comparing)


def _table(name: str) -> list[list[str]]:
  with open(DOC, encoding="utf-8") as f:
    text = f.read()
  match = re.search(rf"<!-- {name} -->\n(.*?)\n<!-- /{name} -->", text, re.S)
  assert match, f"docs/reliability.md has no <!-- {name} --> table"
  rows = []
  for line in match.group(1).splitlines()[2:]:  # after the header and |---| lines
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
    rows.append([c.replace("\\|", "|") for c in cells])
  return rows


def _code(cell: str) -> str:
  assert cell.startswith("`") and cell.endswith("`"), cell
  return cell[1:-1]


def doc_rows() -> dict[str, Row]:
  rows = {}
  for cells in _table("cases"):
    assert len(cells) == 5, cells
    case, _, command, code, seen = cells
    log = seen.startswith("*(log)* ")
    row = Row(
      _code(case), _code(command), int(code), _code(seen[len("*(log)* ") :] if log else seen), log
    )
    assert row.case not in rows, f"case {row.case} twice in docs/reliability.md"
    rows[row.case] = row
  return rows


def _fill(template: str, values: dict, literal=re.escape, anything: str = ".*") -> str:
  out = []
  for part in re.split(r"(\{\w+\}|\u2026)", template):
    if part == ELLIPSIS:
      out.append(anything)
    elif re.fullmatch(r"\{\w+\}", part):
      name = part[1:-1]
      assert name in values, f"no value for {part} in {template!r}"
      out.append(literal(str(values[name])))
    else:
      out.append(literal(part))
  return "".join(out)


def strip_log_prefix(line: str) -> str:
  return _ABSL_PREFIX.sub("", line)


def check_row(case: str, argv: list[str], returncode: int, line: str, **values) -> None:
  """Asserts that a CLI run of ``case`` is what its row in docs/reliability.md says: the exit
  code, the message (``{name}`` filled from ``values``, ``…`` any text) and each word of the
  command (found in ``argv``)."""
  row = doc_rows()[case]
  assert returncode == row.exit, (
    f"{case}: docs/reliability.md says exit {row.exit}, the CLI exited {returncode}"
  )
  if row.log:
    line = strip_log_prefix(line)
  pattern = _fill(row.message, values)
  assert re.fullmatch(pattern, line), (
    f"{case}: docs/reliability.md says\n  {row.message}\nthe CLI printed\n  {line}"
  )
  command = " ".join(argv)
  for word in row.command.split():
    filled = _fill(word, values, literal=str, anything="")
    assert filled in command, f"{case}: {word!r} of the documented command is not in {command}"


# ------------------------------------------------------------------------------------ tests


def test_every_row_has_a_cli_test_and_every_cli_test_a_row():
  with open(CLI_TESTS, encoding="utf-8") as f:
    source = f.read()
  tested = set(re.findall(r"""check_row\(\s*["']([\w-]+)["']""", source))
  tested |= set(re.findall(r"""^\s*\(["']([\w-]+)["'],""", source, re.M))  # parametrized cases
  documented = set(doc_rows())
  assert documented - tested == set(), "rows of docs/reliability.md that no test runs"
  assert tested - documented == set(), "cases of test_reliability_cli.py missing from the doc"


def test_rows_are_well_formed():
  for row in doc_rows().values():
    assert row.exit in (0, 1, 2, 75, 130), row
    assert row.log or row.exit == 130 or row.message.startswith("error: "), row
    assert re.fullmatch(r"[a-z0-9-]+", row.case), row
    for name in re.findall(r"\{(\w+)\}", row.message + row.command):
      assert name in ("workdir", "checkpoints", "host", "pid", "step", "path", "file"), row


def test_exit_code_table_matches_the_errors_module():
  from dfm_jax import errors

  codes = {int(cells[0]) for cells in _table("exit-codes")}
  assert codes == {0, 1, 2, 75, 130}
  named = ("EXIT_ERROR", "EXIT_USAGE", "EXIT_PREEMPTED", "EXIT_INTERRUPTED")
  assert [getattr(errors, name) for name in named] == [1, 2, 75, 130]


def test_message_templates_match_their_own_examples():
  """The matcher itself: placeholders take the given values, ``…`` any text, the rest is
  literal (a ``.`` or ``(`` in a message is not a pattern)."""
  assert re.fullmatch(_fill("a {x} (b) …; c.", {"x": "1.5"}), "a 1.5 (b) anything; c.")
  assert not re.fullmatch(_fill("a {x} (b) c.", {"x": "1.5"}), "a 135 (b) cX")
  assert strip_log_prefix("W1127 10:31:39.838857 140232 main.py:71] SIGINT: x") == "SIGINT: x"
