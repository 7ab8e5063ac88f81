"""CaloDiT: a diffusion transformer on the (r, phi, z) shower mesh (CaloDiT-2, Raikwar et al.).

The network is EDM's raw F: it maps (c_in * x, c_noise, conditions) to an output that calofm.diffusion turns into
a denoiser with the preconditioning of the model's objective (EDM or consistency), or, for flow matching, the
velocity at (x_t, t). The module also carries what a
saved model needs to be used on its own: the shared normaliser, the detector slot map, the objective and the
sampler defaults, all saved in config.json by PyTorchModelHubMixin.
"""

from __future__ import annotations

import contextlib
import io
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from calofm.data.transforms import N_COND
from calofm.geometry import PHI_CENTRES, SHAPE

OBJECTIVES = ("edm", "cd", "fm")  # EDM diffusion, its consistency distillation, flow matching

PRESETS: dict[str, dict] = {
    # the paper's model: 6 blocks, width 384, 6 heads of 64, MLP 1536, patch 3x2x3 -> 360 tokens
    "paper": dict(depth=6, width=384, heads=6, mlp_dim=1536, patch=(3, 2, 3)),
    "small": dict(depth=4, width=192, heads=4, mlp_dim=768, patch=(3, 2, 3)),
    # trains in minutes on a CPU; keeps the paper's patches: with 3x4x5 (108 tokens) or 3x2x5 the tiny model's
    # showers carried 1.2-2x the data's energy after the demo's steps, with 3x2x3 they are within ~10%
    "tiny": dict(depth=2, width=96, heads=4, mlp_dim=192, patch=(3, 2, 3)),
}


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], 1)


def sincos_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D sinusoidal embedding: a third of the channels each for r, phi and z (token order r, phi, z)."""
    if dim % 6:
        raise ValueError(f"width {dim} must be divisible by 6 for the 3D position embedding")
    d = dim // 3
    axes = [sincos_1d(n, d) for n in grid]
    r, p, z = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.cat([axes[0][r.flatten()], axes[1][p.flatten()], axes[2][z.flatten()]], 1).float()


def timestep_embedding(c_noise: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of c_noise = ln(sigma)/4, scaled so its frequencies resolve the range of ln sigma."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = (scale * c_noise.float())[:, None] * freq[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in one pass over x (addcmul), per sample over the tokens."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the conditions set shift, scale and a zero-initialised gate."""

    def __init__(self, width: int, heads: int, mlp_dim: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_dim)
        self.adaLN = nn.Linear(cond_dim, 6 * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(c)).chunk(6, dim=1)
        x = torch.addcmul(x, gate1[:, None], self.attn(modulate(self.norm1(x), shift1, scale1)))  # gated residuals
        return torch.addcmul(x, gate2[:, None], self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_volume: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Linear(cond_dim, 2 * width)
        self.linear = nn.Linear(width, patch_volume)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DepositNet(nn.Module):
    """EDM's raw F for what a shower draws before its shape, y (B, dim) (normaliser unit `deposit`): its total
    deposit [and transverse centre x, y], an MLP on [c_in y, noise embedding, conditions]. A few numbers a shower, so
    this is cheap next to the transformer, and their distribution (the detector's energy resolution, the core's
    wander) is learnt directly instead of as sums over 6480 cells."""

    def __init__(self, cond_dim: int, width: int = 128, depth: int = 3, t_dim: int = 64, dim: int = 1):
        super().__init__()
        self.t_dim, self.dim = t_dim, dim
        dims = [dim + t_dim + cond_dim] + [width] * depth
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, y: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([y, timestep_embedding(c_noise, self.t_dim), cond], 1))


