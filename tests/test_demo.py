"""The demo's stage folders: an interrupted stage continues, a stage made from other inputs is redone (its old
folder kept aside as <stage>.stale), never reported as this run's (calofm.demo.stage_folder)."""

import json

from calofm.demo import DemoContext, stage_folder, weights_digest
from calofm.pretrained import SHIPPED


def test_stage_folders_continue_with_the_same_inputs_and_are_redone_with_other_ones(tmp_path, capsys):
    def run(**inputs):
        ctx = DemoContext(tmp_path, quick=True)
        data = stage_folder(ctx, "data", n=1)
        return data, stage_folder(ctx, "adapt", **inputs)

    _, adapt = run(weights="a")
    (adapt / "cd").mkdir()
    assert run(weights="a")[1] == adapt and (adapt / "cd").is_dir()  # interrupted or finished: kept
    assert json.loads((adapt / "inputs.json").read_text())["upstream"]["data"]["n"] == 1

    run(weights="b")  # a re-shipped base model: redone, the old results set aside
    assert not (adapt / "cd").exists() and (tmp_path / "adapt.stale" / "cd").is_dir()
    assert json.loads((adapt / "inputs.json").read_text())["weights"] == "b"
    assert "moved to" in capsys.readouterr().out

    (adapt / "inputs.json").unlink()  # a folder from a calofm without stamps
    (adapt / "x").write_text("old")
    run(weights="b")
    assert not (adapt / "x").exists() and (tmp_path / "adapt.stale" / "x").exists()


def test_weights_digest_names_the_shipped_weights():
    assert len(weights_digest(SHIPPED)) == 64 and weights_digest(SHIPPED) != weights_digest(SHIPPED + "-cd")
