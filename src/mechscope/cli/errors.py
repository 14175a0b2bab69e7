"""One error path for every `mechscope` command: foreseeable errors become one paragraph and exit code 2.

The root command group runs every subcommand (of every group: locate, steer, zoo, features...) through
:meth:`ErrorHandlingGroup.invoke`, so no command needs its own ``try``:

- a :class:`~mechscope.errors.MechscopeError` (wrong input, missing model, corrupt file...) prints its
  message, which already says what was expected and what came;
- an input file that is missing, a folder, unreadable or not UTF-8, and malformed JSON (with the file and
  line), print what happened to which file;
- anything else is a bug: the traceback is shown, followed by a line saying so, and the exit code is 1.

Click's own exits (``--help``, usage errors, ``typer.Exit``) pass through untouched.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import typer

from mechscope.cli.runs import RecordingGroup
from mechscope.errors import MechscopeError

#: The exit code of every foreseeable error (click uses 2 for usage errors too).
USER_ERROR = 2
BUG = 1
BUG_LINE = (
    "This is a bug in mechscope (an unexpected {kind}), not a problem with your input; please report it with the "
    "traceback above."
)


def describe(exc: BaseException) -> str | None:
    """The one-paragraph message for a foreseeable error, or None when `exc` is unexpected."""
    if isinstance(exc, MechscopeError):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    if isinstance(exc, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {exc.filename!r}" if exc.filename else str(exc)
    if isinstance(exc, IsADirectoryError):
        return f"expected a file, got a folder: {exc.filename!r}"
    if isinstance(exc, NotADirectoryError):
        return f"expected a folder, got a file: {exc.filename!r}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename!r}"
    return None


def _is_framework_exit(exc: BaseException) -> bool:
    """Click's and typer's own exceptions (help, usage errors, ``typer.Exit``): typer vendors click, so
    they are recognised by the module that defines them rather than by one click's classes."""
    module = type(exc).__module__
    return module.split(".")[0] in ("click", "typer")


class ErrorHandlingGroup(RecordingGroup):
    """The root group: records runs on ``--record`` (see :class:`RecordingGroup`) and handles every error."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True, fg="yellow")
            raise typer.Exit(code=130) from None
        except BrokenPipeError:
            # The reader went away (``mechscope ... | head``): nothing is wrong, and nothing more can be said.
            # Point stdout at /dev/null so the interpreter's final flush does not raise again.
            import contextlib
            import os

            with contextlib.suppress(OSError, ValueError, AttributeError):  # stdout may not be a file (tests)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(code=141) from None
        except Exception as exc:  # the one place that decides how an error reaches a CLI user
            if _is_framework_exit(exc):
                raise
            message = describe(exc)
            if message is None:
                traceback.print_exception(exc, file=sys.stderr)
                typer.secho(BUG_LINE.format(kind=type(exc).__name__), err=True, fg="red")
                raise typer.Exit(code=BUG) from exc
            typer.secho(f"error: {message}", err=True, fg="red")
            raise typer.Exit(code=USER_ERROR) from exc


__all__ = ["BUG", "USER_ERROR", "ErrorHandlingGroup", "describe"]
