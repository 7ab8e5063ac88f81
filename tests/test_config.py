import pytest

from calofm.config import ConfigError, load_config, save_config


def test_recipe_and_overrides_are_typed(tmp_path):
    cfg = load_config("recipes/pretrain-tiny.yaml", ["train.steps=7", "train.lr=1e-4", "data.detectors=[odd]",
                                                     "output_dir=x", "train.ema_max=1"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-4 and cfg.data.detectors == ["odd"]
    assert cfg.output_dir == "x" and isinstance(cfg.train.ema_max, float)
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=many", "train.steps: expected int, got 'many'"),
    ("model.preset=[a]", "model.preset: expected str"),
    ("train=3", "train: expected a mapping"),
    ("nokey", "dotted.key=value"),
    ("edm.p_std=0", r"edm.p_std must be a finite number in \(0, inf\), got 0"),
    ("edm.sigma_data=-0.5", r"edm.sigma_data must be a finite number in \(0, inf\)"),
    ("edm.s_churn=-1", r"edm.s_churn must be a finite number in [0, inf\), got -1"),
    ("edm.s_max=0.01", r"edm.s_max must be a finite number in [0.05, inf\), got 0.01"),  # below s_min
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("recipes/pretrain-tiny.yaml", [override])


def test_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)


def test_paper_recipe_holds_the_papers_hyperparameters():
    cfg = load_config("recipes/pretrain-paper.yaml")
    t = cfg.train
    assert (cfg.model.preset, t.steps, t.batch_size, t.lr, t.weight_decay) == ("paper", 100_000, 256, 5e-4, 1e-4)
    assert (t.warmup_frac, t.decay_frac, t.ema_max) == (0.1, 0.4, 0.999)
    assert len(cfg.data.detectors) == 4
