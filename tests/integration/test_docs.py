"""Every example of README.md and docs/*.md runs, so the documentation cannot drift.

Each fenced ```python block is executed against the session's real cluster (primary,
standby, PgBouncer in transaction mode), after the explicit SUBSTITUTIONS below map the
hosts the examples name to the cluster's. A block runs on its own, unless the line right
before its fence says ``<!-- docs-test: continues the example above -->``: then the file's
previous python block runs first, in the same namespace. A block that cannot run is marked
``<!-- docs-test: skip (why) -->`` and is only compiled. Every fence names its language, so
no python hides in a bare fence. What an example states in a comment is checked in OUTCOMES.

Shell examples are checked where it is cheap: every ``pgfailover ...`` command of the docs
parses with the CLI's own parser (usage synopses must list every option with its metavar or
choices), the options quoted in a sub-command's page (docs/drill.md, docs/probe.md) exist,
their "Defaults:" are the parser's, and every ``make X`` is a Makefile target. Output
listings (the drill's table, the probe's table) carry the programs' current column headers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import re
import shlex
import sys
import textwrap
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import pytest
import sqlalchemy as sa

import pgfailover
import pgfailover.sqlalchemy
from pgfailover.cli import build_parser
from pgfailover.drill.options import STACK_NAMES, stack_key
from pgfailover.drill.report import DrillReport, Mark, Op, build_report
from pgfailover.monitor import monitors
from pgfailover.survey import HostReport, format_report
from pgfailover.testing import LocalCluster, PgBouncer

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
DOC_PATHS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PYTHON = ("python", "py")
SHELL = ("sh", "shell", "bash", "console")

# ----------------------------------------------------------------------- reading markdown

_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<directive>.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_SPAN = re.compile(r"(?<!`)`(?P<text>[^`]+)`(?!`)")
_SKIP = re.compile(r"^skip \((?P<reason>[^)]*\S[^)]*)\)$")
_CONTINUES = re.compile(r"^continues\b")


@dataclass(frozen=True)
class Fence:
    """A fenced block: ``name`` of its file, ``line`` of its opening fence (1-based)."""

    name: str
    line: int
    info: str
    code: str
    directive: str | None  # the docs-test marker on the line before the fence

    @property
    def id(self) -> str:
        return f"{self.name}:{self.line}"

    @property
    def language(self) -> str:
        return self.info.split()[0].lower() if self.info.split() else ""

    @property
    def skip_reason(self) -> str | None:
        match = _SKIP.match(self.directive or "")
        return match["reason"] if match else None

    @property
    def continues(self) -> bool:
        return bool(_CONTINUES.match(self.directive or ""))


@dataclass(frozen=True)
class Span:
    """An inline code span outside fences; ``before``: its paragraph's text up to it."""

    name: str
    line: int
    text: str
    before: str

    @property
    def states_a_default(self) -> bool:
        """In the first sentence of a paragraph that begins "Defaults:"."""
        return self.before.startswith("Defaults:") and ". " not in self.before


@dataclass(frozen=True)
class Doc:
    name: str
    fences: tuple[Fence, ...]
    spans: tuple[Span, ...]
    problems: tuple[str, ...]

    @property
    def stem(self) -> str:
        return Path(self.name).stem


def read_doc(name: str, text: str) -> Doc:
    """The fences, inline code spans and marker problems of one markdown file."""
    lines = text.splitlines()
    fences: list[Fence] = []
    problems: list[str] = []
    prose: list[tuple[int, str]] = []  # (line, text) outside fences; "" breaks a paragraph
    markers: dict[int, str] = {}  # line -> directive, until a fence takes it
    i = 0
    while i < len(lines):
        number = i + 1
        fence = _FENCE.match(lines[i])
        if fence is None:
            marker = _MARKER.match(lines[i])
            if marker:
                markers[number] = marker["directive"]
            prose.append((number, "" if marker else lines[i]))
            i += 1
            continue
        mark = fence["fence"]
        close = re.compile(rf"^\s*{re.escape(mark[0])}{{{len(mark)},}}\s*$")
        j = next((k for k in range(i + 1, len(lines)) if close.match(lines[k])), len(lines))
        if j == len(lines):
            problems.append(f"{name}:{number}: the fence is never closed")
        body = textwrap.dedent("\n".join(lines[i + 1 : j])) + "\n"
        info = fence["info"].strip()
        fences.append(Fence(name, number, info, body, markers.pop(number - 1, None)))
        prose.append((number, ""))
        i = j + 1
    problems.extend(
        f"{name}:{line}: a docs-test marker must be on the line before a fence" for line in markers
    )
    problems.extend(_fence_problems(fences))
    return Doc(name, tuple(fences), tuple(_spans(name, prose)), tuple(problems))


