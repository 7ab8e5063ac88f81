"""Consistency distillation: the boundary condition, the loss's definition, the target EMA, training and resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from calofm.config import load_config
from calofm.data.transforms import N_COND
from calofm.diffusion import consistency, denoiser, edm, sample, shape_conditions
from calofm.diffusion.consistency import boundaries, cd_loss, multistep_sample, multistep_sigmas
from calofm.diffusion.edm import EDMParams
from calofm.models.dit import CaloDiT
from calofm.train.distill import CDObjective, distill, student_from

P = EDMParams()
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "distill-tiny.yaml"


def random_cd_model(seed=0) -> CaloDiT:
    """A cd-objective CaloDiT whose every weight is random (none of adaLN-Zero's zeros), so F(x) != 0."""
    torch.manual_seed(seed)
    model = CaloDiT.from_preset("tiny", objective="cd")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def oracle(x, sigma, cond):
    """The exact EDM denoiser of Gaussian data N(0, sigma_data^2)."""
    return (P.sigma_data**2 / (sigma**2 + P.sigma_data**2)).view(-1, 1, 1, 1) * x


def test_boundary_condition_is_exact_for_random_weights():
    model = random_cd_model()
    f = denoiser(model, P)
    x = torch.randn(4, 9, 16, 45)
    cond = torch.rand(4, N_COND + model.n_slots)
    assert torch.equal(f(x, torch.full((4,), P.sigma_min), cond), x)
    assert not torch.allclose(f(x, torch.full((4,), 0.5), cond), x, atol=1e-2)  # the network does contribute


def test_boundaries_are_the_edm_schedule_ascending():
    t = boundaries(32, P)
    s = edm.karras_sigmas(32, P.sigma_min, P.sigma_max, P.rho)[:-1].flip(0).float()
    assert len(t) == 32 and t[0].item() == pytest.approx(P.sigma_min) and t[-1].item() == pytest.approx(P.sigma_max)
    torch.testing.assert_close(t, s)
    assert multistep_sigmas(1, P) == [P.sigma_max]
    assert multistep_sigmas(2, P)[1] == pytest.approx(2.515, abs=1e-3)


@pytest.mark.parametrize("distance,weighting", [("l2", "uniform"), ("pseudo_huber", "inverse_dt")])
def test_cd_loss_is_heun_step_of_teacher_then_distance_to_target(monkeypatch, distance, weighting):
    """The loss, recomputed sample by sample with edm.heun_step on float sigmas, and the teacher step's callee:
    Song et al.'s mean squared difference with lambda = 1, and improved CT's pseudo-Huber with 1 / (t_{n+1} - t_n)."""
    assert consistency.heun_step is edm.heun_step
    calls = []

    def spy(*args):
        calls.append(args)
        return edm.heun_step(*args)

    monkeypatch.setattr(consistency, "heun_step", spy)
    f = lambda x, sigma, c: 0.9 * x + 0.1 * sigma.view(-1, 1, 1, 1)  # noqa: E731
    f_target = lambda x, sigma, c: 0.8 * x - 0.2 * sigma.view(-1, 1, 1, 1)  # noqa: E731
    x = torch.randn(6, 9, 16, 45, generator=torch.Generator().manual_seed(1)) * P.sigma_data
    loss = cd_loss(f, f_target, oracle, x, None, P, N=32, generator=torch.Generator().manual_seed(2),
                   distance=distance, weighting=weighting)
    assert len(calls) == 1 and calls[0][0] is oracle

    g = torch.Generator().manual_seed(2)  # the same draws, in the same order, as inside cd_loss
    n = torch.randint(0, 31, (6,), generator=g)
    z = torch.randn(x.shape, generator=g)
    t = boundaries(32, P).tolist()
    terms = []
    for i in range(6):
        t_n, t_n1 = t[n[i]], t[n[i] + 1]
        x_n1 = x[i:i + 1] + t_n1 * z[i:i + 1]
        x_hat = edm.heun_step(oracle, x_n1, t_n1, t_n, None)
        torch.testing.assert_close(calls[0][1][i:i + 1], x_n1)
        target = f_target(x_hat, torch.tensor([t_n]), None)
        sq = (f(x_n1, torch.tensor([t_n1]), None) - target) ** 2
        if distance == "l2":
            terms.append(sq.mean())
        else:  # c = 0.00054 sqrt(9 * 16 * 45)
            terms.append(((sq.sum() + 0.0434692**2).sqrt() - 0.0434692) / (t_n1 - t_n))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=0)


