"""The `calofm` command line. Side effects live here: everything below it is importable library code."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

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
        except typer.TyperException as e:  # typer's click: a bad option value is one line too, with where to look
            if _DEBUG["on"] or not hasattr(e, "format_message"):
                raise
            ctx_ = getattr(e, "ctx", None)
            where = f" (see: {ctx_.command_path} --help)" if ctx_ is not None else ""
            typer.echo(f"error: {e.format_message()}{where}", err=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
            if _DEBUG["on"]:
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Group, add_completion=True, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Foundation models of calorimeter showers: pretrain, distill, adapt, generate, evaluate, "
                       "export.")
data_app = typer.Typer(cls=_Group, add_completion=True, no_args_is_help=True,
                       help="Shower files: synthesise, inspect, convert, share.")
app.add_typer(data_app, name="data")


def _version(show: bool) -> None:
    if show:
        from calofm import __version__

        typer.echo(f"calofm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    from calofm.memory import keep_freed_memory

    keep_freed_memory()  # every command runs batch loops: keep their freed buffers (calofm/memory.py)
    if debug:
        _DEBUG["on"] = True


SetOpt = typer.Option(None, "--set", help="Override a recipe key: dotted.key=value (repeatable).")


@data_app.command("synth")
def data_synth(
    detector: str | None = typer.Option(None, "--detector", help="One detector (see calofm.geometry)."),
    all_: bool = typer.Option(False, "--all", help="All five detectors."),
    n: int = typer.Option(..., "--num-showers", "-n", "--n", min=1, help="Showers per detector."),
    seed: int = typer.Option(0, "--seed", help="Run seed; each detector's stream derives from it and its name."),
    out: Path = typer.Option(..., "--out", help="Folder for <detector>.h5 (LEMURS format)."),
    particle: list[str] = typer.Option(["photon"], "--particle",
                                       help="photon | electron | pion; repeat it for a file of several, each "
                                            "shower's drawn uniformly (its PDG code in the file)."),
    spectrum: str = typer.Option("uniform", "--spectrum",
                                 help="Incident energy: uniform (as LEMURS), log-uniform (equal showers per decade, "
                                      "for resolution studies) or mixed (each shower one or the other: training "
                                      "showers at every energy, benchmarks/fidelity.md)."),
) -> None:
    """Synthesise GFlash-parametrised stand-in showers (not Geant4), one LEMURS file per detector.

    Example: calofm data synth --all --n 5000 --seed 1 --out data/synthetic"""
    from calofm.data.synthetic import synthesize
    from calofm.geometry import DETECTORS
    from calofm.particles import particle_code

    if all_ == (detector is not None):
        raise ValueError("give exactly one of --detector NAME or --all")
    for name in particle:
        particle_code(name)  # an unknown name is an error before anything is written
    for path in synthesize(out, list(DETECTORS) if all_ else [detector], n, seed, progress=True, particles=particle,
                           spectrum=spectrum):
        typer.echo(f"wrote {path}")


@data_app.command("inspect")
def data_inspect(
    file: Path = typer.Argument(..., help="LEMURS or CaloChallenge dataset-2 HDF5 file."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write profile and response PNGs into DIR."),
) -> None:
    """Summarise a shower file (conditions, E_dep/E_inc, sparsity, profiles), streaming over chunks.

    Example: calofm data inspect data/synthetic/odd.h5 --plot plots/"""
    from calofm.data.inspect import format_summary, plot_summary, summarize

    summary = summarize(file)
    typer.echo(format_summary(summary))
    for path in plot_summary(summary, plot) if plot is not None else []:
        typer.echo(f"wrote {path}")


@data_app.command("convert")
def data_convert(
    src: Path = typer.Argument(..., metavar="IN",
                               help="Shower file, LEMURS, CaloChallenge or point cloud (auto-detected)."),
    dst: Path = typer.Argument(..., metavar="OUT", help="File to write (atomically)."),
    to: Literal["lemurs", "calochallenge", "pointcloud"] = typer.Option(..., "--to", help="Output format."),
) -> None:
    """Convert between LEMURS, CaloChallenge dataset-2 and point-cloud HDF5 (x, y, z, E hits in mm and MeV, for
    CaloClouds-style consumers), streaming, keeping the file attributes.

    Example: calofm data convert data/synthetic/odd.h5 odd_points.h5 --to pointcloud"""
    from calofm.data.formats import convert, open_showers

    convert(src, dst, to)
    with open_showers(dst) as f:
        typer.echo(f"wrote {dst}: {len(f)} showers, format {f.format}, detector {f.detector or 'unknown'}")


# ------------------------------------------------------------------------------------------- training, sampling


@app.command()
def pretrain(recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/pretrain-tiny.yaml"),
             set_: list[str] | None = SetOpt,
             resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output_dir.")):
    """Multi-detector EDM pretraining (1..N processes: run under torchrun or accelerate launch).

    Example: calofm pretrain recipes/pretrain-tiny.yaml --set train.steps=2000 --set data.dir=data/synthetic"""
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
    """Consistency distillation of an EDM model into a 1-step sampler (saves the target network).

    Example: calofm distill recipes/distill-tiny.yaml --teacher runs/pretrain-tiny/model"""
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
          mode: Literal["full", "lora", "conditioning"] | None = typer.Option(
              None, "--mode", help="What to train: every weight, LoRA adapters, or the conditioning only."),
          n_train: int | None = typer.Option(None, "--n-train", min=1, help="Use the first N showers (default: all)."),
          particle: str | None = typer.Option(None, "--particle", help="Add this particle (photon | electron | pion) "
                                              "in a free particle slot; --detector may be one the model knows."),
          out: Path | None = typer.Option(None, "--out", help="Output folder (overrides output_dir)."),
          set_: list[str] | None = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted adaptation in its folder.")):
    """Adapt a pretrained model to a new detector in a free slot: EDM fine-tuning, then CD distillation.

    Options override the recipe. Without a recipe, output_dir is runs/adapt-DETECTOR-MODE and the learning rate
    1e-3 (measured best on the shipped model; benchmarks/adaptation.md).

    Example: calofm adapt --pretrained calodit-tiny-standin --detector fccee_allegro --data allegro.h5 --mode lora"""
    from calofm.config import load_config
    from calofm.train.adapt import adapt as run
    from calofm.train.adapt import default_run

    cfg = load_config(recipe, set_)
    flags = {"pretrained": pretrained, "pretrained_cd": pretrained_cd, "detector": detector, "data": data,
             "mode": mode, "n_train": n_train, "particle": particle}
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
def generate(model: str | None = typer.Argument(None, metavar="MODEL",
                                                 help="Model folder, shipped model name or Hub repo id."),
             model_opt: str | None = typer.Option(None, "--model", help="The same as MODEL (the older spelling)."),
             detector: str = typer.Option(..., "--detector", help="Detector name (must be in the model's slot map)."),
             n: int = typer.Option(1000, "--num-showers", "-n", "--n", min=1,
                                    help="Number of showers (ignored with --conditions)."),
             energy: float | None = typer.Option(None, "--energy", help="Fixed incident energy in GeV."),
             theta: float | None = typer.Option(None, "--theta", help="Fixed polar angle in rad."),
             phi: float | None = typer.Option(None, "--phi", help="Fixed azimuth in rad."),
             conditions: Path | None = typer.Option(None, "--conditions",
                                                       help="Take (E, theta, phi, particle) from this shower file."),
             particle: str = typer.Option("photon", "--particle", help="photon | electron | pion: one the model has "
                                          "a particle slot for (ignored with --conditions)."),
             steps: int | None = typer.Option(None, "--steps", min=1, help="Sampler steps (default: the model's)."),
             batch_size: int = typer.Option(64, "--batch-size", min=1, help="Showers per forward pass (64: measured "
                                            "on CPUs, benchmarks/generation.md; e.g. --batch-size 1024 on a GPU)."),
             seed: int = typer.Option(0, "--seed", help="Shower i's noise depends only on (seed, i)."),
             fmt: Literal["lemurs", "calochallenge", "pointcloud"] = typer.Option("lemurs", "--format",
                                                                                  help="Output file format."),
             threads: int | None = typer.Option(None, "--threads", min=1, help="Torch threads (default: torch's "
                                                    "choice, all cores; 1 is best when the cores are shared)."),
             precision: Literal["fp32", "bf16", "int8"] = typer.Option(
                 "fp32", "--precision", help="bf16: autocast (torch only); int8: dynamically quantised weights, "
                 "e.g. --precision int8 (benchmarks/precision.md has each one's fidelity)."),
             backend: Literal["torch", "onnxruntime"] = typer.Option(
                 "torch", "--backend", help="torch runs the model; onnxruntime its exported Par04 graph on the "
                 "same noise (fp32, int8), e.g. --backend onnxruntime."),
             out: Path = typer.Option(..., "--out", help="Output HDF5 file.")):
    """Generate showers for one detector. Unset conditions are drawn uniformly over the detector's ranges.

    Under torchrun the showers are split over the processes and gathered into one file.

    Example: calofm generate calodit-tiny-standin-cd --detector odd --energy 50 --n 100 --out odd.h5"""
    from calofm.generate import generate_to_file

    if (model is None) == (model_opt is None):
        raise ValueError("give the model once: calofm generate MODEL ... (or --model MODEL)")
    model = model or model_opt
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    tic, cpu_tic = time.perf_counter(), time.process_time()
    path = generate_to_file(model, detector, out, n=n, energy_gev=energy, theta=theta, phi=phi,
                            conditions=conditions, steps=steps, batch_size=batch_size, seed=seed, fmt=fmt,
                            precision=precision, backend=backend, particle=particle)
    if path is not None:
        from calofm.data.formats import open_showers

        wall, cpu = time.perf_counter() - tic, time.process_time() - cpu_tic
        with open_showers(path) as f:
            count = len(f)
        typer.echo(f"wrote {path}: {count:,} showers in {wall:.1f} s, {count / wall:.1f} showers/s "
                   f"(CPU time of this process {cpu:.1f} s)")


@app.command()
def info(model: str = typer.Argument(..., help="A model folder, Hub repo id, or preset name (paper|small|tiny).")):
    """Parameters, FLOPs per forward, slot map and normaliser of a model or preset.

    Example: calofm info calodit-tiny-standin"""
    from calofm.hub import load_model
    from calofm.models.dit import PRESETS, CaloDiT
    from calofm.models.summary import describe

    typer.echo(describe(CaloDiT.from_preset(model) if model in PRESETS else load_model(model), model))


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for data, models and the report."),
         quick: bool = typer.Option(False, "--quick", help="Fewer showers and steps (a smoke run)."),
         pretrain: bool = typer.Option(False, "--pretrain", help="Pretrain and distil from scratch instead of "
                                       "adapting the shipped foundation model.")):
    """What a user does, on embedded synthetic data: adapt the shipped foundation model to a new detector,
    distil, evaluate; a report with plots.

    Example: calofm demo --out demo_out"""
    from calofm.demo import run_demo

    report = run_demo(out, quick=quick, pretrain=pretrain)
    typer.echo(f"demo report: {report}")


@app.command()
def evaluate(reference: Path = typer.Option(..., "--reference", help="Reference shower file (LEMURS or CaloChallenge)."),
             generated: Path = typer.Option(..., "--generated", help="Generated shower file (LEMURS or CaloChallenge)."),
             out: Path = typer.Option(..., "--out", help="Folder for metrics.json, the PNG plots and report.md."),
             metrics: list[str] | None = typer.Option(
                 None, "--metrics", help="Comma-separated or repeated, from: response (mean and spread of E_dep / E_inc "
                 "per energy bin), observables, fpd, kpd (calofm's FPD/KPD), fpd_cc, kpd_cc (the CaloChallenge's), "
                 "auc_low, auc_high, coherence (of the shower's centre across depth), prdc, fixed_points (default: all)."),
             detector: str | None = typer.Option(None, "--detector", help="Detector name for the report "
                                                    "(default: the files' `detector` attribute)."),
             point: list[str] | None = typer.Option(
                 None, "--point", help="Fixed point 'E_GeV,theta[,phi]' to compare at (repeatable; default: the "
                 "shared conditions of fixed-point files, else 10 and 50 GeV at normal incidence and 50 GeV at 1.2 rad)."),
             max_showers: int | None = typer.Option(None, "--max-showers", min=1, help="Use only the first N showers of each file."),
             seed: int = typer.Option(0, "--seed", help="Seed of the metrics' random parts (bootstrap, classifier).")):
    """Compare generated showers with reference showers: observables, FPD, KPD (calofm's and the CaloChallenge's
    definitions), classifier AUCs, PRDC.

    Example: calofm evaluate --reference test/odd.h5 --generated gen/odd.h5 --out eval/odd"""
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
            typer.echo(f"{key}: {result[key]['value']:.4f} +- {result[key]['error']:.2g}")
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
               fmt: Literal["onnx", "torchscript"] = typer.Option(..., "--format", help="Graph format."),
               device: Literal["cpu", "cuda"] = typer.Option("cpu", "--device", help="Where the graph will run (ONNX: the "
                                          "execution providers recorded); the graph itself runs on either."),
               batch: int | None = typer.Option(None, "--batch", min=1, help="Fixed batch size (default 1: the Par04 contract)."),
               dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="A free batch axis instead."),
               steps: int | None = typer.Option(None, "--steps", min=1, help="Sampler steps unrolled into the graph "
                                                "(default: the model's saved sampler.steps; CD 1, EDM 32)."),
               new_detector: str | None = typer.Option(None, "--new-detector", help="Adapted detector for the "
                                                       "contract's 'new' slot, when the model has several."),
               precision: Literal["fp32", "int8"] = typer.Option(
                   "fp32", "--precision", help="int8 (ONNX only): onnxruntime's dynamic quantisation, int8 "
                   "weights, a smaller file, e.g. --precision int8."),
               out: Path = typer.Option(..., "--out", help="File to write; its contract JSON goes to OUT.json.")):
    """Export one graph with Geant4's Par04 contract: (B, 8) [E GeV, phi, theta, one-hot(5)] -> (B, 6480) GeV.

    Example: calofm export calodit-tiny-standin-cd --format onnx --out calodit.onnx"""
    import warnings

    from calofm.export import export, sidecar_path

    if batch is not None and dynamic_batch:
        raise ValueError("--batch and --dynamic-batch exclude each other")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        path = export(model, out, fmt, device=device, batch=batch or 1, dynamic_batch=dynamic_batch, steps=steps,
                      new_detector=new_detector, precision=precision)
    for w in caught:
        if issubclass(w.category, UserWarning):
            typer.echo(f"warning: {w.message}", err=True)
    typer.echo(f"wrote {path} ({fmt}, device {device}, {precision}) and its contract {sidecar_path(path)}")


# ------------------------------------------------------------------------------------------- sharing on the Hub


@app.command("push")
def push(model_dir: Path = typer.Argument(..., metavar="DIR", help="Saved model folder (config.json + model.safetensors)."),
         repo_id: str = typer.Option(..., "--repo-id", help="Hub model repo OWNER/NAME (created if missing)."),
         private: bool = typer.Option(False, "--private", help="Create the repo private."),
         revision: str | None = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
         metrics: Path | None = typer.Option(None, "--metrics",
                                                help="metrics.json to show in the card (default: DIR/metrics.json)."),
         keep_card: bool = typer.Option(False, "--keep-card", help="Upload DIR/README.md as is, not re-rendered.")):
    """Upload a model folder to the Hugging Face Hub with its model card (token: HF_TOKEN or `hf auth login`).

    Example: calofm push runs/pretrain-tiny/model --repo-id me/calodit-tiny --metrics eval/metrics.json"""
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
    """Share a folder of shower files as a Hub dataset with a dataset card; train on it with data.dir=OWNER/NAME.

    Example: calofm data push data/synthetic --repo-id me/calo-showers"""
    from calofm.hub import push_dataset

    url = push_dataset(data_dir, repo_id, private=private or None, revision=revision, license=license)
    typer.echo(f"pushed {data_dir} to dataset {repo_id}: {url}")


def main() -> None:  # `python -m calofm.cli`
    app()


if __name__ == "__main__":
    main()
