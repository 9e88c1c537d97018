"""The ``lpm`` command line. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

import typer
from rich.console import Console
from rich.markup import escape

from lpm.errors import Interrupted, LpmError

app = typer.Typer(
    name="lpm",
    help="Large Population Models: millions of tensor agents whose decisions come from a local LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: Modules of lpm.cli that each define ``register(app)``; listed here, imported in this order.
COMMAND_MODULES = [
    "population",
    "archetypes",
    "scenarios",
    "serve",
    "run",
    "calibrate",
    "compare",
    "sensitivity",
    "decide",
    "probe",
    "cache",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"lpm.cli.{_name}").register(app)

err_console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI; lpm's own errors print as one message (no traceback) and exit 2.

    Set ``LPM_DEBUG=1`` to see tracebacks.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # SIGTERM unwinds like Ctrl-C: child servers are stopped
    try:
        app(args=argv, prog_name="lpm")  # standalone: usage errors print and exit 2 themselves
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except LpmError as exc:
        if os.environ.get("LPM_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        return 130 if isinstance(exc, Interrupted) else 2
    except OSError as exc:  # a write that failed where no command checked (full disk, permissions)
        if os.environ.get("LPM_DEBUG") or exc.filename is None:
            raise
        from lpm.paths import os_error

        error = os_error(exc.filename, exc, "a file")
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("aborted")
        return 130
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
