"""The `calofm` command line. Side effects live here: everything below it is importable library code."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from typer.core import TyperGroup

_DEBUG = {"on": bool(os.environ.get("CALOFM_DEBUG"))}


class _Group(TyperGroup):
    """Errors are one line naming the file, key or value; `--debug` (or CALOFM_DEBUG=1) shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise  # --help and friends: typer's own handling (typer.Exit is a RuntimeError)
        except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
            if _DEBUG["on"]:
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Group, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Foundation models of calorimeter showers: pretrain, distill, adapt, generate, evaluate, "
                       "export.")
data_app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                       help="Shower files: synthesise, inspect, convert, share.")
app.add_typer(data_app, name="data")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    if debug:
        _DEBUG["on"] = True


SetOpt = typer.Option(None, "--set", help="Override a recipe key: dotted.key=value (repeatable).")


@data_app.command("synth")
def data_synth(
    detector: str | None = typer.Option(None, "--detector", help="One detector (see calofm.geometry)."),
    all_: bool = typer.Option(False, "--all", help="All five detectors."),
    n: int = typer.Option(..., "--n", min=1, help="Showers per detector."),
    seed: int = typer.Option(0, "--seed", help="Run seed; each detector's stream derives from it and its name."),
    out: Path = typer.Option(..., "--out", help="Folder for <detector>.h5 (LEMURS format)."),
) -> None:
    """Synthesise GFlash-parametrised stand-in showers (not Geant4), one LEMURS file per detector."""
    from calofm.data.synthetic import synthesize
    from calofm.geometry import DETECTORS

    if all_ == (detector is not None):
        raise ValueError("give exactly one of --detector NAME or --all")
    for path in synthesize(out, list(DETECTORS) if all_ else [detector], n, seed, progress=True):
        typer.echo(f"wrote {path}")


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
             set_: list[str] | None = SetOpt,
             resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output_dir.")):
    """Multi-detector EDM pretraining (1..N processes: run under torchrun or accelerate launch)."""
    from calofm.config import load_config
    from calofm.train.pretrain import pretrain as run

    out = run(load_config(recipe, set_), resume=resume)
    typer.echo(f"model saved to {out}")


