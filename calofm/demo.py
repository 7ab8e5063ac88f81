"""`make demo`: what a user does, on the embedded synthetic stand-in data, ending in demo_out/report.md: take the
foundation model that ships with calofm, adapt it to a detector it never saw (fccee_allegro, 1,000 showers),
distil, evaluate. `--pretrain` pretrains and distils from scratch first instead.

Each stage writes into its own folder and is skipped when its output already exists, so a demo that was
interrupted continues where it stopped; the folder's `inputs.json` says what it was made from (calofm's version,
the base model's weights, the data, the budget), and a folder made from other inputs (an older calofm, a re-shipped
foundation model, `--quick`) is moved to `<stage>.stale` and made again (`stage_folder`). Stages append markdown
sections (with plots) to the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calofm import __version__
from calofm.geometry import DETECTORS, NEW_DETECTOR, PRETRAIN_DETECTORS
from calofm.io import atomic_path, atomic_write_text
from calofm.pretrained import CD_SUFFIX, SHIPPED, shipped_model


@dataclass
class DemoContext:
    out: Path
    quick: bool
    pretrain: bool = False  # pretrain and distil from scratch instead of starting from the shipped model
    sections: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, dict] = field(default_factory=dict)  # stage -> what its folder was made from

    @property
    def n_train(self) -> int:
        return 600 if self.quick else 4000

    @property
    def n_test(self) -> int:
        return 300 if self.quick else 1000

    def steps(self, full: int) -> int:
        return max(full // 10, 20) if self.quick else full

    @property
    def base(self) -> tuple[str, str]:
        """(EDM, CD) the adaptation starts from: the demo's own models, or the shipped foundation model."""
        if self.pretrain:
            return str(self.path("pretrain", "model")), str(self.path("distill", "model"))
        return SHIPPED, SHIPPED + CD_SUFFIX

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def rel(self, p: Path) -> str:
        return str(Path(p).relative_to(self.out))


