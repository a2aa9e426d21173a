"""The ``simret`` command: a click group whose sub-commands load on demand.

Each command lives in its own module under ``simret.commands`` and imports torch/timm/faiss inside its
function body, so ``simret --help`` answers without importing any of them.
"""
from __future__ import annotations

import importlib
import logging
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional

import click

from simret import __version__
from simret.commands.options import DEVICE_METAVAR, check_device_name
from simret.utils.logs import setup_logging

# name → "module:function"; the order is the order of ``simret --help``
COMMANDS: Dict[str, str] = {
    "index": "simret.commands.index:index",
    "search": "simret.commands.search:search",
    "merge": "simret.commands.merge:merge",
    "serve": "simret.commands.serve:serve",
    "eval": "simret.commands.eval:evaluate",
    "fewshot": "simret.commands.fewshot:fewshot",
    "probe": "simret.commands.probe:probe",
    "classify": "simret.commands.classify:classify",
    "train": "simret.commands.train:train",
    "attention": "simret.commands.attention:attention",
    "demo": "simret.commands.demo:demo",
    "info": "simret.commands.info:info",
    "check": "simret.commands.check:check",
}


class LazyGroup(click.Group):
    """A click group that imports a sub-command's module only when that command is needed."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return [name for name in COMMANDS if _module_exists(COMMANDS[name])] + sorted(self.commands)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.commands:
            return self.commands[name]
        target = COMMANDS.get(name)
        if target is None or not _module_exists(target):
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            if ctx.obj is not None and getattr(ctx.obj, "verbosity", 0) > 0:
                raise
            raise click.ClickException(_one_message(err)) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _user_errors() -> tuple:
    """Exceptions that report bad input or a condition to fix (a message is enough; ``-v`` shows the traceback):
    also a writer lock held too long (``TimeoutError``) and a failed write (``DiskWriteError``: disk full …)."""
    from simret.utils.atomic import DiskWriteError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, KeyError, MemoryError, TimeoutError, DiskWriteError)


USER_ERRORS = _user_errors()


def _one_message(err: BaseException) -> str:
    if isinstance(err, MemoryError):  # e.g. --episodes 10000000000: numpy says how much it could not allocate
        return f"out of memory ({err or 'MemoryError'}): ask for less (episodes, batch size, image size)"
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text or type(err).__name__


def _module_exists(target: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(target.split(":")[0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "-V", "--version", prog_name="simret")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", count=True, help="Only warnings and errors on stderr; no progress bars.")
@click.option("--device", default="auto", show_default=True, metavar=DEVICE_METAVAR, callback=check_device_name,
              help="Where models run, unless a command's own --device says otherwise (auto: CUDA, then MPS, "
                   "then the CPU).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int, device: str) -> None:
    """simret: image retrieval and few-shot learning with SimPool-pooled timm encoders.

    \b
    Typical session:
      simret index photos/ --out idx/ --model resnet50 --weights timm
      simret search idx/ query.jpg -k 10
      simret eval roxford5k --data-root ~/data/revisitop --model resnet50 --weights timm
      simret fewshot ~/data/miniimagenet --shot 1,5 --method simpleshot,protonet
      simret demo              # everything above, offline, on embedded data

    Results go to stdout, logs and progress bars to stderr. Every command has its own --help.
    """
    verbosity = verbose - quiet
    setup_logging(verbosity)
    logging.captureWarnings(True)
    from simret.utils import progress

    progress.set_enabled(verbosity >= 0)
    ctx.obj = SimpleNamespace(verbosity=verbosity, device=device)


# services answer many small queries for days: glibc's default trimming keeps their memory flat, where keeping
# every freed block (what pays off for extraction over large images) let the server grow 17% in 1,000 queries
LONG_RUNNING = ("serve",)


def _command_name(argv: List[str]) -> Optional[str]:
    """The subcommand in ``argv`` (the first word that is neither an option nor ``--device``'s value), or None."""
    words = iter(argv)
    for word in words:
        if word == "--device":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user errors end with a one-line message and exit status 1 (2 for usage);
    Ctrl-C and SIGTERM stop the command the same way (what was computed is kept for the next run), with
    exit status 130 and 143."""
    from simret.utils.allocator import keep_freed_memory
    from simret.utils.signals import exit_status, terminate_like_interrupt

    if _command_name(sys.argv[1:] if argv is None else argv) not in LONG_RUNNING:
        keep_freed_memory()  # before torch allocates anything (SIMRET_MALLOC=default leaves glibc as it is)
    terminate_like_interrupt()
    try:
        code = cli.main(args=argv, prog_name="simret", standalone_mode=False)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:  # click turns Ctrl-C (and SIGTERM) into Abort
        cause = err if isinstance(err, KeyboardInterrupt) else err.__cause__
        if not isinstance(cause, KeyboardInterrupt):
            click.echo("Aborted!", err=True)
            sys.exit(1)
        click.echo("terminated" if exit_status(cause) == 143 else "interrupted", err=True)
        sys.exit(exit_status(cause))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