def test_pseudo_huber_is_quadratic_for_small_and_linear_for_large_differences():
    """d ~ |delta|^2 / 2c below c, and above it the gradient's norm is 1 whatever the size of the miss: one badly
    matched shower pulls no harder than a near miss (improved CT's reason for it), where L2 pulls in proportion."""
    a = torch.zeros(2, 9, 16, 45, requires_grad=True)
    c = 0.00054 * (9 * 16 * 45) ** 0.5
    small = torch.full((1, 9, 16, 45), 1e-5)
    assert consistency.cd_distance(a[:1], small, "pseudo_huber").item() == pytest.approx(
        small.pow(2).sum().item() / (2 * c), rel=1e-3)
    b = torch.zeros(2, 9, 16, 45)
    b[0, 0, 0, 0], b[1, 0, 0, 0] = 1.0, 100.0
    for kind, ratio in (("pseudo_huber", 1.0), ("l2", 100.0)):
        a.grad = None
        consistency.cd_distance(a, b, kind).sum().backward()
        norms = a.grad.flatten(1).norm(dim=1)
        assert (norms[1] / norms[0]).item() == pytest.approx(ratio, rel=1e-3)
    with pytest.raises(ValueError, match="distill.distance .* got 'l1'"):
        consistency.cd_distance(a, b, "l1")
    with pytest.raises(ValueError, match="distill.weighting .* got 'snr'"):
        consistency.cd_weight(P.sigma_max, P.sigma_max, "snr")


def test_distill_recipe_refuses_an_unknown_distance():
    with pytest.raises(ValueError, match="distill.distance must be one of l2, pseudo_huber, got 'huber'"):
        load_config(RECIPE, ["distill.distance=huber"])


def test_target_is_an_ema_of_the_student_and_only_the_student_learns():
    teacher = CaloDiT.from_preset("tiny")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.05)
    student = student_from(teacher)
    objective = CDObjective(teacher, student, N=32, mu=0.95)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    before = [p.detach().clone() for p in objective.target.model.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    batch = {"x": torch.randn(4, 9, 16, 45), "cond": torch.rand(4, N_COND + student.n_slots)}
    objective.loss(student, batch, torch.Generator().manual_seed(0)).backward()
    opt.step()
    objective.after_step(student, 1)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in objective.target.model.parameters())
    moved = 0
    for b, e, s in zip(before, objective.target.model.parameters(), student.parameters()):
        torch.testing.assert_close(e, 0.95 * b + 0.05 * s.detach(), rtol=1e-6, atol=1e-7)
        moved += not torch.equal(b, s)
    assert moved > 0


def test_multistep_sampler_renoises_between_steps():
    f = lambda x, sigma, c: torch.zeros_like(x)  # noqa: E731  # f = 0: the output is what the last step saw
    seen = []

    def f_spy(x, sigma, c):
        seen.append((x.std().item(), sigma[0].item()))
        return f(x, sigma, c)

    noise = torch.randn(64, 9, 16, 45, generator=torch.Generator().manual_seed(0))
    multistep_sample(f_spy, noise, None, P, steps=3, generator=torch.Generator().manual_seed(1))
    taus = multistep_sigmas(3, P)
    assert [s for _, s in seen] == pytest.approx(taus)
    for (std, _), tau in zip(seen, taus):  # x_tau = 0 + sqrt(tau^2 - eps^2) z
        assert std == pytest.approx((tau**2 - P.sigma_min**2) ** 0.5, rel=0.01)


def distill_cfg(data_dir, teacher, out, steps, **extra):
    sets = [f"data.dir={data_dir}", f"output_dir={out}", f"train.steps={steps}", "train.batch_size=16",
            "train.log_every=1", "train.lr=5e-4", "data.chunk_size=64"] + [f"{k}={v}" for k, v in extra.items()]
    cfg = load_config(RECIPE, sets)
    cfg.distill.teacher = str(teacher)
    return cfg


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, data_dir, tiny_edm):
    out = tmp_path_factory.mktemp("distill")
    return distill(distill_cfg(data_dir, tiny_edm, out, 80, **{"train.checkpoint_every": 40}))


