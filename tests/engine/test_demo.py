"""tools/demo.py on a tiny dataset declared in YAML (DATASETS.COCO_INSTANCES), toy model."""

import importlib.util

import pytest
from PIL import Image

import engine_toy

DEMO = engine_toy.REPO_ROOT / "tools" / "demo.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("solq_d2_tools_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_trains_evaluates_and_draws(tmp_path, capsys):
    demo = _load_demo()
    name = f"engine_demo_{tmp_path.name}"
    json_file, image_root = engine_toy.write_tiny_coco(tmp_path / "ds", num_images=4)
    cfg = engine_toy.make_cfg(name, name)
    cfg.DATASETS.COCO_INSTANCES = [[name, json_file, image_root]]
    config = tmp_path / "toy.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "out"

    results = demo.main(
        [
            "--output",
            str(out),
            "--config-file",
            str(config),
            "--max-iter",
            "3",
            "--num-images",
            "2",
            "--confidence-threshold",
            "0.0",
            "--opts",
            "SOLVER.BASE_LR",
            "0.002",
        ]
    )
    assert {"bbox", "segm"} <= set(results) and "AP" in results["segm"]
    printed = capsys.readouterr().out
    assert f"bbox AP on {name}:" in printed and f"segm AP on {name}:" in printed
    assert "|  AP   |  AP50  |" in printed
    for png in [out / "losses.png", *sorted((out / "predictions").glob("*.png"))]:
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100, png
    assert len(list((out / "predictions").glob("*.png"))) == 2
    assert (out / "train" / "model_final.pth").is_file()
    saved = (out / "train" / "config.yaml").read_text()
    assert "MAX_ITER: 3" in saved and "BASE_LR: 0.002" in saved


def test_missing_config_is_a_clear_error(tmp_path):
    demo = _load_demo()
    with pytest.raises(SystemExit, match="does not exist.*--config-file"):
        demo.main(["--output", str(tmp_path), "--config-file", str(tmp_path / "nope.yaml")])


def test_schedule_scaling():
    demo = _load_demo()
    cfg = engine_toy.make_cfg("unused")
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 2000, (1600, 1900)
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = 50, 1000
    demo.scale_schedule(cfg, 500)
    assert cfg.SOLVER.MAX_ITER == 500 and tuple(cfg.SOLVER.STEPS) == (400, 475)
    assert cfg.SOLVER.WARMUP_ITERS == 12 and cfg.SOLVER.CHECKPOINT_PERIOD == 250
    demo.scale_schedule(cfg, 0.4)  # a budget too small for one iteration still trains one
    assert cfg.SOLVER.MAX_ITER == 1 and tuple(cfg.SOLVER.STEPS) == ()
