"""What every command shares: errors as one line and an exit code, signals, broken pipes, folders made for output,
and checks of common arguments.

Exit codes (the table in cli/__init__.py and the README):
    0    success
    1    bad input: a file, a name or a value the command cannot use (one line on stderr, --debug: traceback)
    2    usage error: click's own checks of the command line (no arguments, an unknown option or command, a
         missing or malformed option value, a count out of range)
    3    internal error: a bug (one line and a request to report it; --debug: traceback)
    130  interrupted by Ctrl-C; 128+N when stopped by signal N (143 SIGTERM, 129 SIGHUP), as a shell reports
         a process that signal killed. Nothing partial is left: a file being written is removed.
    141  stdout closed early (`bitrl-compile inspect x.bitrl | head -1`): quietly, as coreutils and git (SIGPIPE)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

OK, BAD_INPUT, USAGE, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 130
BROKEN_PIPE = 128 + signal.SIGPIPE  # 141
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what `timeout`, systemd, CI and a closed terminal send

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that it unwinds as for Ctrl-C: `write_atomic` removes
    its temporary file, `finally` blocks run."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _is_user_error(e: BaseException) -> bool:
    from bitrl_compile.loaded import ModelLoadError
    from bitrl_compile.pipeline import CompileError

    if isinstance(e, USER_ERRORS + (CompileError, ModelLoadError)):
        return True
    return isinstance(e, RuntimeError) and "install" in str(e)  # a missing tool: the message says what to install


def exit_code(e: BaseException) -> int:
    """The exit code the CLI gives for `e` (the table above)."""
    if isinstance(e, KeyboardInterrupt):
        return 128 + getattr(e, "signum", signal.SIGINT)
    if isinstance(e, BrokenPipeError):
        return BROKEN_PIPE
    if isinstance(e, click.ClickException):
        return e.exit_code  # UsageError and BadParameter: 2
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else OK if e.code is None else BAD_INPUT
    return BAD_INPUT if _is_user_error(e) else INTERNAL


def fail(e: BaseException, debug: bool) -> None:
    """Report `e` in one line on stderr and exit: 1 for bad input (the message names the fix), 3 for a bug."""
    if debug:
        traceback.print_exc()
    code = exit_code(e)
    name = "error" if code == BAD_INPUT else "internal error"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    click.echo(f"bitrl-compile: {name}: {text}", err=True)
    if code != BAD_INPUT and not debug:
        click.echo("(rerun with --debug for the traceback, and please report it)", err=True)
    sys.exit(code)


def interrupted(e: KeyboardInterrupt) -> None:
    """One line and exit 130 (Ctrl-C) or 128 + the signal's number."""
    signum = getattr(e, "signum", signal.SIGINT)
    how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    try:
        click.echo(f"bitrl-compile: interrupted ({how}); no partial file was left", err=True)
    except OSError:
        pass
    sys.exit(128 + signum)


def broken_pipe() -> None:
    """The reader of stdout went away (`| head`): exit 141 without a word, and without Python's complaint at
    shutdown when it flushes the dead stdout."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass  # not a real file (click's test runner)
    sys.exit(BROKEN_PIPE)


@contextmanager
def stop_signals_interrupt():
    """While the CLI runs, SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt) as Ctrl-C does, so a
    compile killed by `timeout` or systemd unwinds and leaves nothing partial. The previous handlers come back
    afterwards; outside the main thread (where Python cannot handle signals) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def warnings_as_lines():
    """While the CLI runs, a warning is one line, `bitrl-compile: warning: MESSAGE`, as errors are, instead of
    Python's default (the file and line of our code that warned, then its source line)."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split("\n")).strip()
        click.echo(f"bitrl-compile: warning: {text}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def guard(debug: bool):
    """`with guard(debug):` around a command's body: an exception becomes one line and exit code 1 or 3,
    an interrupt 130 (or 128 + signal), a closed stdout a quiet 141."""

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, kind, e, tb):
            if e is None or isinstance(e, (SystemExit, click.exceptions.Exit, click.ClickException)):
                return False
            if isinstance(e, KeyboardInterrupt):
                interrupted(e)
            if isinstance(e, BrokenPipeError):
                broken_pipe()
            fail(e, debug)
            return True

    return _Ctx()


@contextmanager
def removed_if_failed(*folders: str | os.PathLike):
    """Folders that do not exist yet (and their missing parents), which the command is about to create: if it
    fails, those left empty are removed again, so a failed command leaves no empty folder behind."""
    missing: list[Path] = []
    for folder in folders:
        p = Path(folder).absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)  # deepest first
            p = p.parent
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            for p in missing:
                try:
                    p.rmdir()
                except OSError:
                    pass  # not empty (the command's logs or results), or not there
        raise


def option_value(parse):
    """A click callback from `parse(text)`: its ValueError becomes click's BadParameter (a usage error, exit 2)."""

    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return callback


def batch_sizes(text: str) -> list[int]:
    """--batch's comma-separated batch sizes, each at least 1."""
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"expected batch sizes of at least 1, got {text!r}")
    return sizes


def widths(text: str) -> tuple[int, ...]:
    """--hidden's comma-separated layer widths."""
    try:
        sizes = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: give comma-separated integers, e.g. 64,64") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{text!r}: widths must be positive integers")
    return sizes


def check_env(env_id: str) -> None:
    import gymnasium

    if env_id not in gymnasium.registry:
        raise ValueError(f"unknown environment {env_id!r}; give a gymnasium id such as CartPole-v1")
