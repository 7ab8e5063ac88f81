"""Flow matching (calofm.diffusion.flow, model.objective fm): the loss's definition, the Euler and Heun samplers
and the EDM view of an FM model against the exact velocity of Gaussian data; an FM model pretrains, saves, loads,
samples and teaches consistency distillation."""

import json

import numpy as np
import pytest
import torch

from calofm.config import ConfigError, load_config
from calofm.diffusion import denoiser, network_evaluations, sampler_params
from calofm.diffusion.flow import FMParams, as_denoiser, fm_loss, fm_sample, sample_t
from calofm.generate import generate_showers
from calofm.hub import load_model
from calofm.train.distill import cd_sampler, student_from

S = 0.5  # data x_0 ~ N(0, S^2)


def exact_velocity(x, t, cond):
    """E[z - x_0 | x_t] for Gaussian data: (t - (1 - t) S^2) / ((1 - t)^2 S^2 + t^2) x_t."""
    t = t.view(-1, *([1] * (x.ndim - 1)))
    return (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * x


def test_fm_loss_regresses_the_ot_path_velocity():
    x, p = torch.randn(6, 3, 2), FMParams(0.3, 0.7)
    seen = {}

    def v(x_t, t, cond):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    loss = fm_loss(v, x, None, p, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = sample_t(6, p, g)
    z = torch.randn(x.shape, generator=g)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], (1 - t.view(-1, 1, 1)) * x + t.view(-1, 1, 1) * z)
    torch.testing.assert_close(loss, ((z - x) ** 2).mean())


def test_samplers_map_noise_to_the_data_scale_and_heun_is_second_order():
    """With the exact velocity the ODE maps x_1 = z to x_0 = S z: Heun within 1e-3 at 32 steps, Euler's error
    falling ~linearly with the steps."""
    z = torch.randn(200, 4)
    heun = fm_sample(exact_velocity, z, None, 32, "heun")
    assert (heun / z).mean().item() == pytest.approx(S, rel=1e-3)
    err = [abs((fm_sample(exact_velocity, z, None, n, "euler") / z).mean().item() - S) for n in (8, 32)]
    assert err[1] < err[0] / 3 and err[1] < 0.05 * S
    with pytest.raises(ValueError, match="solver must be one of euler, heun, got 'rk4'"):
        fm_sample(exact_velocity, z, None, 2, "rk4")


def test_an_fm_model_is_the_edm_denoiser_of_its_path():
    """as_denoiser of the exact velocity is EDM's exact denoiser S^2 / (S^2 + sigma^2) x."""
    x, sigma = torch.randn(3, 5), torch.tensor([0.01, 1.0, 80.0])
    torch.testing.assert_close(as_denoiser(exact_velocity)(x, sigma, None),
                               (S**2 / (S**2 + sigma**2)).view(-1, 1) * x)


def test_config_refuses_unknown_objectives_and_solvers():
    with pytest.raises(ConfigError, match="model.objective must be edm or fm .* got 'cd'"):
        load_config(None, ["model.objective=cd"])
    with pytest.raises(ConfigError, match="fm.solver must be heun or euler, got 'rk4'"):
        load_config(None, ["fm.solver=rk4"])


@pytest.fixture(scope="module")
def fm_model(tmp_path_factory, data_dir):
    from calofm.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("fm")
    cfg = load_config(None, [f"data.dir={data_dir}", f"output_dir={out}", "train.steps=40", "train.batch_size=16",
                             "train.checkpoint_every=1000", "train.lr=2e-3", "train.log_every=1",
                             "model.patch=[3,4,5]", "model.objective=fm", "fm.solver=euler", "fm.steps=4"])
    return pretrain(cfg)


def test_fm_model_trains_saves_loads_and_samples(fm_model):
    losses = [json.loads(line)["loss"] for line in (fm_model.parent / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    model = load_model(fm_model)
    assert model.objective == "fm" and model.sampler == {"name": "euler", "steps": 4}
    assert network_evaluations(model) == 4 and network_evaluations(model.with_config(
        sampler={"name": "heun", "steps": 4})) == 8
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    s = generate_showers(model, "odd", np.full(3, 2e4), np.full(3, 1.5), np.full(3, 0.3), seed=1)
    assert len(calls) == 4 and s.showers.shape == (3, 9, 16, 45) and np.isfinite(s.showers).all()
    assert (s.showers.sum((1, 2, 3)) > 0).all()


def test_consistency_distillation_takes_an_fm_teacher(fm_model, data_dir, tmp_path):
    from calofm.train.distill import distill

    cfg = load_config(None, [f"data.dir={data_dir}", f"output_dir={tmp_path}", "train.steps=4", "train.batch_size=8",
                             "train.checkpoint_every=100", "train.log_every=1", "distill.n_boundaries=4"])
    cfg.distill.teacher = str(fm_model)
    model = load_model(distill(cfg))
    assert model.objective == "cd" and model.provenance["teacher"] == str(fm_model)
    assert model.sampler["teacher_objective"] == "fm"  # saved, so the loaded student keeps its parametrisation
    s = generate_showers(model, "odd", np.full(2, 2e4), np.full(2, 1.5), np.full(2, 0.3), seed=1)
    assert np.isfinite(s.showers).all()


def test_an_fm_teachers_student_starts_as_its_denoiser_and_meets_the_boundary_condition(fm_model):
    """The student made of an FM teacher's weights is, before any CD step, the teacher's x_0 estimate where
    sigma >> sigma_data (one-step sampling starts at sigma_max), and the identity at sigma_min."""
    teacher = load_model(fm_model)
    student = student_from(teacher, sampler=cd_sampler(1, teacher))
    p = sampler_params(teacher)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(4, 9, 16, 45, generator=g), torch.rand(4, teacher.n_cond + 1, generator=g)
    f, D = denoiser(student, p), denoiser(teacher, p)
    T = torch.full((4,), p.sigma_max)
    # f - D = c_skip (x_T - D), c_skip(80) = 3.9e-5 and |x_T| <= 80 x 4.5 here: within 0.016
    torch.testing.assert_close(f(x * p.sigma_max, T, cond), D(x * p.sigma_max, T, cond), rtol=0, atol=0.016)
    torch.testing.assert_close(f(x, torch.full((4,), p.sigma_min), cond), x, rtol=0, atol=0)
    # the same weights read as EDM's F (a student saved without `teacher_objective`) are far from the teacher
    edm_reading = denoiser(student, p, teacher="edm")(x * p.sigma_max, T, cond)
    assert (edm_reading - D(x * p.sigma_max, T, cond)).abs().mean() > 0.1