def _spans(name: str, prose: list[tuple[int, str]]) -> Iterator[Span]:
    """The inline code spans of each paragraph (a span may wrap to the next line)."""
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if not paragraph:
            continue
        joined = "\n".join(text for _, text in paragraph)
        for match in _SPAN.finditer(joined):
            line_number = paragraph[0][0] + joined.count("\n", 0, match.start())
            before = " ".join(joined[: match.start()].split())
            yield Span(name, line_number, " ".join(match["text"].split()), before)
        paragraph = []


def _fence_problems(fences: list[Fence]) -> Iterator[str]:
    previous: Fence | None = None  # the previous python fence of the file
    for fence in fences:
        where = f"{fence.id}: "
        if not fence.language:
            yield where + "the fence names no language (python, sh, text, ...)"
        if fence.directive is not None:
            if fence.language not in PYTHON:
                yield where + "docs-test markers apply to python blocks only"
            elif fence.skip_reason is None and not fence.continues:
                yield (
                    where + f"unknown marker {fence.directive!r}: write "
                    "'docs-test: skip (reason)' or 'docs-test: continues the example above'"
                )
            elif fence.continues and (previous is None or previous.skip_reason is not None):
                yield where + "continues no runnable python block above it in the file"
        if fence.language in PYTHON:
            previous = fence


DOCS = [read_doc(str(path.relative_to(ROOT)), path.read_text()) for path in DOC_PATHS]
PYTHON_FENCES = [f for doc in DOCS for f in doc.fences if f.language in PYTHON]


def chain(fence: Fence) -> list[Fence]:
    """The blocks to run for ``fence``: the ones it continues, then itself."""
    blocks = [f for f in PYTHON_FENCES if f.name == fence.name]
    index = blocks.index(fence)
    first = index
    while blocks[first].continues and first > 0:
        first -= 1
    return blocks[first : index + 1]


# ------------------------------------------------------------------- running the examples

#: What the examples name that does not exist here -> what the test cluster has instead.
#: Each key is matched as written (quotes included) and every key must be used.
SUBSTITUTIONS: dict[str, Callable[[LocalCluster], str]] = {
    # the README's core example is about db1 after a failover: a standby, so its except
    # branch runs (checked in OUTCOMES)
    '"host=db1 dbname=app"': lambda c: repr(c.standbys[0].dsn()),
    '"host=db1,db2 dbname=app connect_timeout=2"': lambda c: repr(
        c.multihost_dsn(connect_timeout=2)
    ),
    '"host=db1,db2 port=5432 dbname=app user=app"': lambda c: repr(c.multihost_dsn()),
    '"host=pgbouncer dbname=app"': lambda c: repr(_bouncer(c).dsn()),
    '"postgresql+psycopg://app@pgbouncer:6432/app"': lambda c: repr(_bouncer(c).url()),
    # the README's test bed example: the session cluster has that very shape (checked in
    # test_the_session_cluster_is_the_one_the_test_bed_example_opens); it is not closed
    'LocalCluster(standbys=1, pgbouncer="transaction")': lambda c: "_session_cluster()",
}
#: A host the substitutions left in an example: it would not resolve here.
_UNMAPPED_HOST = re.compile(r"(host=[\w.,-]*?|@)\b(db\d*|pgbouncer)\b")

