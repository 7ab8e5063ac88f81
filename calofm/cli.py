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


@data_app.command("inspect")
def data_inspect(
    file: Path = typer.Argument(..., help="LEMURS or CaloChallenge dataset-2 HDF5 file."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write profile and response PNGs into DIR."),
) -> None:
    """Summarise a shower file (conditions, E_dep/E_inc, sparsity, profiles), streaming over chunks."""
    from calofm.data.inspect import format_summary, plot_summary, summarize

    summary = summarize(file)
    typer.echo(format_summary(summary))
    for path in plot_summary(summary, plot) if plot is not None else []:
        typer.echo(f"wrote {path}")


@data_app.command("convert")
def data_convert(
    src: Path = typer.Argument(..., metavar="IN", help="Shower file, LEMURS or CaloChallenge (auto-detected)."),
    dst: Path = typer.Argument(..., metavar="OUT", help="File to write (atomically)."),
    to: str = typer.Option(..., "--to", help="Output format: lemurs | calochallenge."),
) -> None:
    """Convert between LEMURS and CaloChallenge dataset-2 HDF5, streaming, keeping the file attributes."""
    from calofm.data.formats import convert, open_showers

    convert(src, dst, to)
    with open_showers(dst) as f:
        typer.echo(f"wrote {dst}: {len(f)} showers, format {f.format}, detector {f.detector or 'unknown'}")


# ------------------------------------------------------------------------------------------- training, sampling


@app.command()
def pretrain(recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/pretrain-tiny.yaml"),
             set_: Optional[list[str]] = SetOpt,
             resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output_dir.")):
    """Multi-detector EDM pretraining (1..N processes: run under torchrun or accelerate launch)."""
    from calofm.config import load_config
    from calofm.train.pretrain import pretrain as run

    out = run(load_config(recipe, set_), resume=resume)
    typer.echo(f"model saved to {out}")


@app.command()
def generate(model: str = typer.Option(..., "--model", help="Model folder or Hub repo id."),
             detector: str = typer.Option(..., "--detector", help="Detector name (must be in the model's slot map)."),
             n: int = typer.Option(1000, "--n", help="Number of showers (ignored with --conditions)."),
             energy: Optional[float] = typer.Option(None, "--energy", help="Fixed incident energy in GeV."),
             theta: Optional[float] = typer.Option(None, "--theta", help="Fixed polar angle in rad."),
             phi: Optional[float] = typer.Option(None, "--phi", help="Fixed azimuth in rad."),
             conditions: Optional[Path] = typer.Option(None, "--conditions",
                                                       help="Take (E, theta, phi) from this shower file."),
             steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the model's)."),
             batch_size: int = typer.Option(256, "--batch-size"),
             seed: int = typer.Option(0, "--seed"),
             fmt: str = typer.Option("lemurs", "--format", help="lemurs | calochallenge"),
             out: Path = typer.Option(..., "--out", help="Output HDF5 file.")):
    """Generate showers for one detector. Unset conditions are drawn uniformly over the detector's ranges.

    Under torchrun the showers are split over the processes and gathered into one file."""
    from calofm.generate import generate_to_file

    path = generate_to_file(model, detector, out, n=n, energy_gev=energy, theta=theta, phi=phi,
                            conditions=conditions, steps=steps, batch_size=batch_size, seed=seed, fmt=fmt)
    if path is not None:
        typer.echo(f"wrote {path}")


@app.command()
def info(model: str = typer.Argument(..., help="A model folder, Hub repo id, or preset name (paper|small|tiny).")):
    """Parameters, FLOPs per forward, slot map and normaliser of a model or preset."""
    from calofm.models.summary import describe

    typer.echo(describe(model))


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for data, models and the report."),
         quick: bool = typer.Option(False, "--quick", help="Fewer showers and steps (a smoke run).")):
    """The whole workflow on embedded synthetic data, ending in a report with plots."""
    from calofm.demo import run_demo

    report = run_demo(out, quick=quick)
    typer.echo(f"demo report: {report}")


def main() -> None:  # `python -m calofm.cli`
    app()


if __name__ == "__main__":
    main()
