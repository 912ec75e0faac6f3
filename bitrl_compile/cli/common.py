"""What every command shares: errors as one line and an exit code, and checks of common arguments.

Exit codes: 0 success; 1 bad input (one line on stderr, no traceback unless --debug); 2 internal error.
"""

from __future__ import annotations

import sys
import traceback

import click

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)


def fail(e: BaseException, debug: bool) -> None:
    """Report `e` in one line on stderr and exit: 1 for bad input (the message names the fix), 2 for a bug."""
    from bitrl_compile.loaded import ModelLoadError
    from bitrl_compile.pipeline import CompileError

    if debug:
        traceback.print_exc()
    user_error = isinstance(e, USER_ERRORS + (CompileError, ModelLoadError))
    if isinstance(e, RuntimeError) and not isinstance(e, CompileError) and "install" in str(e):
        user_error = True  # a missing tool: the message says what to install
    name = "error" if user_error else "internal error"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    click.echo(f"bitrl-compile: {name}: {text}", err=True)
    if not user_error and not debug:
        click.echo("(rerun with --debug for the traceback, and please report it)", err=True)
    sys.exit(1 if user_error else 2)


def guard(debug: bool):
    """`with guard(debug):` around a command's body: an exception becomes one line and exit code 1 or 2,
    Ctrl-C exit code 130."""

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, kind, e, tb):
            if e is None or isinstance(e, (SystemExit, click.exceptions.Exit, click.ClickException)):
                return False
            if isinstance(e, KeyboardInterrupt):
                click.echo("bitrl-compile: interrupted; nothing was written", err=True)
                sys.exit(130)
            fail(e, debug)
            return True

    return _Ctx()


def widths(text: str) -> tuple[int, ...]:
    """--hidden's comma-separated layer widths."""
    try:
        sizes = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"--hidden {text!r}: give comma-separated integers, e.g. 64,64") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--hidden {text!r}: widths must be positive integers")
    return sizes


def check_env(env_id: str) -> None:
    import gymnasium

    if env_id not in gymnasium.registry:
        raise ValueError(f"unknown environment {env_id!r}; give a gymnasium id such as CartPole-v1")

