"""tools/async_to_sync.py: the sync twin generated from an async source."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import async_to_sync

NAME = "mod_async.py"
PREFIX = async_to_sync.HEADER.format(name=NAME) + "\n"
MARKED = "# pgfailover: generate-sync\n"


def rewrite(source: str) -> str:
    """The rewritten text of an indented snippet, without the header and before ruff."""
    out = async_to_sync.rewrite(textwrap.dedent(source), NAME)
    assert out.startswith(PREFIX)
    return out.removeprefix(PREFIX)


def convert(source: str) -> str:
    """The complete twin of an indented snippet (ruff included), without the header."""
    out = async_to_sync.convert(textwrap.dedent(source), NAME)
    assert out.startswith(PREFIX)
    return out.removeprefix(PREFIX)


# -- token rewrites -------------------------------------------------------------------------


def test_async_def_with_for_lose_async() -> None:
    """``async def``, ``async with`` and ``async for`` become their sync statements."""
    src = """\
        async def f(conn):
            async with conn:
                async for row in conn:
                    pass
        """
    assert (
        rewrite(src) == "def f(conn):\n    with conn:\n        for row in conn:\n            pass\n"
    )


def test_await_goes() -> None:
    """``await x`` becomes ``x``, in returns, assignments and conditions alike."""
    src = "async def f(c):\n    x = await c.a()\n    if await c.b():\n        return await c.d(x)\n"
    assert rewrite(src) == "def f(c):\n    x = c.a()\n    if c.b():\n        return c.d(x)\n"


def test_async_comprehension_becomes_sync() -> None:
    """``[x async for x in it]`` becomes ``[x for x in it]``."""
    assert rewrite("rows = [r async for r in cur]\n") == "rows = [r for r in cur]\n"


def test_mapped_names_are_renamed_as_names_and_attributes() -> None:
    """Names of the table are renamed alone and after a dot; other names are kept."""
    src = """\
        async def f(conn: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool) -> None:
            await conn.aclose()
            await pool.__aenter__()
            await aprobe(conn)
            await arun_transaction(pool, work)
            MyAsyncThing()
        """
    assert rewrite(src) == textwrap.dedent("""\
        def f(conn: psycopg.Connection[Any], pool: ConnectionPool) -> None:
            conn.close()
            pool.__enter__()
            probe(conn)
            run_transaction(pool, work)
            MyAsyncThing()
        """)


def test_async_iteration_helpers_are_renamed() -> None:
    """``anext``/``aiter``, ``AsyncIterator``/``AsyncGenerator`` and the context manager."""
    src = """\
        @asynccontextmanager
        async def f(it) -> AsyncIterator[int]:
            yield await anext(aiter(it))
        """
    assert rewrite(src) == textwrap.dedent("""\
        @contextmanager
        def f(it) -> Iterator[int]:
            yield next(iter(it))
        """)


def test_strings_comments_and_docstrings_are_not_rewritten() -> None:
    """Only code tokens change: prose that names async things stays as written."""
    src = '''\
        async def f():  # calls aprobe
            """Async twin of :func:`probe`, await aprobe."""
            return "aprobe", f"{aprobe}"
        '''
    assert rewrite(src) == textwrap.dedent('''\
        def f():  # calls aprobe
            """Async twin of :func:`probe`, await aprobe."""
            return "aprobe", f"{aprobe}"
        ''')


def test_dotted_names_are_renamed_as_a_whole() -> None:
    """``asyncio.sleep``/``asyncio.Lock`` become ``time.sleep``/``threading.Lock``."""
    src = "async def f():\n    lock = asyncio.Lock()\n    await asyncio.sleep(1)\n"
    assert rewrite(src) == textwrap.dedent("""\
        import threading
        import time

        def f():
            lock = threading.Lock()
            time.sleep(1)
        """)


def test_dotted_names_after_a_dot_are_kept() -> None:
    """``x.asyncio.sleep`` is an attribute chain of ``x``: it is not renamed."""
    assert rewrite("x.asyncio.sleep(1)\n") == "x.asyncio.sleep(1)\n"


def test_awaitable_subscript_is_unwrapped() -> None:
    """``Awaitable[T]`` becomes ``T``, qualified or not, nested in other subscripts."""
    src = "f: Callable[[int], Awaitable[list[int]]]\ng: typing.Awaitable[T]\nh: Awaitable\n"
    assert rewrite(src) == "f: Callable[[int], list[int]]\ng: T\nh: Awaitable\n"


def test_awaitable_over_lines_keeps_parentheses() -> None:
    """An ``Awaitable[...]`` spanning lines keeps its content in parentheses, still valid."""
    assert rewrite("def f() -> Awaitable[\n    int\n]: ...\n") == "def f() -> (\n    int\n): ...\n"


def test_async_modules_in_imports_lose_the_suffix() -> None:
    """``from .pool_async``, ``import pgfailover.x_async`` and ``pgfailover.x_async.f``."""
    src = """\
        from .pool_async import ConnectionPool
        from psycopg_pool.pool_async import AddConnection as AsyncAddConnection
        import pgfailover.retry_async as r
        pgfailover.retry_async.arun_transaction
        other.retry_async
        """
    assert rewrite(src) == textwrap.dedent("""\
        from .pool import ConnectionPool
        from psycopg_pool.pool import AddConnection
        import pgfailover.retry as r
        pgfailover.retry.run_transaction
        other.retry_async
        """)


def test_all_entries_are_renamed() -> None:
    """The module's ``__all__`` names the sync functions; other strings keep theirs."""
    src = '__all__ = ["AsyncTransactionRunner", "arun_transaction", "other"]\nx = "aprobe"\n'
    assert rewrite(src) == (
        '__all__ = ["TransactionRunner", "run_transaction", "other"]\nx = "aprobe"\n'
    )