#: Tables the examples use, created empty before each example.
TABLES = {
    "t": "x int",
    "payments": "id serial PRIMARY KEY, order_id int NOT NULL, amount int, note text",
    "orders": "key text PRIMARY KEY",
}
#: Tables examples create themselves (dropped before each example).
CREATED_BY_EXAMPLES = ("keys",)


def _bouncer(cluster: LocalCluster) -> PgBouncer:
    assert cluster.pgbouncer is not None
    return cluster.pgbouncer


def substitute(code: str, cluster: LocalCluster) -> str:
    for needle, replacement in SUBSTITUTIONS.items():
        code = code.replace(needle, replacement(cluster))
    return code


def fresh_tables(cluster: LocalCluster) -> None:
    """Drop what earlier examples wrote, create TABLES empty, wait until the standby has them."""
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {', '.join([*TABLES, *CREATED_BY_EXAMPLES])}")
        for table, columns in TABLES.items():
            conn.execute(f"CREATE TABLE {table} ({columns})")
    cluster.wait_replicated()


def rows(cluster: LocalCluster, query: str) -> list[tuple[Any, ...]]:
    with cluster.primary.connect(superuser=False) as conn:
        return conn.execute(query).fetchall()


def sample_drill_report() -> DrillReport:
    """A small report as the drill builds it: five writes of one stack, one failed."""
    stack = "pgfailover pool + runner"
    ops = [Op(stack, 0.2 * k, 0.2 * k + 0.01, k, ok=True) for k in (1, 2, 4, 5)]
    ops.append(Op(stack, 0.6, 0.8, 3, ok=False, error="25006"))
    marks = [Mark("failover started", 0.5), Mark("PgBouncer repointed", 0.9)]
    found = {op.key: 1 for op in ops if op.ok}
    return build_report({"target": "session"}, marks, 0.9, (0.0, 1.2), [(stack, True)], ops, found)


def close_all(namespace: dict[str, Any]) -> None:
    """Close what an example left open (it ends with the example, as in a script): an
    instrumented engine leaves the process monitor too, whose watch would otherwise look
    at the cluster until the engine is collected."""
    for value in namespace.values():
        if isinstance(value, sa.Engine):
            pgfailover.sqlalchemy.uninstrument(value)
            value.dispose()
        elif isinstance(value, (psycopg_pool.ConnectionPool, psycopg.Connection)):
            value.close()


def wait_unwatched(cluster: LocalCluster, timeout: float = 10.0) -> None:
    """Wait until no monitor of this process watches an endpoint of ``cluster``: a watch
    left by an earlier test looks through PgBouncer during a failover, and a server login
    it has seen fail makes PgBouncer refuse the next client ("server login has been
    failing"), which would change what an example shows."""
    ports = {str(node.port) for node in cluster.nodes} | {str(_bouncer(cluster).port)}

    def watched() -> list[str]:
        return [
            f"{endpoint}: {monitor.members(endpoint)}"
            for monitor in monitors()
            for endpoint in monitor.endpoints()
            if ports & set(endpoint.ports.split(","))
        ]

    deadline = time.monotonic() + timeout
    while (left := watched()) and time.monotonic() < deadline:
        gc.collect()  # a member nobody holds ends its watch at the watch's next look
        time.sleep(0.05)
    assert not left, f"still watched after {timeout} s: {left}"


@dataclass(frozen=True)
class Run:
    """What an example left: its namespace, what it printed, the cluster it ran on."""

    namespace: dict[str, Any]
    out: str
    cluster: LocalCluster

    def get(self, name: str, kind: type[T]) -> T:
        value = self.namespace.get(name)
        assert isinstance(value, kind), f"{name} = {value!r}, expected a {kind.__name__}"
        return value


def _standby_write_poisons_the_connection(run: Run) -> None:
    conn = run.get("conn", pgfailover.Connection)
    assert isinstance(conn, psycopg.Connection)  # "a real psycopg.Connection"
    assert conn.poisoned is not None, "the except branch did not run"
    assert conn.poisoned.kind is pgfailover.Kind.READ_ONLY