def stage_folder(ctx: DemoContext, name: str, **inputs) -> Path:
    """The stage's folder, made from `inputs` plus calofm's version and every earlier stage's inputs. A folder
    whose `inputs.json` says otherwise (or has none: an older calofm's) is moved to `<name>.stale`, replacing an
    older one, so its results are never reported as this run's; an interrupted stage with the same inputs stays
    and continues from its checkpoints."""
    ctx.inputs[name] = {"calofm": __version__, **inputs, "upstream": dict(ctx.inputs)}
    folder, want = ctx.path(name), json.dumps(ctx.inputs[name], indent=1, sort_keys=True)
    stamp = folder / "inputs.json"
    if folder.exists() and (not stamp.is_file() or stamp.read_text() != want):
        stale = ctx.path(name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        folder.rename(stale)
        print(f"{folder} was made from other inputs than this run's ({stamp.name}); moved to {stale}, redoing it")
    folder.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        atomic_write_text(stamp, want)
    return folder


def weights_digest(ref: str | Path) -> str:
    """sha256 of a model's config and weights (a shipped name or a folder): which model a stage started from (the
    config is what runs: a new sampler setting is another model)."""
    folder = shipped_model(str(ref)) or Path(ref)
    return hashlib.sha256(b"".join((folder / f).read_bytes() for f in ("config.json", "model.safetensors"))).hexdigest()


def stage_data(ctx: DemoContext) -> None:
    """Synthetic held-out sets for all five detectors, ALLEGRO's small adaptation set and, to pretrain from
    scratch, the four pretraining detectors' training sets."""
    from calofm.data.inspect import summarize
    from calofm.data.synthetic import GENERATOR, synthesize

    data = stage_folder(ctx, "data", generator=GENERATOR, n_train=ctx.n_train, n_test=ctx.n_test)
    train, test = data / "train", data / "test"
    if not (train / f"{NEW_DETECTOR}.h5").exists():
        synthesize(train, [NEW_DETECTOR], ctx.n_train // 4, seed=2)
    if ctx.pretrain and not all((train / f"{d}.h5").exists() for d in PRETRAIN_DETECTORS):
        synthesize(train, list(PRETRAIN_DETECTORS), ctx.n_train, seed=1)
    if not (test / f"{NEW_DETECTOR}.h5").exists():
        synthesize(test, list(DETECTORS), ctx.n_test, seed=3)
    summaries = {d: summarize(test / f"{d}.h5") for d in DETECTORS}
    png = _plot_profiles(summaries, ctx.path("data", "profiles.png"))
    rows = "\n".join(f"| {d} | {s['n']} | {s['response_mean']:.4f} | {s['sparsity']:.3f} |"
                     for d, s in summaries.items())
    ctx.sections.append(
        "## Data: synthetic stand-in showers\n\n"
        "GFlash-parametrised showers on the shared 9 x 16 x 45 mesh (not Geant4: a stand-in with the right "
        f"structure, labelled as such in every file). {NEW_DETECTOR} gets {ctx.n_train // 4:,} training showers "
        "for adaptation; the held-out sets:\n\n"
        "| detector | held-out showers | mean E_dep/E_inc | fraction of cells hit |\n|---|---|---|---|\n"
        f"{rows}\n\n![profiles]({ctx.rel(png)})\n")


def _plot_profiles(summaries: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for d, s in summaries.items():
        long = np.asarray(s["longitudinal_mev"])
        rad = np.asarray(s["radial_mev"])
        ax1.step(np.arange(len(long)), long / long.sum(), where="mid", label=d)
        ax2.step(np.arange(len(rad)), rad / rad.sum(), where="mid", label=d)
    ax1.set(xlabel="layer z (3.4 mm)", ylabel="fraction of deposited energy", title="Mean longitudinal profile")
    ax2.set(xlabel="radial ring r (4.65 mm)", ylabel="fraction of deposited energy", title="Mean radial profile",
            yscale="log")
    ax1.legend()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def stage_pretrain(ctx: DemoContext) -> None:
    """EDM pretraining of the tiny preset on the four pretraining detectors."""
    from calofm.config import load_config
    from calofm.train.pretrain import pretrain

    model_dir = stage_folder(ctx, "pretrain", recipe="pretrain-tiny", steps=ctx.steps(1500)) / "model"
    if not model_dir.exists():
        cfg = load_config("pretrain-tiny",
                          [f"data.dir={ctx.path('data', 'train')}", f"output_dir={ctx.path('pretrain')}",
                           f"train.steps={ctx.steps(1500)}"])
        pretrain(cfg, resume=True)
    losses = [json.loads(line) for line in ctx.path("pretrain", "metrics.jsonl").read_text().splitlines()]
    png = _plot_loss(losses, ctx.path("pretrain", "loss.png"), "EDM pretraining loss")
    ctx.sections.append(f"## Pretraining (EDM, tiny preset)\n\nloss {losses[0]['loss']:.3f} -> "
                        f"{np.mean([r['loss'] for r in losses[-5:]]):.3f} over {losses[-1]['step']} steps, "
                        f"{np.mean([r['showers_per_s'] for r in losses[1:]]):.0f} showers/s.\n\n"
                        f"![loss]({ctx.rel(png)})\n")


def _plot_loss(rows: list[dict], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.grid(alpha=0.3)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def _fidelity(ctx: DemoContext, model, folder: Path, detectors=PRETRAIN_DETECTORS, slot: str | None = None) -> dict:
    """`calofm.evaluate.fidelity` of `model` on each detector's held-out showers (generated in `slot`, default the
    detector's own), saved as folder/fidelity.json."""
    from calofm.data.formats import open_showers
    from calofm.evaluate.fidelity import fidelity
    from calofm.generate import generate_showers

    summary = {}
    for d in detectors:
        with open_showers(ctx.path("data", "test", f"{d}.h5")) as f:
            test = f.read()
        gen = generate_showers(model, slot or d, test.energy, test.theta, test.phi, seed=5)
        summary[d] = fidelity(test, gen, folder / d, d)
    atomic_write_text(folder / "fidelity.json", json.dumps(summary, indent=1))
    return summary


def _links(ctx: DemoContext, folder: Path, summary: dict) -> dict[str, str]:
    return {d: ctx.rel(folder / d / "report.md") for d in summary}


def stage_generate(ctx: DemoContext) -> None:
    """Score the pretrained EDM on the held-out showers of each pretraining detector."""
    from calofm.diffusion import sampler_label
    from calofm.evaluate.fidelity import GOALS, NOTE, table
    from calofm.hub import load_model

    folder = ctx.path("pretrain", "eval")
    model = load_model(ctx.path("pretrain", "model"))
    summary = _fidelity(ctx, model, folder)
    ctx.sections.append(f"## Fidelity of the pretrained EDM ({sampler_label(model)})\n\n" + NOTE + "\n\n" +
                        table(summary, GOALS["edm"], links=_links(ctx, folder, summary)))


def stage_distill(ctx: DemoContext) -> None:
    """Consistency distillation of the pretrained EDM into a 1-step sampler; its fidelity, and speed."""
    from calofm.config import load_config
    from calofm.evaluate.fidelity import GOALS, table
    from calofm.generate import generate_showers
    from calofm.hub import load_model
    from calofm.train.distill import distill

    model_dir = stage_folder(ctx, "distill", recipe="distill-tiny", steps=ctx.steps(1000)) / "model"
    if not model_dir.exists():
        cfg = load_config("distill-tiny",
                          [f"data.dir={ctx.path('data', 'train')}", f"output_dir={ctx.path('distill')}",
                           f"train.steps={ctx.steps(1000)}"])
        cfg.distill.teacher = str(ctx.path("pretrain", "model"))
        distill(cfg, resume=True)
    losses = [json.loads(line) for line in ctx.path("distill", "metrics.jsonl").read_text().splitlines()]
    png = _plot_loss(losses, ctx.path("distill", "loss.png"), "Consistency distillation loss")
    edm, cd = load_model(ctx.path("pretrain", "model")), load_model(model_dir)
    folder = ctx.path("distill", "eval")
    summary = _fidelity(ctx, cd, folder)
    teacher = json.loads(ctx.path("pretrain", "eval", "fidelity.json").read_text())
    n = 64
    cond = (np.full(n, 50e3, np.float32), np.full(n, math.pi / 2, np.float32), np.zeros(n, np.float32))
    speed = {}
    for name, model in (("EDM, 32 Heun steps", edm), ("CD, 1 step", cd)):
        tic = time.perf_counter()
        generate_showers(model, PRETRAIN_DETECTORS[0], *cond, batch_size=n)
        speed[name] = n / (time.perf_counter() - tic)
    speeds = ", ".join(f"{k}: {v:.0f} showers/s" for k, v in speed.items())
    ctx.sections.append(
        f"## Consistency distillation: 1-step sampling\n\nStudent and target initialised from the EDM model, "
        f"N = {cd.provenance['n_boundaries']} boundaries, target EMA mu = {cd.provenance['mu']}; the target network "
        f"is shipped. Loss {losses[0]['loss']:.2e} -> {np.mean([r['loss'] for r in losses[-5:]]):.2e} over "
        f"{losses[-1]['step']} steps.\n\n![loss]({ctx.rel(png)})\n\n"
        f"Fidelity of the 1-step CD model:\n\n{table(summary, GOALS['cd'], teacher, _links(ctx, folder, summary))}\n"
        f"Generation speed, batch {n}, this machine: {speeds} "
        f"({speed['CD, 1 step'] / speed['EDM, 32 Heun steps']:.0f}x).\n")


SHARED_DEPOSIT = ("A CD model keeps its EDM teacher's deposit net, frozen (one number a shower needs no "
                  "distillation), so at the same seed it draws the same total deposits and has the same mean and "
                  "spread ratios.")


def stage_foundation(ctx: DemoContext) -> None:
    """The foundation model that ships with calofm (`calofm.pretrained`): what it is and its own figures."""
    from calofm.diffusion import sampler_label
    from calofm.evaluate.fidelity import GOALS, NOTE, table
    from calofm.hub import load_model

    edm = load_model(SHIPPED)
    figures = {name: json.loads((shipped_model(name) / "metrics.json").read_text())
               for name in (SHIPPED, SHIPPED + CD_SUFFIX)}
    n_params = sum(p.numel() for p in edm.parameters())
    ctx.sections.append(
        f"## The shipped foundation model `{SHIPPED}`\n\n"
        f"Loaded by name, offline (`load_model(\"{SHIPPED}\")`, folder `calofm/pretrained/{SHIPPED}`): the "
        f"`{edm.preset}` preset ({n_params:,} parameters), EDM pretrained on {', '.join(sorted(edm.slot_map, key=edm.slot_map.get))} and "
        f"its 1-step CD student (`{SHIPPED + CD_SUFFIX}`); {edm.n_slots - len(edm.slot_map)} free slot(s) for "
        "a new detector. Its own figures, from its model card (measured when it was made, on held-out showers of "
        "the same stand-in):\n\n" + NOTE + f"\n\nEDM ({sampler_label(edm)}):\n\n" +
        table(figures[SHIPPED], GOALS["edm"]) + f"\nCD (1 step). {SHARED_DEPOSIT}\n\n" +
        table(figures[SHIPPED + CD_SUFFIX], GOALS["cd"], figures[SHIPPED]))


def stage_adapt(ctx: DemoContext) -> None:
    """Adapt the pretrained EDM and CD models to fccee_allegro (held out of pretraining) with its 1,000 training
    showers, and score them on held-out showers beside the pretrained CD model generating with its closest
    detector's slot (what a user has before adapting)."""
    from calofm.config import load_config
    from calofm.evaluate.fidelity import GOALS, NOTE, table
    from calofm.hub import load_model
    from calofm.train.adapt import adapt

    edm_ref, cd_ref = ctx.base
    out = stage_folder(ctx, "adapt", base=[edm_ref, cd_ref], weights=[weights_digest(edm_ref), weights_digest(cd_ref)],
                       recipe="adapt-full", steps=ctx.steps(300))
    if not (out / "cd").exists():
        cfg = load_config("adapt-full", [
            f"output_dir={out}", f"adapt.pretrained={edm_ref}", f"adapt.pretrained_cd={cd_ref}",
            f"adapt.detector={NEW_DETECTOR}", f"adapt.data={ctx.path('data', 'train', NEW_DETECTOR + '.h5')}",
            "adapt.mode=full", "adapt.n_train=null", f"train.steps={ctx.steps(300)}",
            f"adapt.cd_steps={ctx.steps(300)}"])
        adapt(cfg, resume=True)
    baseline = "fccee_cld"  # the pretraining detector closest to ALLEGRO (FCC-ee, 100 GeV range)
    edm, cd = load_model(out / "edm"), load_model(out / "cd")
    rows, folders = {}, {}
    for name, model, slot, goals in (("adapted EDM", edm, NEW_DETECTOR, GOALS["edm"]),
                                     ("adapted CD", cd, NEW_DETECTOR, GOALS["cd"]),
                                     (f"pretrained CD as {baseline}", load_model(cd_ref), baseline, None)):
        folder = folders[name] = out / "eval" / name.replace(" ", "-")
        rows[name] = (_fidelity(ctx, model, folder, [NEW_DETECTOR], slot), goals,
                      {NEW_DETECTOR: ctx.rel(folder / NEW_DETECTOR / "report.md")})
    teacher = {"adapted CD": rows["adapted EDM"][0]}
    tables = "\n".join(f"{name}:\n\n" + table(row, goals, teacher.get(name), links)
                       for name, (row, goals, links) in rows.items())
    profiles = " ".join(f"![{name}: {axis}]({ctx.rel(folders[name] / NEW_DETECTOR / f'profile_{axis}.png')})"
                        for name in ("adapted EDM", "adapted CD") for axis in ("z", "r"))
    prov = edm.provenance
    ctx.sections.append(
        f"## Adaptation to {NEW_DETECTOR} (held out of pretraining)\n\n"
        f"`calofm adapt --pretrained {edm_ref}`, mode {prov['mode']}: slot {prov['slot']} allocated, "
        f"{prov['n_train']:,} showers, {prov['steps']} EDM steps, then "
        f"{cd.provenance['steps']} CD steps, the student started at {cd.provenance['student_init']} "
        f"(`adapt.cd_transfer`, benchmarks/adaptation.md). "
        f"Scored on the held-out {NEW_DETECTOR} showers; compare with the pretrained model's figures on its own "
        f"detectors above.\n\n{NOTE} {SHARED_DEPOSIT}\n\n{tables}\n"
        f"Longitudinal (z) and radial (r) energy profiles against the held-out data, adapted EDM then CD (every "
        f"observable is in each model's report):\n\n{profiles}\n")


# What a user does (start from the shipped model), and the same workflow with pretraining from scratch.
STAGES: list[Callable[[DemoContext], None]] = [stage_data, stage_foundation, stage_adapt]
PRETRAIN_STAGES: list[Callable[[DemoContext], None]] = [stage_data, stage_pretrain, stage_generate, stage_distill,
                                                        stage_adapt]


def run_demo(out: str | Path, quick: bool = False, pretrain: bool = False) -> Path:
    ctx = DemoContext(Path(out), quick, pretrain)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for stage in PRETRAIN_STAGES if pretrain else STAGES:
        tic = time.perf_counter()
        stage(ctx)
        ctx.timings[stage.__name__.removeprefix("stage_")] = time.perf_counter() - tic
    timing = " | ".join(f"{k} {v:.0f} s" for k, v in ctx.timings.items())
    report = ctx.path("report.md")
    atomic_write_text(report, "# calofm demo report\n\n" + "\n".join(ctx.sections) + f"\n---\nstage times: {timing}\n")
    return report