def test_pytest_asyncio_marks_are_removed() -> None:
    """``pytest.mark.asyncio`` goes as decorator (called or not) and from ``pytestmark``."""
    src = """\
        import pytest
        import pytest_asyncio

        pytestmark = [pytest.mark.asyncio, pytest.mark.integration]


        @pytest_asyncio.fixture
        async def conn():
            yield 1


        @pytest.mark.asyncio
        async def test_a(conn):
            pass


        @pytest.mark.asyncio(loop_scope="module")
        class TestB:
            pass
        """
    assert rewrite(src) == textwrap.dedent("""\
        import pytest
        import pytest_asyncio

        pytestmark = [pytest.mark.integration]


        @pytest.fixture
        def conn():
            yield 1


        def test_a(conn):
            pass


        class TestB:
            pass
        """)


# -- if True:  # ASYNC blocks -----------------------------------------------------------------


def test_async_block_keeps_the_else_branch_dedented() -> None:
    """In a function, the else branch replaces the whole ``if``, at the ``if``'s indentation."""
    src = """\
        async def f():
            before()
            if True:  # ASYNC
                await asyncio.sleep(1)
            else:
                # sync only
                block()  # blocking
            after()
        """
    assert rewrite(src) == textwrap.dedent("""\
        def f():
            before()
            # sync only
            block()  # blocking
            after()
        """)


def test_async_block_without_else_disappears() -> None:
    """Without ``else`` the ``if`` and its comments go; a block left empty gets ``pass``."""
    src = """\
        async def f():
            if True:  # ASYNC
                await g()
                # async only
            after()


        async def g():
            if True:  # ASYNC
                await f()
        """
    assert rewrite(src) == "def f():\n    after()\n\n\ndef g():\n    pass\n"


def test_async_block_in_a_class() -> None:
    """At class level the else branch may define methods, decorators and all."""
    src = """\
        class Pool:
            if True:  # ASYNC

                async def wait(self) -> None:
                    await self.event.wait()

            else:

                @property
                def ready(self) -> bool:
                    return True

            x = 1
        """
    assert rewrite(src) == textwrap.dedent("""\
        class Pool:

            @property
            def ready(self) -> bool:
                return True

            x = 1
        """)


