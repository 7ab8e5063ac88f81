"""The deposit net alone: its drawn E_dep against held-out showers' per log-spaced E_inc bin, as trained and
after `calofm.train.deposit.fit_deposit` runs of other lengths (benchmarks/fidelity.md, "The deposit net fitted
on its own").

    python scripts/study_deposit.py calodit-tiny-standin --train data/train --test data/test_logu \
        --fresh --runs 16:64 256:1024 960:1024
    python scripts/study_deposit.py runs/pretrain8k/model --train data/train --test data/test_logu --runs 1000:1024
    python scripts/study_deposit.py calodit-tiny-standin --train data/train --test data/val_logu --fresh \
        --runs 1000:1024 3000:1024 --seeds 0 1 2 --draws 4

`--draws K` draws K deposits at each held-out shower's conditions, so that with a large held-out set (8,000 a
detector: ~1,600 a bin) the ratios' errors are ~0.02 and what is left is the net's own miss; `--seeds` refits with
other seeds, for the fit's run-to-run spread.

Each `--runs EPOCHS:BATCH` fits a copy of the model's net (from its weights, or a fresh net with --fresh) on
`--train`'s showers of the model's detectors and scores it; the transformer plays no part (it only shapes the
drawn deposit), so each run takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an EDM model with a deposit net (folder or shipped name)")
    ap.add_argument("--train", required=True, help="folder of <detector>.h5 training files")
    ap.add_argument("--test", required=True, help="folder of <detector>.h5 held-out files")
    ap.add_argument("--runs", nargs="*", default=[], help="EPOCHS:BATCH fits to score beside the model's own net")
    ap.add_argument("--fresh", action="store_true", help="start the fits from a new net, not the model's")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="fit every run once with each seed")
    ap.add_argument("--draws", type=int, default=1,
                    help="deposits drawn at each held-out shower's conditions (more: the generated side's error shrinks)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from calofm.config import DepositConfig
    from calofm.data.formats import read_showers
    from calofm.data.loader import ShowerStream, find_detector_files
    from calofm.data.transforms import Normalizer, deposit, encode_conditions
    from calofm.diffusion import DEPOSIT_PARAMS, DEPOSIT_STEPS, deposit_denoiser
    from calofm.diffusion.edm import heun_sample
    from calofm.evaluate.response import response_table
    from calofm.hub import load_model
    from calofm.models.dit import DepositNet
    from calofm.train.deposit import fit_deposit

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    if model.deposit_net is None:
        raise SystemExit(f"{args.model}: no deposit net")
    norm = Normalizer.from_dict(model.normalizer)
    detectors = sorted(model.slot_map, key=model.slot_map.get)
    table = ShowerStream(find_detector_files(args.train, detectors), model.slot_map, model.n_slots, norm, 1024,
                         particle_map=model.particle_map, n_particle_slots=model.n_particle_slots).deposit_table()
    tests = {}  # each held-out file's conditions and E_dep, summed once (the cells are not needed after)
    for d in detectors:
        s = read_showers(Path(args.test) / f"{d}.h5")
        tests[d] = (s.energy, s.theta, s.phi, deposit(s.showers))

    def holding(net) -> torch.nn.Module:  # what deposit_denoiser and fit_deposit read: `.deposit_net`
        holder = torch.nn.Module()
        holder.deposit_net = net
        return holder

    def score(name: str, net) -> None:
        holder = holding(net)
        worst_mean = worst_spread = 0.0
        print(f"== {name}")
        for d, (e_inc, theta, phi, e_dep) in tests.items():
            energy = np.tile(e_inc, args.draws)
            cond = encode_conditions(energy, np.tile(theta, args.draws), np.tile(phi, args.draws),
                                     model.slot_map[d], model.n_slots)
            noise = torch.randn((len(energy), net.dim), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                y = heun_sample(deposit_denoiser(holder), noise, cond, DEPOSIT_PARAMS, DEPOSIT_STEPS)
            e = torch.from_numpy(np.asarray(energy, np.float64))
            drawn = norm.decode_deposit(y.double(), norm.expected_deposit(e, d)).numpy()
            # one-cell "showers" carrying each E_dep, so response_table's E_dep is the drawn one
            rows = response_table(e_dep[:, None], e_inc, drawn[:, None], energy)
            worst_mean = max([worst_mean, *(abs(r["mean_ratio"] - 1) for r in rows)])
            worst_spread = max([worst_spread, *(abs(r["spread_ratio"] - 1) for r in rows)])
            print(f"  {d:12s} n " + " ".join(f"{r['reference']['n']:5d}" for r in rows)
                  + " | mean " + " ".join(f"{r['mean_ratio']:.3f}±{r['mean_ratio_error']:.3f}" for r in rows)
                  + " | spread " + " ".join(f"{r['spread_ratio']:.2f}±{r['spread_ratio_error']:.2f}" for r in rows))
        print(f"  worst |mean ratio - 1| {worst_mean:.3f}, worst |spread ratio - 1| {worst_spread:.2f}", flush=True)

    score(f"{args.model}: its own net", model.deposit_net)
    for run in args.runs:
        epochs, batch = run.split(":")
        for seed in args.seeds:
            torch.manual_seed(seed)
            net = DepositNet(model.n_cond, dim=model.deposit_net.dim) if args.fresh else copy.deepcopy(model.deposit_net)
            fit_deposit(holding(net), table, DepositConfig(epochs=float(epochs), batch_size=int(batch)), seed=seed)
            score(f"{'fresh' if args.fresh else 'from the model'}, {epochs} epochs of batch {batch}, seed {seed}", net)


if __name__ == "__main__":
    main()
