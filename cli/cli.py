"""The `fusedit` command line: one sub-command group per concern, user errors as one line + exit 2."""
from __future__ import annotations

import sys
from importlib import import_module

import typer

from fusedit.errors import UserError, one_line

# sub-command group name -> module holding a `typer.Typer` called `app`
GROUPS = {
    "model": "fusedit.model.cli",
    "data": "fusedit.components.data.cli",
    "cache": "fusedit.components.cache.cli",
    "eval": "fusedit.components.evaluate.cli",
    "pipeline": "fusedit.pipelines.cli",
    "ablate": "fusedit.components.ablate.cli",
}
# commands added to a group from a higher layer: (group, name) -> (module, function)
GROUP_COMMANDS = {
    ("ablate", "compile"): ("fusedit.pipelines.ablation_cli", "compile_cmd"),
}
# top-level commands: name -> (module, function)
COMMANDS = {
    "generate": ("fusedit.model.cli", "generate"),
    "train": ("fusedit.components.train.cli", "train_command"),
}

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _register() -> None:
    """Add every group and command to `app` once per process (`main` may be called many times in one)."""
    if app.registered_groups or app.registered_commands:
        return
    groups = {name: import_module(module).app for name, module in GROUPS.items()}
    for (group, name), (module, func) in GROUP_COMMANDS.items():
        groups[group].command(name)(getattr(import_module(module), func))
    for name, group_app in groups.items():
        app.add_typer(group_app, name=name)
    for name, (module, func) in COMMANDS.items():
        app.command(name)(getattr(import_module(module), func))


def _user_error_line(exc: BaseException) -> str | None:
    """The one line a user sees for a mistake they can fix, or None for an internal error."""
    from pydantic import ValidationError

    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, ValidationError):
        errs = exc.errors()
        where = ".".join(str(p) for p in errs[0]["loc"]) if errs else "?"
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        return f"invalid {exc.title} field '{where}': {errs[0]['msg'] if errs else exc}{more}"
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or exc}"
    return None


def _usage_line(exc) -> str:
    """click's message plus where to look, instead of its multi-line usage banner."""
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return one_line(exc.format_message()) + hint


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        code = app(args=argv, standalone_mode=False)  # non-standalone click returns typer.Exit codes
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - classify, then re-raise internal errors
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        if isinstance(exc, typer.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, NoArgsIsHelpError):
            exc.show()
            sys.exit(0)
        if isinstance(exc, ClickException):  # usage errors: bad or missing options, as one line
            print(f"error: {_usage_line(exc)}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, typer.Abort | KeyboardInterrupt):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        line = _user_error_line(exc)
        if line is None:
            print(f"fusedit: internal error ({type(exc).__name__}); traceback follows", file=sys.stderr)
            raise
        print(f"error: {one_line(line)}", file=sys.stderr)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)