def test_nested_async_blocks() -> None:
    """An ASYNC block inside another's else branch is resolved too."""
    src = """\
        def f():
            if True:  # ASYNC
                a()
            else:
                if True:  # ASYNC
                    b()
                else:
                    c()
        """
    assert rewrite(src) == "def f():\n    c()\n"


def test_async_block_leaves_multiline_strings_alone() -> None:
    """Dedenting the else branch does not change the text of a multi-line string."""
    src = (
        'def f():\n    if True:  # ASYNC\n        a()\n    else:\n        s = """x\n        y"""\n'
    )
    assert rewrite(src) == 'def f():\n    s = """x\n        y"""\n'


def test_async_block_with_elif_is_rejected() -> None:
    """``elif`` after an ASYNC block has no sync meaning: the conversion says so."""
    src = "if True:  # ASYNC\n    a()\nelif x:\n    b()\n"
    with pytest.raises(async_to_sync.ConversionError, match="plain multi-line else"):
        rewrite(src)


def test_plain_if_true_is_kept() -> None:
    """``if True:`` without the ASYNC comment is ordinary code."""
    assert rewrite("if True:\n    a()\nelse:\n    b()\n") == "if True:\n    a()\nelse:\n    b()\n"


# -- whole files ------------------------------------------------------------------------------

MODULE = '''\
# pgfailover: generate-sync
"""Module docstring naming aprobe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from .probe import aprobe


# a comment about f
async def f(conn: Any, work: Callable[[], Awaitable[int]]) -> AsyncIterator[int]:
    """Yield the work's result, then wait."""
    yield await work()  # the result
    await asyncio.sleep(0.1)
    await aprobe(conn)
'''


def test_header_comes_first_and_future_import_stays_valid() -> None:
    """The header, then the docstring, then ``from __future__``; the marker is dropped."""
    out = async_to_sync.convert(MODULE, "probe_loop_async.py")
    assert out.startswith(
        "# WARNING: this file is auto-generated by 'tools/async_to_sync.py'\n"
        "# from the original file 'probe_loop_async.py'\n"
        "# DO NOT CHANGE! Change the original file instead.\n"
        '\n"""Module docstring naming aprobe."""\n\nfrom __future__ import annotations\n'
    )
    assert "generate-sync" not in out
    compile(out, "probe_loop.py", "exec")


def test_ruff_drops_unused_imports_and_adds_needed_ones() -> None:
    """``asyncio`` and ``Awaitable`` go, ``time`` comes, imports are sorted and formatted."""
    assert convert(MODULE.removeprefix(MARKED)) == textwrap.dedent('''\
        """Module docstring naming aprobe."""

        from __future__ import annotations

        import time
        from collections.abc import Callable, Iterator

        from .probe import probe


        # a comment about f
        def f(conn: Any, work: Callable[[], int]) -> Iterator[int]:
            """Yield the work's result, then wait."""
            yield work()  # the result
            time.sleep(0.1)
            probe(conn)
        ''')


def test_sync_only_code_gets_its_imports() -> None:
    """``time.sleep`` written in an else branch gets ``import time`` like a renamed one."""
    src = """\
        import asyncio


        async def f():
            if True:  # ASYNC
                await asyncio.sleep(1)
            else:
                time.sleep(1)
        """
    assert convert(src) == "import time\n\n\ndef f():\n    time.sleep(1)\n"


def test_remaining_asyncio_is_an_error() -> None:
    """Async code the table cannot map must be put in an ASYNC block: the tool says so."""
    message = r"line 9 of the sync code \('asyncio.gather\(g\(\)\)'\) still uses asyncio"
    with pytest.raises(async_to_sync.ConversionError, match=message):
        convert("import asyncio\n\n\nasync def f():\n    await asyncio.gather(g())\n")


