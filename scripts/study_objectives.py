"""EDM vs flow matching vs their consistency distillations, same preset, data and budget (benchmarks/objectives.md).

Pretrains one EDM and one flow-matching (FM) model with the default recipe (`calofm/recipes/pretrain-tiny.yaml`,
`model.objective` the only difference), distils each into a 1-step consistency model (CD), then scores every
sampler setting against one fixed held-out file per detector: FPD (calofm's 44 features, x1e3, with its error)
and the classifier AUC on high-level features, beside the network evaluations per shower. Every run resumes
exactly from its checkpoints and rows already in OUT/objectives.json (same budgets, showers and reference) are
kept, so the study can be stopped and started again, or widened with a larger --max-evaluations.

    python scripts/study_objectives.py --data data/train --reference data/test --steps 8000 --cd-steps 1000 \
        --n 2000 --out study/objectives --markdown benchmarks/objectives.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SAMPLERS = {"edm": [("heun", s) for s in (4, 8, 16, 32)],
            "fm": [("euler", s) for s in (8, 16, 32, 64)] + [("heun", s) for s in (4, 8, 16, 32)],
            "cd": [("consistency", s) for s in (1, 2)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="training folder of <detector>.h5")
    ap.add_argument("--reference", required=True, help="folder of held-out <detector>.h5 files")
    ap.add_argument("--detectors", nargs="*", default=None, help="default: the recipe's four")
    ap.add_argument("--steps", type=int, default=8000, help="pretraining steps of each objective")
    ap.add_argument("--cd-steps", type=int, default=1000, help="distillation steps of each teacher")
    ap.add_argument("--n", type=int, default=2000, help="showers per detector (the first N of each reference)")
    ap.add_argument("--out", required=True, help="folder for the runs, generated files and objectives.json")
    ap.add_argument("--markdown", default=None, help="write the table here too")
    ap.add_argument("--max-evaluations", type=int, default=None,
                    help="skip sampler settings with more network evaluations per shower (a cheaper grid)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from calofm.config import load_config
    from calofm.data.formats import open_showers
    from calofm.diffusion import network_evaluations
    from calofm.evaluate.report import evaluate
    from calofm.generate import generate_showers
    from calofm.hub import load_model
    from calofm.train.distill import distill
    from calofm.train.pretrain import pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = [f"data.dir={args.data}"] + ([f"data.detectors=[{','.join(args.detectors)}]"] if args.detectors else [])
    models, timing = {}, {}
    for objective in ("edm", "fm"):
        tic = time.process_time()
        cfg = load_config("pretrain-tiny", [*common, f"output_dir={out / objective}", f"train.steps={args.steps}",
                                            f"model.objective={objective}", "train.checkpoint_every=500"])
        teacher = pretrain(cfg, resume=True)  # a finished run returns its model
        cfg = load_config("distill-tiny", [*common, f"output_dir={out / (objective + '-cd')}",
                                           f"train.steps={args.cd_steps}", "train.checkpoint_every=250"])
        cfg.distill.teacher = str(teacher)
        models[objective], models[f"{objective}-cd"] = load_model(teacher), load_model(distill(cfg, resume=True))
        timing[objective] = time.process_time() - tic
    detectors = args.detectors or sorted(models["edm"].slot_map, key=models["edm"].slot_map.get)
    refs = {}
    for d in detectors:
        with open_showers(Path(args.reference) / f"{d}.h5") as f:
            refs[d] = f.read(0, min(args.n, len(f)))

    done = previous_rows(out / "objectives.json", args)
    rows = []
    for name, model in models.items():
        for solver, steps in SAMPLERS["cd" if model.objective == "cd" else model.objective]:
            m = model.with_config(sampler={**model.sampler, "name": solver, "steps": steps})
            if (name, solver, steps) in done:
                rows.append(done[name, solver, steps])
                continue
            if args.max_evaluations and network_evaluations(m) > args.max_evaluations:
                continue
            row = {"model": name, "solver": solver, "steps": steps, "evaluations": network_evaluations(m),
                   "detectors": {}}
            for d, ref in refs.items():
                gen = generate_showers(m, d, ref.energy, ref.theta, ref.phi, seed=1)
                ev = evaluate(ref, gen, out / "eval" / f"{name}-{solver}{steps}" / d, metrics=["fpd", "auc_high"],
                              detector=d)
                row["detectors"][d] = {"fpd": ev["fpd"], "auc_high": ev["auc_high"]["value"]}
            rows.append(row)
            print(format_row(row, detectors), flush=True)
    (out / "objectives.json").write_text(json.dumps({"args": vars(args), "rows": rows, "cpu_s": timing}, indent=1,
                                                    default=float) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, detectors, args) + "\n")


def previous_rows(path: Path, args) -> dict:
    """Rows an earlier run of the same study (same budgets, showers and reference) already scored, by (model,
    solver, steps): kept, not recomputed, so a larger --max-evaluations only adds the settings it lets in."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = ("data", "reference", "detectors", "steps", "cd_steps", "n")
    if any(old["args"].get(k) != vars(args)[k] for k in same):
        return {}
    return {(r["model"], r["solver"], r["steps"]): r for r in old["rows"]}


def format_row(row: dict, detectors: list[str]) -> str:
    cells = [f"{row['detectors'][d]['fpd']['value'] * 1e3:.3g} ± {row['detectors'][d]['fpd']['error'] * 1e3:.2g} / "
             f"{row['detectors'][d]['auc_high']:.3f}" for d in detectors]
    return f"| {row['model']} | {row['solver']} {row['steps']} | {row['evaluations']} | " + " | ".join(cells) + " |"


def markdown(rows: list[dict], detectors: list[str], args) -> str:
    head = ("# Objectives: EDM, flow matching and their consistency distillations\n\n"
            f"Command: `python scripts/study_objectives.py --data {args.data} --reference {args.reference} "
            f"--steps {args.steps} --cd-steps {args.cd_steps} --n {args.n} --out {args.out}"
            + (f" --max-evaluations {args.max_evaluations}" if args.max_evaluations else "") + "`\n\n"
            "Tiny preset, the default pretraining recipe; only `model.objective` differs. Synthetic stand-in showers "
            "(not Geant4). FPD x1e3 in calofm's 44-feature definition, with its error / classifier AUC on high-level "
            "features, one generated shower at each held-out shower's (E, theta, phi).\n\n"
            "| model | sampler | network evaluations | " + " | ".join(detectors) + " |\n"
            "|---|---|---|" + "---|" * len(detectors) + "\n")
    return head + "\n".join(format_row(r, detectors) for r in rows)


if __name__ == "__main__":
    main()
