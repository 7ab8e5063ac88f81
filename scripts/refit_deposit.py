"""Fit the deposit net of an already trained model on its own (calofm/train/deposit.py), as `calofm pretrain` now
does at its end, and give its CD student the same net (a student keeps its teacher's deposit net, frozen).

    python scripts/refit_deposit.py runs/pretrain/model --data data/train --out runs/pretrain/model-refit \
        --cd runs/distill/model --cd-out runs/distill/model-refit

This is how the shipped model, trained before the fit existed, first got it, and how its net was later fitted on
a training set with showers at every energy (`calofm data synth --spectrum mixed`; benchmarks/fidelity.md, "The
lowest energy bin's training showers"); the transformer is left as it is (it never sees a drawn deposit in
training).
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the EDM (or FM) model folder")
    ap.add_argument("--data", required=True, help="folder of <detector>.h5 training files (the model's detectors)")
    ap.add_argument("--out", required=True, help="the refitted model folder")
    ap.add_argument("--cd", help="its CD student's folder, to give the refitted net")
    ap.add_argument("--cd-out", help="the CD student's new folder")
    ap.add_argument("--max-per-detector", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="deposit.* overrides, e.g. deposit.epochs=500")
    args = ap.parse_args()
    if bool(args.cd) != bool(args.cd_out):
        raise SystemExit("--cd and --cd-out go together")

    import dataclasses

    from calofm.config import load_config
    from calofm.data.loader import find_detector_files
    from calofm.data.transforms import Normalizer
    from calofm.hub import load_model
    from calofm.train.deposit import refit_deposit
    from calofm.train.loop import save_model

    cfg = load_config(None, [f"data.max_per_detector={args.max_per_detector or 'null'}", *args.set])
    model = load_model(args.model)
    if model.deposit_net is None:
        raise SystemExit(f"{args.model}: the model has no deposit net (normaliser unit is not 'deposit')")
    files = find_detector_files(args.data, sorted(model.slot_map, key=model.slot_map.get))
    refit_deposit(model, files, Normalizer.from_dict(model.normalizer), cfg)
    fit = {"deposit_fit": {**dataclasses.asdict(cfg.deposit), "data": args.data}}
    save_model(model.with_config(provenance={**model.provenance, **fit}), args.out)
    if args.cd:
        cd = load_model(args.cd)
        cd.deposit_net.load_state_dict(model.deposit_net.state_dict())
        save_model(cd.with_config(provenance={**cd.provenance, **fit}), args.cd_out)


if __name__ == "__main__":
    main()
