"""The `calofm` command line. Side effects live here: everything below it is importable library code."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

_DEBUG = {"on": bool(os.environ.get("CALOFM_DEBUG"))}


class _App(typer.Typer):
    """Errors are one line naming the file, key or value; `--debug` (or CALOFM_DEBUG=1) shows the traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
            if _DEBUG["on"]:
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            typer.echo(f"error: {msg}", err=True)
            sys.exit(2)


app = _App(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
           help="Foundation models of calorimeter showers: pretrain, distill, adapt, generate, evaluate, export.")
data_app = _App(add_completion=False, no_args_is_help=True, help="Shower files: synthesise, inspect, convert, share.")
app.add_typer(data_app, name="data")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    if debug:
        _DEBUG["on"] = True


SetOpt = typer.Option(None, "--set", help="Override a recipe key: dotted.key=value (repeatable).")


def main() -> None:  # `python -m calofm.cli`
    app()


if __name__ == "__main__":
    main()
