import math

import pytest
import torch

from calofm.data.transforms import N_COND
from calofm.diffusion import denoiser
from calofm.diffusion.edm import Churn, EDMParams, edm_loss, heun_sample, karras_sigmas, loss_weight, precond
from calofm.models.dit import CaloDiT

P = EDMParams()


def oracle(sigma_data):
    """The exact denoiser for Gaussian data N(0, sigma_data^2): E[x0 | x] = sigma_data^2/(sigma^2+sigma_data^2) x."""
    return lambda x, sigma, cond: (sigma_data**2 / (sigma**2 + sigma_data**2)).view(-1, 1, 1, 1) * x


@pytest.mark.parametrize("steps,tol", [(32, 0.02), (64, 0.01)])
def test_heun_sampler_with_oracle_returns_sigma_data(steps, tol):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 9, 16, 45, generator=g)
    x = heun_sample(oracle(P.sigma_data), noise, None, P, steps)
    assert abs(x.std().item() / P.sigma_data - 1) < tol
    assert abs(x.mean().item()) < 0.01


def test_churned_sampler_keeps_the_oracles_distribution_and_takes_its_noise_per_step():
    """EDM algorithm 2: the added noise keeps the exact denoiser's samples at std sigma_data; its draws are counted
    by `Churn.draws` and taken from `step_noise` when given, so a sample is reproducible from its noise alone."""
    churn = Churn(S_churn=40, S_min=0.05, S_max=50)  # gamma capped at sqrt(2) - 1 inside [S_min, S_max]
    sigmas = karras_sigmas(32, P.sigma_min, P.sigma_max, P.rho).tolist()
    hats = churn.levels(sigmas)
    assert [round(h / t, 6) for h, t in zip(hats, sigmas, strict=False) if h > t] == [round(math.sqrt(2), 6)] * 23
    assert churn.draws(32, P) == 23 and Churn().draws(32, P) == 0 and Churn(S_churn=8).draws(32, P) == 32

    g = torch.Generator().manual_seed(0)  # 128 steps: at 32 the churned steps' discretisation error is +5 % in std
    n = churn.draws(128, P)
    noise, steps = torch.randn(4000, 1, 2, 5, generator=g), torch.randn(n, 4000, 1, 2, 5, generator=g)
    x = heun_sample(oracle(P.sigma_data), noise, None, P, 128, churn=churn, step_noise=steps)
    assert abs(x.std().item() / P.sigma_data - 1) < 0.015 and abs(x.mean().item()) < 0.01
    again = heun_sample(oracle(P.sigma_data), noise, None, P, 128, churn=churn, step_noise=steps)
    torch.testing.assert_close(again, x, rtol=0, atol=0)
    with pytest.raises(IndexError):  # one draw short: the count is exact
        heun_sample(oracle(P.sigma_data), noise, None, P, 128, churn=churn, step_noise=steps[1:])
    plain = heun_sample(oracle(P.sigma_data), noise, None, P, 128)
    assert (x - plain).abs().mean() > 0.1  # the churn changed the path...
    torch.testing.assert_close(heun_sample(oracle(P.sigma_data), noise, None, P, 128, churn=Churn()), plain)  # ...off: none


def test_karras_schedule_endpoints_and_order():
    s = karras_sigmas(32, P.sigma_min, P.sigma_max, P.rho)
    assert len(s) == 33 and s[-1] == 0
    assert math.isclose(s[0].item(), P.sigma_max) and math.isclose(s[-2].item(), P.sigma_min, rel_tol=1e-9)
    assert torch.all(s[:-1] > s[1:])


def test_preconditioning_matches_edm_table():
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = precond(sigma, 0.5)
    # effective training target has unit variance: c_skip^2 sd^2 + c_out^2 ... and c_in scales input to unit std
    torch.testing.assert_close(c_in**2 * (sigma**2 + 0.25), torch.ones(3))
    torch.testing.assert_close(c_skip + c_out**2 / 0.25, torch.ones(3))  # c_skip + c_out^2/sd^2 = 1 for EDM
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(loss_weight(sigma, 0.5), 1 / c_out**2)


def test_edm_loss_of_oracle_equals_gaussian_bayes_error():
    """With the oracle the weighted loss is E[lambda * posterior variance] = 1 exactly at every sigma."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 9, 16, 45, generator=g) * P.sigma_data
    loss = edm_loss(oracle(P.sigma_data), x, None, P, g)
    assert abs(loss.item() - 1.0) < 0.02


def test_denoiser_of_untrained_dit_is_c_skip_times_x():
    """adaLN-Zero: an untrained CaloDiT outputs zero, so D(x) = c_skip x."""
    model = CaloDiT.from_preset("tiny")
    x = torch.randn(3, 9, 16, 45)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    cond = torch.zeros(3, N_COND + model.n_slots)
    c_skip = precond(sigma, 0.5)[0].view(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(model)(x, sigma, cond), c_skip * x)
