"""`calofm info`: what a model or preset is, in numbers."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from calofm.geometry import SHAPE
from calofm.models.dit import CaloDiT


def forward_flops(model: CaloDiT) -> int:
    x = torch.zeros(1, *SHAPE)
    cond = torch.zeros(1, model.n_cond + (model.deposit_net is not None))  # + the encoded deposit
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.zeros(1), cond)
    return counter.get_total_flops()


def describe(model: CaloDiT, ref: str) -> str:
    """`model` (loaded from `ref`: a folder, repo id or preset name) in numbers."""
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"model       {ref}",
        f"preset      {model.preset}: depth {model.depth}, width {model.width}, heads {model.heads}, "
        f"mlp {model.mlp_dim}, patch {'x'.join(map(str, model.patch))} -> {len(model.pos_embed)} tokens",
        f"parameters  {n_params:,}",
        f"FLOPs       {forward_flops(model) / 1e9:.3f} GFLOP per forward (batch 1)",
        f"objective   {model.objective}   sampler {model.sampler or '-'}",
        f"slots       {model.n_slots}: {model.slot_map or '(none assigned)'}",
        f"normaliser  {model.normalizer or '(not fitted)'}",
    ]
    if model.provenance:
        lines.append(f"provenance  {model.provenance}")
    return "\n".join(lines)
