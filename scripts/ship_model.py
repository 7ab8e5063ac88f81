"""Put a trained model into calofm as a shipped foundation model (`calofm/pretrained/NAME/{edm,cd}`), with the
fidelity figures of its model card measured here on one fixed held-out file per detector.

    python scripts/ship_model.py runs/pretrain/model --name calodit-tiny-standin --kind edm \
        --reference data/test --n 2000 --data "calofm data synth --all --n 8000 --seed 1" \
        --command "calofm pretrain recipes/pretrain-tiny.yaml --set train.steps=8000"
    python scripts/ship_model.py runs/distill/model --name calodit-tiny-standin --kind cd ...

The figures go into metrics.json (the rows of `calofm.evaluate.fidelity`, read by the demo's report) and the card;
the card's notes say what the model was trained on (the synthetic stand-in, not Geant4), the command and `--notes`.
Provenance paths of this machine are replaced by the shipped names, so the card names nothing a user cannot find.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the trained model folder")
    ap.add_argument("--name", required=True, help="shipped name (the EDM's; the CD is NAME-cd)")
    ap.add_argument("--kind", choices=("edm", "cd"), required=True)
    ap.add_argument("--reference", required=True, help="folder of held-out <detector>.h5 files")
    ap.add_argument("--n", type=int, default=2000, help="showers per detector (the first N of each reference file)")
    ap.add_argument("--command", required=True, help="the command that trained the model, for the card")
    ap.add_argument("--data", required=True, help="the command that made its training data, for the card")
    ap.add_argument("--notes", default="", help="more markdown for the card (e.g. the learning curve)")
    ap.add_argument("--eval-dir", default=None, help="keep the evaluation folders here (default: not kept)")
    ap.add_argument("--detectors", nargs="*", help="evaluate only these (default: the model's slot map)")
    ap.add_argument("--rows-out", help="write the evaluated rows to this JSON file and stop (to split the "
                    "evaluation over processes)")
    ap.add_argument("--from-rows", nargs="*", help="ship with the rows of these --rows-out files; no evaluation")
    ap.add_argument("--card-only", action="store_true",
                    help="rewrite the shipped model's card (e.g. new --notes) from its metrics.json; no evaluation")
    ap.add_argument("--init-from", help="what its `model.init_from` names, as a user finds it (when it replaces "
                    "the shipped model it started from: that one's calofm revision)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import tempfile

    from calofm.data.formats import open_showers
    from calofm.evaluate.fidelity import card_metrics, fidelity
    from calofm.generate import generate_showers
    from calofm.hub import load_model, write_model_card
    from calofm.io import atomic_write_text
    from calofm.pretrained import CD_SUFFIX, ROOT

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    if model.objective != args.kind:
        raise SystemExit(f"{args.model}: objective {model.objective!r}, but --kind {args.kind}")
    detectors = sorted(model.slot_map, key=model.slot_map.get)
    out = ROOT / args.name / args.kind
    summary = json.loads((out / "metrics.json").read_text()) if args.card_only else {}
    for rows in args.from_rows or []:
        summary.update(json.loads(Path(rows).read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.eval_dir or tmp)
        for det in [] if args.card_only or args.from_rows else args.detectors or detectors:
            with open_showers(Path(args.reference) / f"{det}.h5") as f:
                ref = f.read(0, min(args.n, len(f)))
            gen = generate_showers(model, det, ref.energy, ref.theta, ref.phi, seed=1)
            summary[det] = fidelity(ref, gen, folder / det, det)
            print(det, json.dumps(summary[det]), flush=True)
    if args.rows_out:
        atomic_write_text(args.rows_out, json.dumps(summary, indent=1) + "\n")
        return
    summary = {d: summary[d] for d in detectors}  # every detector, in slot order

    provenance = {**model.provenance, "data": "synthetic stand-in (calofm.data.synthetic), see the notes"}
    if "deposit_fit" in provenance:  # scripts/refit_deposit.py's record names this machine's data folder
        provenance["deposit_fit"] = {**provenance["deposit_fit"], "data": provenance["data"]}
    if args.kind == "cd":
        provenance.update(teacher=args.name, teacher_provenance={**provenance["teacher_provenance"],
                                                                 "data": provenance["data"]})
    if args.init_from:
        trained = provenance["teacher_provenance"] if args.kind == "cd" else provenance
        trained["init_from"] = args.init_from
    shipped = model.with_config(provenance=provenance)
    if not args.card_only:
        shipped.save_pretrained(out)
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1) + "\n")
    name = args.name + (CD_SUFFIX if args.kind == "cd" else "")
    notes = (f"Trained on the synthetic GFlash-parametrised stand-in showers that calofm embeds, **not Geant4**: "
             f"its figures say how well it learnt that stand-in, not real detectors. Training data: "
             f"`{args.data}`. Made by `{args.command}`; scored by `python scripts/ship_model.py` on the first "
             f"{args.n:,} showers of one fixed held-out file per detector (`calofm data synth ... --seed 2`), one "
             "generated shower at each one's (E, theta, phi), with `calofm.evaluate.fidelity` (worst of five "
             "log-spaced E_inc bins for the mean and spread ratios; FPD in calofm's 44-feature definition and the "
             "CaloChallenge's 362-feature one, whose data-vs-data floor on this stand-in is ~340-400e-3). "
             f"Load it offline by name: `load_model(\"{name}\")`." + (f"\n\n{args.notes}" if args.notes else ""))
    write_model_card(out, metrics=card_metrics(summary), repo_id=name, model=shipped, notes=notes)
    print(f"shipped {name}: {out}")


if __name__ == "__main__":
    main()