class CaloDiT(nn.Module, PyTorchModelHubMixin, library_name="calofm", license="apache-2.0",
              tags=["calorimeter", "fast-simulation", "diffusion", "high-energy-physics", "calofm"]):
    """Diffusion transformer over the shower mesh, conditioned on noise level, E, theta, phi and detector one-hot.

    With a normaliser of unit `deposit` the model also carries `deposit_net`, which draws the shower's total
    deposit first; the transformer then draws the shape conditioned on it (one more condition input). With the
    normaliser's `centre`, the net draws the shower's transverse centre (x, y) beside it, and `dipole` puts the
    shape around it: each token's cells get an amplitude x (x cos phi + y sin phi), the first order of moving the
    core, added to the output. As a condition alone the centre was ignored (benchmarks/fidelity.md: the loss gains
    from it in two directions of 6480); through this fixed azimuthal pattern its gradient reaches the amplitudes
    directly.
    Every constructor argument is JSON and lands in config.json, so a saved folder is self-describing.
    """

    def __init__(self, preset: str = "tiny", depth: int | None = None, width: int | None = None,
                 heads: int | None = None, mlp_dim: int | None = None, patch: list[int] | tuple | None = None,
                 n_slots: int = 5, slot_map: dict[str, int] | None = None, normalizer: dict | None = None,
                 objective: str = "edm", sampler: dict | None = None, provenance: dict | None = None,
                 n_particle_slots: int = 0, particle_map: dict[str, int] | None = None):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        p = PRESETS[preset]
        self.preset = preset
        self.depth = depth or p["depth"]
        self.width = width or p["width"]
        self.heads = heads or p["heads"]
        self.mlp_dim = mlp_dim or p["mlp_dim"]
        self.patch = tuple(patch or p["patch"])
        if any(s % q for s, q in zip(SHAPE, self.patch)):
            raise ValueError(f"patch {self.patch} does not tile the mesh {SHAPE}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        self.grid = tuple(s // q for s, q in zip(SHAPE, self.patch))
        self.n_slots = n_slots
        self.slot_map = dict(slot_map or {})
        if any(not 0 <= s < n_slots for s in self.slot_map.values()):
            raise ValueError(f"slot map {self.slot_map} has slots outside 0..{n_slots - 1}")
        # particle one-hot slots (`calofm.particles` names); none: a photon-only model, as CaloDiT-2's
        self.n_particle_slots = n_particle_slots
        self.particle_map = dict(particle_map or {})
        if any(not 0 <= s < n_particle_slots for s in self.particle_map.values()):
            raise ValueError(f"particle map {self.particle_map} has slots outside 0..{n_particle_slots - 1}")
        self.n_cond = N_COND + n_slots + n_particle_slots  # kinematics, detector and particle one-hots
        self.normalizer = normalizer
        self.objective = objective
        self.sampler = dict(sampler or {})
        self.provenance = dict(provenance or {})

        w, cond_dim = self.width, 2 * self.width
        draws_deposit = (normalizer or {}).get("unit") == "deposit"
        draws_centre = draws_deposit and bool((normalizer or {}).get("centre"))
        drawn = (1 + 2 * draws_centre) * draws_deposit
        self.deposit_net = DepositNet(self.n_cond, dim=drawn) if draws_deposit else None
        self.patch_embed = nn.Conv3d(1, w, kernel_size=self.patch, stride=self.patch)
        self.register_buffer("pos_embed", sincos_3d(self.grid, w), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.cond_embed = nn.Sequential(nn.Linear(self.n_cond + drawn, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(DiTBlock(w, self.heads, self.mlp_dim, cond_dim) for _ in range(self.depth))
        self.final = FinalLayer(w, math.prod(self.patch), cond_dim)
        self.dipole = nn.Linear(w, math.prod(self.patch)) if draws_centre else None
        phi = torch.tensor(PHI_CENTRES, dtype=torch.float32)
        self.register_buffer("azimuth", torch.stack([phi.cos(), phi.sin()]), persistent=False)  # (2, N_PHI)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.width, -1))
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN.weight)
            nn.init.zeros_(block.adaLN.bias)
        zeroed = (self.final.adaLN, self.final.linear, self.deposit_net.net[-1] if self.deposit_net else None,
                  self.dipole)
        for layer in filter(None, zeroed):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CaloDiT:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(preset=name, **{**PRESETS[name], **overrides})

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, 9, 16, 45), c_noise (B,), cond (B, n_cond [+ the drawn deposit [and centre]]) -> (B, 9, 16, 45)."""
        # contiguous tokens: the conv's output viewed as (b, n, c) keeps channel-first strides, which every later
        # element-wise op would inherit, so each LayerNorm over c would read strided memory and copy
        h = rearrange(self.patch_embed(x[:, None]), "b c r p z -> b (r p z) c").contiguous() + self.pos_embed
        c = torch.cat([self.t_embed(timestep_embedding(c_noise, 256)), self.cond_embed(cond)], 1)
        for block in self.blocks:
            h = block(h, c)
        out = self.cells(self.final(h, c))
        if self.dipole is not None:  # the centre is cond's last two columns (`calofm.diffusion.shape_conditions`)
            toward = cond[:, -2:] @ self.azimuth  # (B, N_PHI): x cos phi + y sin phi
            out = out + self.cells(self.dipole(self.final.norm(h))) * toward[:, None, :, None]
        return out

    def cells(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, tokens, patch volume) -> (B, 9, 16, 45): the tokens' patches back on the mesh."""
        gr, gp, gz = self.grid
        pr, pp, pz = self.patch
        return rearrange(tokens, "b (r p z) (pr pp pz) -> b (r pr) (p pp) (z pz)",
                         r=gr, p=gp, z=gz, pr=pr, pp=pp, pz=pz)

    def with_config(self, **changes) -> CaloDiT:
        """The same weights under an updated config (slot map, objective, sampler, provenance): the mixin saves
        the constructor arguments, so a changed config means building the model again."""
        new = type(self)(**{**self._hub_mixin_config, **changes})
        new.load_state_dict(self.state_dict())
        return new

    def conditioning_parameter_names(self) -> list[str]:
        """The condition embedding, the adaLN modulation and the deposit net (a new detector's energy response and
        resolution): what `conditioning`-only adaptation trains."""
        return [n for n, _ in self.named_parameters()
                if n.startswith(("t_embed", "cond_embed", "deposit_net")) or ".adaLN." in n]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """The mixin's loader, with a shipped model's name (`calofm/pretrained`) read from its packaged folder."""
        from calofm.pretrained import shipped_model

        name = str(pretrained_model_name_or_path)
        return super().from_pretrained(shipped_model(name) or pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, config: dict | None = None, **kwargs):
        """Asking for `config` makes the mixin pass the whole config.json, so a key that `__init__` would silently
        drop (a typo, a newer calofm's option) is an error naming the file."""
        known = [name for name in cls._hub_mixin_init_parameters if name != "self"]
        unknown = sorted(set(config or {}) - set(known))
        if unknown:
            raise ValueError(f"{kwargs['model_id']}/config.json: unknown key {unknown[0]!r}; CaloDiT takes "
                             f"{', '.join(known)}")
        with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints on every local load
            return super()._from_pretrained(**kwargs)

    # Weights load from safetensors only, and strictly: a missing or unexpected key is an error.
    @classmethod
    def _load_as_safetensor(cls, model, model_file, map_location, strict):
        from safetensors import SafetensorError

        try:
            return super()._load_as_safetensor(model, model_file, map_location, True)
        except SafetensorError as e:
            raise ValueError(f"{model_file}: not a readable safetensors file ({e}); a pickle renamed, or a "
                             "truncated download?") from None
        except RuntimeError as e:  # torch's size / key mismatch: weights of another network than config.json's
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            raise ValueError(f"{model_file}: the weights do not fit the network this calofm builds from its "
                             f"config.json ({detail}); saved by another calofm version? Retrain, or delete the "
                             "folder so the run makes it again") from None

    @classmethod
    def _load_as_pickle(cls, model, model_file, map_location, strict):
        raise ValueError(f"{model_file}: calofm loads weights from model.safetensors only, not pickles")