def test_await_inside_an_fstring_is_an_error() -> None:
    """Code inside f-strings is not rewritten, so an ``await`` there is reported."""
    with pytest.raises(async_to_sync.ConversionError, match=r"line 7 .* async code"):
        convert('async def f():\n    return f"{await g()}"\n')


def test_conversion_is_idempotent() -> None:
    """Converting twice gives the same text, and converting the twin again changes nothing."""
    once = async_to_sync.convert(MODULE, "m_async.py")
    assert async_to_sync.convert(MODULE, "m_async.py") == once
    assert async_to_sync.convert(once, "m_async.py") == once


def test_marker_must_be_near_the_top() -> None:
    """The marker is a comment line of its own within the first lines of the file."""
    assert async_to_sync.has_marker(MODULE)
    assert async_to_sync.has_marker('"""Doc."""\n#  pgfailover:  generate-sync\n')
    assert not async_to_sync.has_marker("x = 1  # pgfailover: generate-sync\n")
    assert not async_to_sync.has_marker("\n" * 30 + MARKED)


# -- command line -----------------------------------------------------------------------------


def make_tree(root: Path) -> tuple[Path, Path]:
    """A fake project: one marked source module, one marked and one unmarked test."""
    (root / "src" / "pgfailover").mkdir(parents=True)
    (root / "tests" / "unit").mkdir(parents=True)
    module = root / "src" / "pgfailover" / "loop_async.py"
    module.write_text(MODULE)
    test = root / "tests" / "unit" / "test_loop_async.py"
    test.write_text(MARKED + "async def test_a() -> None:\n    await aprobe(None)\n")
    (root / "tests" / "unit" / "test_other_async.py").write_text("async def test_b():\n    pass\n")
    return module, test


def test_generate_writes_marked_twins_only(tmp_path: Path) -> None:
    """Without FILES every marked source gets its twin; unmarked ones are left alone."""
    module, test = make_tree(tmp_path)
    assert async_to_sync.main(["--root", str(tmp_path)]) == 0
    assert module.with_name("loop.py").read_text().startswith("# WARNING")
    assert "def test_a() -> None:\n    probe(None)\n" in (test.parent / "test_loop.py").read_text()
    assert not (test.parent / "test_other.py").exists()


def test_check_exits_1_on_missing_or_stale_twins_and_0_when_current(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--check`` writes nothing, prints a diff and exits 1 until the twins are current."""
    module, _ = make_tree(tmp_path)
    twin = module.with_name("loop.py")
    assert async_to_sync.main(["--check", "--root", str(tmp_path)]) == 1
    assert not twin.exists()
    assert "+++ b/src/pgfailover/loop.py" in capsys.readouterr().out

    assert async_to_sync.main(["--root", str(tmp_path)]) == 0
    capsys.readouterr()
    assert async_to_sync.main(["--check", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""

    twin.write_text(twin.read_text() + "x = 1\n")
    assert async_to_sync.main(["--check", "--root", str(tmp_path), str(module)]) == 1
    assert "-x = 1" in capsys.readouterr().out
    assert twin.read_text().endswith("x = 1\n")


def test_explicit_unmarked_file_is_an_error(tmp_path: Path) -> None:
    """A FILES argument without the marker is refused with exit status 2."""
    make_tree(tmp_path)
    unmarked = tmp_path / "tests" / "unit" / "test_other_async.py"
    assert async_to_sync.main(["--root", str(tmp_path), str(unmarked)]) == 2
    assert not unmarked.with_name("test_other.py").exists()


def test_sync_path_drops_the_suffix() -> None:
    """``x/pool_async.py`` is generated as ``x/pool.py``; other names are refused."""
    assert async_to_sync.sync_path(Path("x/pool_async.py")) == Path("x/pool.py")
    with pytest.raises(async_to_sync.ConversionError):
        async_to_sync.sync_path(Path("x/pool.py"))