@app.command()
def distill(recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/distill-tiny.yaml"),
            teacher: str | None = typer.Option(None, "--teacher",
                                                  help="EDM model folder or Hub repo id (overrides distill.teacher)."),
            set_: list[str] | None = SetOpt,
            resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output_dir.")):
    """Consistency distillation of an EDM model into a 1-step sampler (saves the target network)."""
    from calofm.config import load_config
    from calofm.train.distill import distill as run

    cfg = load_config(recipe, set_)
    if teacher is not None:
        cfg.distill.teacher = teacher
    out = run(cfg, resume=resume)
    typer.echo(f"model saved to {out}")


@app.command()
def adapt(recipe: Path | None = typer.Argument(None, help="YAML recipe, e.g. recipes/adapt-lora.yaml (optional)."),
          pretrained: str | None = typer.Option(None, "--pretrained",
                                                help="Folder holding edm/ and cd/, or an EDM model folder/repo id."),
          pretrained_cd: str | None = typer.Option(None, "--pretrained-cd",
                                                   help="Pretrained CD model, when --pretrained is an EDM model."),
          detector: str | None = typer.Option(None, "--detector", help="The new detector's name."),
          data: str | None = typer.Option(None, "--data", help="Its showers: file, folder or Hub dataset."),
          mode: str | None = typer.Option(None, "--mode", help="full | lora | conditioning"),
          n_train: int | None = typer.Option(None, "--n-train", min=1, help="Use the first N showers (default: all)."),
          out: Path | None = typer.Option(None, "--out", help="Output folder (overrides output_dir)."),
          set_: list[str] | None = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted adaptation in its folder.")):
    """Adapt a pretrained model to a new detector in a free slot: EDM fine-tuning, then CD distillation.

    Options override the recipe. Without a recipe, output_dir is runs/adapt-DETECTOR-MODE and the learning rate
    the mode's default (full 1e-4, lora and conditioning 1e-3)."""
    from calofm.config import load_config
    from calofm.train.adapt import adapt as run
    from calofm.train.adapt import default_run

    cfg = load_config(recipe, set_)
    flags = {"pretrained": pretrained, "pretrained_cd": pretrained_cd, "detector": detector, "data": data,
             "mode": mode, "n_train": n_train}
    for key, value in flags.items():
        if value is not None:
            setattr(cfg.adapt, key, value)
    if out is not None:
        cfg.output_dir = str(out)
    if recipe is None:
        cfg = default_run(cfg, {s.split("=", 1)[0].strip() for s in set_ or []} | ({"output_dir"} if out else set()))
    folder = run(cfg, resume=resume)
    saved = [str(folder / stage) for stage in ("edm", "cd") if (folder / stage).is_dir()]
    typer.echo(f"adapted models saved to {' and '.join(saved)}")


@app.command()
def generate(model: str = typer.Option(..., "--model", help="Model folder or Hub repo id."),
             detector: str = typer.Option(..., "--detector", help="Detector name (must be in the model's slot map)."),
             n: int = typer.Option(1000, "--n", min=1, help="Number of showers (ignored with --conditions)."),
             energy: float | None = typer.Option(None, "--energy", help="Fixed incident energy in GeV."),
             theta: float | None = typer.Option(None, "--theta", help="Fixed polar angle in rad."),
             phi: float | None = typer.Option(None, "--phi", help="Fixed azimuth in rad."),
             conditions: Path | None = typer.Option(None, "--conditions",
                                                       help="Take (E, theta, phi) from this shower file."),
             steps: int | None = typer.Option(None, "--steps", min=1, help="Sampler steps (default: the model's)."),
             batch_size: int = typer.Option(256, "--batch-size", min=1),
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
         quick: bool = typer.Option(False, "--quick", help="Fewer showers and steps (a smoke run)."),
         pretrain: bool = typer.Option(False, "--pretrain", help="Pretrain and distil from scratch instead of "
                                       "adapting the shipped foundation model.")):
    """What a user does, on embedded synthetic data: adapt the shipped foundation model to a new detector,
    distil, evaluate; a report with plots."""
    from calofm.demo import run_demo

    report = run_demo(out, quick=quick, pretrain=pretrain)
    typer.echo(f"demo report: {report}")


@app.command()
def evaluate(reference: Path = typer.Option(..., "--reference", help="Reference shower file (LEMURS or CaloChallenge)."),
             generated: Path = typer.Option(..., "--generated", help="Generated shower file (LEMURS or CaloChallenge)."),
             out: Path = typer.Option(..., "--out", help="Folder for metrics.json, the PNG plots and report.md."),
             metrics: list[str] | None = typer.Option(
                 None, "--metrics", help="Comma-separated or repeated, from: observables, fpd, kpd (calofm's FPD/KPD), "
                 "fpd_cc, kpd_cc (the CaloChallenge's), auc_low, auc_high, prdc, fixed_points (default: all)."),
             detector: str | None = typer.Option(None, "--detector", help="Detector name for the report "
                                                    "(default: the files' `detector` attribute)."),
             point: list[str] | None = typer.Option(
                 None, "--point", help="Fixed point 'E_GeV,theta[,phi]' to compare at (repeatable; default: the "
                 "shared conditions of fixed-point files, else 10 and 50 GeV at normal incidence and 50 GeV at 1.2 rad)."),
             max_showers: int | None = typer.Option(None, "--max-showers", min=1, help="Use only the first N showers of each file."),
             seed: int = typer.Option(0, "--seed")):
    """Compare generated showers with reference showers: observables, FPD, KPD (calofm's and the CaloChallenge's
    definitions), classifier AUCs, PRDC."""
    import warnings

    from calofm.evaluate.report import evaluate as run

    points = None
    if point:
        points = []
        for p in point:
            try:
                v = [float(t) for t in p.split(",")]
            except ValueError:
                v = []
            if len(v) not in (2, 3):
                raise ValueError(f"--point {p!r}: expected 'E_GeV,theta' or 'E_GeV,theta,phi' (numbers)")
            points.append((v[0] * 1e3, v[1], v[2] if len(v) == 3 else None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same notes come back in the result and are printed below
        result = run(reference, generated, out, metrics=metrics, detector=detector, fixed_points=points,
                     max_showers=max_showers, seed=seed)
    for note in result["warnings"]:
        typer.echo(f"warning: {note}", err=True)
    for key in ("auc_low", "auc_high"):
        if key in result:
            typer.echo(f"{key}: {result[key]:.4f}")
    for key in ("fpd_cc", "kpd_cc", "fpd", "kpd"):
        if key in result:
            typer.echo(f"{key} x 1e3: {result[key]['value'] * 1e3:.4g} +- {result[key]['error'] * 1e3:.2g}  "
                       f"[{result[key]['definition']}]")
    if "prdc" in result:
        typer.echo("prdc: " + ", ".join(f"{k} {v:.3f}" for k, v in result["prdc"].items()))
    typer.echo(f"report: {Path(out) / 'report.md'}")


# ------------------------------------------------------------------------------------------- export to Geant4


@app.command("export")
def export_cmd(model: str = typer.Argument(..., metavar="DIR",
                                           help="Model folder (config.json + model.safetensors) or Hub repo id."),
               fmt: str = typer.Option(..., "--format", help="onnx | torchscript"),
               device: str = typer.Option("cpu", "--device", help="cpu | cuda: where the graph will run (ONNX: the "
                                          "execution providers recorded); the graph itself runs on either."),
               batch: int | None = typer.Option(None, "--batch", min=1, help="Fixed batch size (default 1: the Par04 contract)."),
               dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="A free batch axis instead."),
               steps: int | None = typer.Option(None, "--steps", min=1, help="Sampler steps unrolled into the graph "
                                                "(default: CD 1, EDM the model's)."),
               new_detector: str | None = typer.Option(None, "--new-detector", help="Adapted detector for the "
                                                       "contract's 'new' slot, when the model has several."),
               out: Path = typer.Option(..., "--out", help="File to write; its contract JSON goes to OUT.json.")):
    """Export one graph with Geant4's Par04 contract: (B, 8) [E GeV, phi, theta, one-hot(5)] -> (B, 6480) GeV."""
    import warnings

    from calofm.export import export, sidecar_path

    if batch is not None and dynamic_batch:
        raise ValueError("--batch and --dynamic-batch exclude each other")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        path = export(model, out, fmt, device=device, batch=batch or 1, dynamic_batch=dynamic_batch, steps=steps,
                      new_detector=new_detector)
    for w in caught:
        if issubclass(w.category, UserWarning):
            typer.echo(f"warning: {w.message}", err=True)
    typer.echo(f"wrote {path} ({fmt}, device {device}) and its contract {sidecar_path(path)}")


# ------------------------------------------------------------------------------------------- sharing on the Hub


@app.command("push")
def push(model_dir: Path = typer.Argument(..., metavar="DIR", help="Saved model folder (config.json + model.safetensors)."),
         repo_id: str = typer.Option(..., "--repo-id", help="Hub model repo OWNER/NAME (created if missing)."),
         private: bool = typer.Option(False, "--private", help="Create the repo private."),
         revision: str | None = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
         metrics: Path | None = typer.Option(None, "--metrics",
                                                help="metrics.json to show in the card (default: DIR/metrics.json)."),
         keep_card: bool = typer.Option(False, "--keep-card", help="Upload DIR/README.md as is, not re-rendered.")):
    """Upload a model folder to the Hugging Face Hub with its model card (token: HF_TOKEN or `hf auth login`)."""
    from calofm.hub import push_model

    url = push_model(model_dir, repo_id, private=private or None, revision=revision, metrics=metrics,
                     keep_card=keep_card)
    typer.echo(f"pushed {model_dir} to {repo_id}: {url}")


@data_app.command("push")
def data_push(data_dir: Path = typer.Argument(..., metavar="DIR", help="Folder of shower files (<detector>.h5)."),
              repo_id: str = typer.Option(..., "--repo-id", help="Hub dataset repo OWNER/NAME (created if missing)."),
              private: bool = typer.Option(False, "--private", help="Create the repo private."),
              revision: str | None = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
              license: str = typer.Option("cc-by-4.0", "--license", help="License id for the dataset card.")):
    """Share a folder of shower files as a Hub dataset with a dataset card; train on it with data.dir=OWNER/NAME."""
    from calofm.hub import push_dataset

    url = push_dataset(data_dir, repo_id, private=private or None, revision=revision, license=license)
    typer.echo(f"pushed {data_dir} to dataset {repo_id}: {url}")


def main() -> None:  # `python -m calofm.cli`
    app()


if __name__ == "__main__":
    main()