def _pool_gave_a_pgfailover_connection_that_wrote(run: Run) -> None:
    run.get("conn", pgfailover.Connection)  # "a pgfailover.Connection"
    assert rows(run.cluster, "SELECT x FROM t") == [(1,)]


def _engine_is_instrumented_and_reaches_the_cluster(run: Run) -> None:
    engine = run.get("engine", sa.Engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar() == "app"
    assert engine.url.port == _bouncer(run.cluster).port
    # instrumented by the example, not now: the connection above was already probed
    assert pgfailover.sqlalchemy.instrument(engine).stats()["probes_run"] >= 1


def _runner_paid_and_decorated_function_refunded(run: Run) -> None:
    assert rows(run.cluster, "SELECT order_id, note FROM payments") == [(42, "refunded")]


def _failover_printed_its_timings_and_writes_resumed(run: Run) -> None:
    # "stop 0.034s, promote 0.027s, rejoin 0.099s ..."
    assert re.match(r"stop \d+\.\d{3}s, promote \d+\.\d{3}s, rejoin \d+\.\d{3}s", run.out), run
    assert run.cluster.role(run.cluster.node("node1")) == "primary"
    assert rows(run.cluster, "SELECT k FROM keys") == [(1,)]


def _drill_report_read_back_equals_the_written_one(run: Run) -> None:
    report = sample_drill_report()
    assert run.get("report", DrillReport) == report
    assert run.out == report.format_text() + "\n"


def _survey_found_one_primary(run: Run) -> None:
    primary = run.get("primary", list)
    assert [r.address for r in primary if isinstance(r, HostReport)] == [
        run.cluster.primary.address
    ]
    assert run.get("status", int) == 0
    reports = [r for r in run.get("reports", list) if isinstance(r, HostReport)]
    assert run.out == format_report(reports) + "\n"


def _payments(*expected: tuple[int, int]) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        query = "SELECT order_id, amount FROM payments ORDER BY id"
        assert rows(run.cluster, query) == list(expected)

    return check


def _order_inserted(run: Run) -> None:
    assert rows(run.cluster, "SELECT key FROM orders") == [("order-42",)]


@dataclass(frozen=True)
class Outcome:
    """What the example of ``doc`` containing ``anchor`` must leave behind."""

    doc: str
    anchor: str
    check: Callable[[Run], None]

    def applies(self, fence: Fence) -> bool:
        return fence.name == self.doc and self.anchor in fence.code


OUTCOMES = [
    Outcome(
        "README.md",
        "# a real psycopg.Connection",
        _standby_write_poisons_the_connection,
    ),
    Outcome(
        "README.md",
        "with pool.connection() as conn:  # a pgfailover.Connection",
        _pool_gave_a_pgfailover_connection_that_wrote,
    ),
    Outcome(
        "README.md",
        "pgfailover.sqlalchemy.instrument(engine)",
        _engine_is_instrumented_and_reaches_the_cluster,
    ),
    Outcome(
        "README.md",
        'refund(42, note="refunded")',
        _runner_paid_and_decorated_function_refunded,
    ),
    Outcome(
        "README.md",
        "print(cluster.failover())  # stop 0.034s, promote 0.027s, rejoin 0.099s ...",
        _failover_printed_its_timings_and_writes_resumed,
    ),
    Outcome(
        "docs/drill.md",
        "DrillReport.from_json(json.load(f))",
        _drill_report_read_back_equals_the_written_one,
    ),
    Outcome(
        "docs/probe.md",
        "status = exit_code(reports)",
        _survey_found_one_primary,
    ),
    Outcome("docs/retry.md", "pay(42, 10)", _payments((42, 10))),
    Outcome(
        "docs/retry.md",
        "runner(pay_work, 42, amount=10)",
        _payments((42, 10), (42, 10)),
    ),
    Outcome("docs/retry.md", "runner(insert_order, order_key)", _order_inserted),
    Outcome(
        "docs/sqlalchemy.md",
        "pgfailover.sqlalchemy.instrument(engine)",
        _engine_is_instrumented_and_reaches_the_cluster,
    ),
    Outcome("docs/sqlalchemy.md", "session.commit()", _payments((42, 10))),
    Outcome(
        "docs/sqlalchemy.md",
        "runner(lambda session: session.add(Payment(order_id=42, amount=10)))",
        _payments((42, 10), (42, 10)),
    ),
]


@pytest.mark.parametrize("fence", PYTHON_FENCES, ids=lambda fence: fence.id)
def test_python_example_runs_and_does_what_it_says(
    fence: Fence,
    pgfailover_cluster: LocalCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The example runs as written on the real cluster, warning-free, and leaves what its
    comments say (a block marked skip is only compiled)."""
    if fence.skip_reason is not None:  # marked not runnable: it must still be Python
        compile(fence.code, fence.id, "exec")
        return
    cluster = pgfailover_cluster
    fresh_tables(cluster)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "drill.json").write_text(json.dumps(sample_drill_report().to_json(), indent=1))
    # a module of its own, as a script has (SQLAlchemy reads a mapped class's module)
    module = types.ModuleType("docs_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    namespace["_session_cluster"] = lambda: contextlib.nullcontext(cluster)
    out = ""
    wait_unwatched(cluster)
    try:
        for block in chain(fence):
            code = substitute(block.code, cluster)
            unmapped = _UNMAPPED_HOST.search(code)
            assert unmapped is None, f"{block.id}: add {unmapped[0]!r} to SUBSTITUTIONS"
            # padded so that tracebacks name the markdown file's own lines
            source = "\n" * block.line + code
            capsys.readouterr()
            with warnings.catch_warnings():  # what earlier tests left is theirs, not this block's
                warnings.simplefilter("ignore")
                gc.collect()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exec(compile(source, str(ROOT / block.name), "exec"), namespace)  # noqa: S102
            out = capsys.readouterr().out
            # an example must not teach what the libraries deprecate
            assert [str(w.message) for w in caught] == [], block.id
        for outcome in OUTCOMES:
            if outcome.applies(fence):
                outcome.check(Run(namespace, out, cluster))
    finally:
        close_all(namespace)


def test_the_session_cluster_is_the_one_the_test_bed_example_opens(
    pgfailover_cluster: LocalCluster,
) -> None:
    """The cluster that stands in for the README's LocalCluster(standbys=1,
    pgbouncer="transaction") has one standby and PgBouncer in transaction mode."""
    assert len(pgfailover_cluster.standbys) == 1
    assert _bouncer(pgfailover_cluster).pool_mode == "transaction"


def test_docs_fences_are_well_formed() -> None:
    """Every fence names its language and every docs-test marker is well placed and known."""
    assert [problem for doc in DOCS for problem in doc.problems] == []


def test_every_substitution_and_outcome_applies_to_an_example() -> None:
    """No substitution or outcome check outlives the example it was written for."""
    codes = [fence.code for fence in PYTHON_FENCES]
    assert [n for n in SUBSTITUTIONS if not any(n in code for code in codes)] == []
    for outcome in OUTCOMES:
        matches = [fence.id for fence in PYTHON_FENCES if outcome.applies(fence)]
        assert len(matches) == 1, (outcome.doc, outcome.anchor, matches)


def test_reader_finds_markers_fences_and_spans() -> None:
    """The markdown reader ties markers to the next fence, counts lines from 1, joins code
    spans across lines, and reports misplaced or unknown markers and bare fences."""
    text = textwrap.dedent(
        """\
        Run `pgfailover drill
        --stop immediate` now.

        <!-- docs-test: skip (a sketch) -->
        ```python
        work(...)
        ```
        <!-- docs-test: continues the example above -->
        ```python skip-test
        x = 1
        ```
        <!-- docs-test: frobnicate -->
        ```python
        y = 2
        ```
        <!-- docs-test: skip (stray) -->

        ```
        plain
        ```
        """
    )
    doc = read_doc("x.md", text)
    assert [(f.line, f.language, f.directive) for f in doc.fences] == [
        (5, "python", "skip (a sketch)"),
        (9, "python", "continues the example above"),
        (13, "python", "frobnicate"),
        (18, "", None),
    ]
    assert doc.fences[0].skip_reason == "a sketch"
    assert doc.fences[1].code == "x = 1\n"
    assert doc.spans == (Span("x.md", 1, "pgfailover drill --stop immediate", "Run"),)
    assert doc.problems == (
        "x.md:16: a docs-test marker must be on the line before a fence",
        "x.md:9: continues no runnable python block above it in the file",
        "x.md:13: unknown marker 'frobnicate': write 'docs-test: skip (reason)' or "
        "'docs-test: continues the example above'",
        "x.md:18: the fence names no language (python, sh, text, ...)",
    )


# ------------------------------------------------------------------ shell commands, options


@dataclass(frozen=True)
class Command:
    """A command line the docs show (a span, or a line of a shell fence)."""

    name: str
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.name}:{self.line}"


def _shell_commands() -> list[Command]:
    commands: list[Command] = []
    for doc in DOCS:
        for fence in doc.fences:
            if fence.language not in SHELL:
                continue
            for number, line in enumerate(fence.code.splitlines(), fence.line + 1):
                if line[:1].isspace() and commands and commands[-1].name == doc.name:
                    last = commands[-1]  # a synopsis continued on the next line
                    commands[-1] = Command(last.name, last.line, f"{last.text} {line.strip()}")
                elif line.strip():
                    commands.append(Command(doc.name, number, line.strip().removeprefix("$ ")))
        commands.extend(Command(s.name, s.line, s.text) for s in doc.spans)
    return [
        c
        for c in commands
        if c.text.split()[0] in ("pgfailover", "make")
        and " " in c.text
        and c.text not in STACK_NAMES  # "pgfailover pool" is a drill stack, not a command
    ]


COMMANDS = _shell_commands()
_GROUP = re.compile(r"\[(?P<inside>[^\[\]]*)\]")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            sub = action.choices[name]
            assert isinstance(sub, argparse.ArgumentParser)
            return sub
    raise AssertionError(f"pgfailover has no sub-command {name!r}")


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse without running; a parser error fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"pgfailover {shlex.join(argv)}: {err.getvalue().strip()}")


def _check_synopsis_groups(sub: argparse.ArgumentParser, groups: list[str]) -> None:
    """``[--opt METAVAR]``, ``[--opt a|b]``, ``[--flag]``, ``[--a X | --b]``: every option
    exists with that metavar or those choices, and the synopsis lists every option."""
    seen: set[argparse.Action] = set()
    for group in groups:
        for alternative in group.split(" | "):
            option, *value = alternative.split()
            action = sub._option_string_actions.get(option)
            if action is None:
                pytest.fail(f"{sub.prog} has no {option}")
            seen.add(action)
            if not value:
                assert action.nargs == 0, f"{option} takes a value"
            elif "|" in value[0]:
                assert set(value[0].split("|")) == set(action.choices or ()), option
            else:
                assert value == [action.metavar], f"{option} {action.metavar}"
    options = [a for a in sub._actions if a.option_strings and "-h" not in a.option_strings]
    assert [a.option_strings for a in options if a not in seen] == []


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^([\w. -]+?)\s*:(?!=)", text, flags=re.MULTILINE)
    return {name for line in targets for name in line.split()}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.id)
def test_documented_command_parses(command: Command) -> None:
    """The command parses with today's CLI parser, or names a Makefile target."""
    inside = [m["inside"] for m in _GROUP.finditer(command.text)]
    argv = shlex.split(_GROUP.sub("", command.text), comments=True)
    if argv[0] == "make":
        assert set(argv[1:]) <= _make_targets(), command
        return
    argv = argv[1:]
    if {"-h", "--help", "--version"} & set(argv):
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 0
    else:
        _parse(argv)
    if inside:
        _check_synopsis_groups(_subparser(build_parser(), argv[0]), inside)


def _subcommand_docs() -> list[tuple[Doc, str]]:
    """The pages documenting one sub-command each: docs/<sub-command>.md."""
    parser = build_parser()
    names = {
        name
        for a in parser._actions
        if isinstance(a, argparse._SubParsersAction)
        for name in a.choices
    }
    return [(doc, doc.stem) for doc in DOCS if doc.name.startswith("docs/") and doc.stem in names]


def _positionals(sub: str) -> list[str]:
    """Placeholders for a sub-command's positional arguments."""
    return [a.dest for a in _subparser(build_parser(), sub)._actions if not a.option_strings]


_OPTION_SPANS = [
    (sub, span)
    for doc, sub in _subcommand_docs()
    for span in doc.spans
    if re.match(r"-{1,2}[a-z]", span.text)
]


@pytest.mark.parametrize(
    ("sub", "span"), _OPTION_SPANS, ids=[f"{s.name}:{s.line}" for _, s in _OPTION_SPANS]
)
def test_option_quoted_in_a_command_page_exists(sub: str, span: Span) -> None:
    """An option quoted in docs/<command>.md is the command's; with values, it parses, and in
    a "Defaults:" sentence the value is the parser's default."""
    tokens = shlex.split(span.text)
    parser = _subparser(build_parser(), sub)
    for token in tokens:
        if token.startswith("-") and token not in parser._option_string_actions:
            pytest.fail(f"pgfailover {sub} has no {token}")
    action = parser._option_string_actions[tokens[0]]
    if len(tokens) == 1 and action.nargs != 0:
        return  # the option named alone, its value elsewhere
    base = [sub, *_positionals(sub)]
    parsed = _parse([*base, *tokens])
    if span.states_a_default:
        assert getattr(parsed, action.dest) == getattr(_parse(base), action.dest), span.text


def test_drill_page_states_the_default_of_every_option_with_a_value() -> None:
    """docs/drill.md's "Defaults:" sentence quotes every drill option that takes a value
    (each checked against the parser above), but --stacks and --json, stated in words."""
    stated = {
        s.text.split()[0] for sub, s in _OPTION_SPANS if sub == "drill" and s.states_a_default
    }
    drill = _subparser(build_parser(), "drill")
    valued = {a.option_strings[-1] for a in drill._actions if a.option_strings and a.nargs != 0}
    assert stated == valued - {"--stacks", "--json"}


# ------------------------------------------------------------------------ output listings


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _drill_header() -> list[str]:
    text = sample_drill_report().format_text()
    return _cells(next(line for line in text.splitlines() if line.startswith("stack ")))


def _probe_header() -> list[str]:
    text = format_report([HostReport("127.0.0.1:5432", "unreachable")])
    return _cells(text.splitlines()[0])


_LISTINGS = [
    fence
    for doc in DOCS
    for fence in doc.fences
    if fence.language == "text"
    and any(line.startswith(("stack ", "HOST ")) for line in fence.code.splitlines())
]


@pytest.mark.parametrize("fence", _LISTINGS, ids=lambda fence: fence.id)
def test_output_listing_has_the_programs_columns(fence: Fence) -> None:
    """A drill table shows the report's columns in order (abridged or not); a probe table
    shows exactly the probe's columns."""
    for line in fence.code.splitlines():
        if line.startswith("stack "):
            header = iter(_drill_header())
            assert all(cell in header for cell in _cells(line)), _cells(line)
        elif line.startswith("HOST "):
            assert _cells(line) == _probe_header()


def test_drill_page_lists_every_stack_with_its_key() -> None:
    """docs/drill.md's stack table names the drill's stacks, in order, with their keys."""
    drill = next(doc for doc in DOCS if doc.name == "docs/drill.md")
    text = (ROOT / drill.name).read_text()
    table = re.findall(r"^\s*\| `(?P<name>[^`]+)` \| `(?P<key>[^`]+)` \|", text, re.MULTILINE)
    assert table == [(name, stack_key(name)) for name in STACK_NAMES]