def test_cd_loss_falls_and_saved_model_samples(distilled, tiny_edm):
    rows = [json.loads(line) for line in (distilled.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 80
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)

    model = CaloDiT.from_pretrained(distilled)
    assert model.objective == "cd" and model.sampler["steps"] == 1 and model.sampler["name"] == "consistency"
    teacher = CaloDiT.from_pretrained(tiny_edm)
    assert model.slot_map == teacher.slot_map and model.normalizer == teacher.normalizer
    assert model.provenance["teacher"] == str(tiny_edm) and model.provenance["steps"] == 80
    cond = torch.zeros(3, N_COND + model.n_slots)
    cond[:, 4] = 1
    noise = torch.randn(3, 9, 16, 45, generator=torch.Generator().manual_seed(0))
    f = denoiser(model, P)
    x, deposit = sample(model, noise, cond)  # dispatches on model.objective: one evaluation of f at sigma_max
    # (after the deposit, drawn first by the teacher's deposit net, which the student keeps unchanged)
    torch.testing.assert_close(model.deposit_net.state_dict(), teacher.deposit_net.state_dict())
    full = shape_conditions(cond, deposit)
    torch.testing.assert_close(x, f(noise * P.sigma_max, torch.full((3,), P.sigma_max), full))


def test_resume_equals_uninterrupted_run(distilled, data_dir, tiny_edm, tmp_path):
    """Resume from the uninterrupted run's step-40 checkpoint: the shipped target weights come out identical."""
    resumed = tmp_path / "resumed"
    shutil.copytree(distilled.parent / "checkpoints" / "step_0000040", resumed / "checkpoints" / "step_0000040")
    with pytest.raises(ValueError, match="pass --resume"):
        distill(distill_cfg(data_dir, tiny_edm, resumed, 80, **{"train.checkpoint_every": 40}))
    out = distill(distill_cfg(data_dir, tiny_edm, resumed, 80, **{"train.checkpoint_every": 40}), resume=True)
    a, b = CaloDiT.from_pretrained(distilled).state_dict(), CaloDiT.from_pretrained(out).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_weights_ema_saves_the_students_power_ema_and_resumes_exactly(data_dir, tiny_edm, tmp_path):
    """distill.weights=ema: the run trains the same student (the saved EMA is not the target of the same run), its
    provenance says which weights it holds, and a run resumed from its step-10 checkpoint saves the same EMA."""
    with pytest.raises(ValueError, match="distill.weights must be one of target, ema, got 'student'"):
        load_config(RECIPE, ["distill.weights=student"])
    runs = {w: distill(distill_cfg(data_dir, tiny_edm, tmp_path / w, 20, **{"distill.weights": w,
                                                                           "train.checkpoint_every": 10}))
            for w in ("target", "ema")}
    losses = {w: [json.loads(line)["loss"] for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
              for w, out in runs.items()}
    assert losses["target"] == losses["ema"]  # one student trained: only what is saved differs
    ema, target = (CaloDiT.from_pretrained(runs[w]) for w in ("ema", "target"))
    assert ema.provenance["weights"].startswith("power-decay EMA of the student")
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), target.state_dict().values()))
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["ema"].parent / "checkpoints" / "step_0000010", resumed / "checkpoints" / "step_0000010")
    out = distill(distill_cfg(data_dir, tiny_edm, resumed, 20, **{"distill.weights": "ema",
                                                                  "train.checkpoint_every": 10}), resume=True)
    for k, v in CaloDiT.from_pretrained(out).state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k


def test_distill_refuses_a_missing_or_non_edm_teacher(distilled, data_dir, tmp_path):
    with pytest.raises(ValueError, match="distill.teacher is not set"):
        distill(distill_cfg(data_dir, "", tmp_path / "a", 2))
    with pytest.raises(ValueError, match="must be an EDM or FM model, but its objective is .cd."):
        distill(distill_cfg(data_dir, distilled, tmp_path / "b", 2))


def test_depth_pruned_student_starts_from_every_other_teacher_block_and_distils(data_dir, tiny_edm, tmp_path):
    """distill.student_depth=1 from the 2-block teacher: block 0 and every non-block weight are the teacher's, the
    loss falls, and the saved 1-block model loads and samples; depths outside [1, teacher's] are refused."""
    from calofm.train.distill import pruned_blocks

    assert pruned_blocks(6, 3) == [0, 2, 4] and pruned_blocks(6, 2) == [0, 3] and pruned_blocks(2, 1) == [0]
    with pytest.raises(ValueError, match=r"distill.student_depth must be in \[1, 2\].*got 3"):
        pruned_blocks(2, 3)
    teacher = CaloDiT.from_pretrained(tiny_edm)
    student = student_from(teacher, 1)
    assert student.depth == 1 and len(student.blocks) == 1
    t = teacher.state_dict()
    for k, v in student.state_dict().items():
        assert torch.equal(v, t[k]), k  # blocks.0.* is the teacher's blocks.0.*

    out = distill(distill_cfg(data_dir, tiny_edm, tmp_path / "pruned", 40, **{"distill.student_depth": 1}))
    losses = [json.loads(line)["loss"] for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    model = CaloDiT.from_pretrained(out)
    assert model.depth == 1 and model.provenance["student_blocks"] == [0]
    cond = torch.zeros(2, N_COND + model.n_slots)
    cond[:, 4] = 1
    x, _ = sample(model, torch.randn(2, 9, 16, 45), cond)
    assert x.shape == (2, 9, 16, 45) and torch.isfinite(x).all()
