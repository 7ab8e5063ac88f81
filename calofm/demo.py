"""`make demo`: the whole workflow on the embedded synthetic stand-in data, ending in demo_out/report.md.

Each stage writes into its own folder and is skipped when its output already exists, so a demo that was
interrupted continues where it stopped. Stages append markdown sections (with plots) to the report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calofm.geometry import DETECTORS, NEW_DETECTOR, PRETRAIN_DETECTORS
from calofm.io import atomic_path, atomic_write_text


@dataclass
class DemoContext:
    out: Path
    quick: bool
    sections: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return 600 if self.quick else 4000

    @property
    def n_test(self) -> int:
        return 300 if self.quick else 1000

    def steps(self, full: int) -> int:
        return max(full // 10, 20) if self.quick else full

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def rel(self, p: Path) -> str:
        return str(Path(p).relative_to(self.out))


def stage_data(ctx: DemoContext) -> None:
    """Synthetic training and held-out sets for all five detectors (ALLEGRO: a small adaptation set)."""
    from calofm.data.inspect import summarize
    from calofm.data.synthetic import synthesize

    train, test = ctx.path("data", "train"), ctx.path("data", "test")
    if not (train / f"{NEW_DETECTOR}.h5").exists():
        synthesize(train, list(PRETRAIN_DETECTORS), ctx.n_train, seed=1)
        synthesize(train, [NEW_DETECTOR], ctx.n_train // 4, seed=2)
    if not (test / f"{NEW_DETECTOR}.h5").exists():
        synthesize(test, list(DETECTORS), ctx.n_test, seed=3)
    summaries = {d: summarize(train / f"{d}.h5") for d in DETECTORS}
    png = _plot_profiles(summaries, ctx.path("data", "profiles.png"))
    rows = "\n".join(f"| {d} | {s['n']} | {s['response_mean']:.4f} | {s['sparsity']:.3f} |"
                     for d, s in summaries.items())
    ctx.sections.append(
        "## Data: synthetic stand-in showers\n\n"
        "GFlash-parametrised showers on the shared 9 x 16 x 45 mesh (not Geant4: a stand-in with the right "
        "structure, labelled as such in every file).\n\n"
        "| detector | showers | mean E_dep/E_inc | fraction of cells hit |\n|---|---|---|---|\n"
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

    model_dir = ctx.path("pretrain", "model")
    if not model_dir.exists():
        cfg = load_config("recipes/pretrain-tiny.yaml" if Path("recipes/pretrain-tiny.yaml").exists() else None,
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


FIXED_ENERGIES_GEV = (10.0, 40.0, 90.0)


def fixed_point_response(model, detectors, n: int = 200, seed: int = 7) -> list[dict]:
    """Mean total deposit of generated vs synthetic showers at fixed (E, theta = pi/2, phi = 0)."""
    from calofm.data.synthetic import generate
    from calofm.generate import generate_showers

    rows = []
    for d in detectors:
        for e_gev in FIXED_ENERGIES_GEV:
            e = np.full(n, e_gev * 1e3, np.float32)
            t = np.full(n, math.pi / 2, np.float32)
            p = np.zeros(n, np.float32)
            data = generate(d, n, seed, energy=e, phi=p, theta=t).showers.sum(axis=(1, 2, 3)).mean()
            gen = generate_showers(model, d, e, t, p, seed=seed).showers.sum(axis=(1, 2, 3)).mean()
            rows.append({"detector": d, "energy_gev": e_gev, "data_mev": float(data), "model_mev": float(gen),
                         "ratio": float(gen / data)})
    return rows


def stage_generate(ctx: DemoContext) -> None:
    """Generate from the pretrained EDM for each pretraining detector and check fixed-point responses."""
    from calofm.hub import load_model

    model = load_model(ctx.path("pretrain", "model"))
    rows = fixed_point_response(model, PRETRAIN_DETECTORS, n=100 if ctx.quick else 200)
    atomic_write_text(ctx.path("pretrain", "fixed_points.json"), json.dumps(rows, indent=1))
    table = "\n".join(f"| {r['detector']} | {r['energy_gev']:.0f} | {r['data_mev']:.1f} | {r['model_mev']:.1f} | "
                      f"{r['ratio']:.3f} |" for r in rows)
    ctx.sections.append("## Generation: mean total deposit at fixed points (theta = pi/2, phi = 0)\n\n"
                        "| detector | E [GeV] | data [MeV] | EDM 32 steps [MeV] | ratio |\n|---|---|---|---|---|\n"
                        f"{table}\n")


STAGES: list[Callable[[DemoContext], None]] = [stage_data, stage_pretrain, stage_generate]


def run_demo(out: str | Path, quick: bool = False) -> Path:
    ctx = DemoContext(Path(out), quick)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        tic = time.perf_counter()
        stage(ctx)
        ctx.timings[stage.__name__.removeprefix("stage_")] = time.perf_counter() - tic
    timing = " | ".join(f"{k} {v:.0f} s" for k, v in ctx.timings.items())
    report = ctx.path("report.md")
    atomic_write_text(report, "# calofm demo report\n\n" + "\n".join(ctx.sections) + f"\n---\nstage times: {timing}\n")
    return report
