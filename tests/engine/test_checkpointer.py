"""SolqD2Checkpointer: untrusted files, model-zoo pickles, atomic saves, official-format hook."""

import argparse
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from solq_d2.checkpoint import (
    CheckpointMismatchError,
    SolqD2Checkpointer,
    UnsafeCheckpointError,
    safe_torch_load,
)
from solq_d2.checkpoint import checkpointer as ckpt_module


class _Payload:
    """Unpickling this runs ``os.system("touch <marker>")``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))


def _fresh(model):
    out = _model()
    for p in out.parameters():
        nn.init.constant_(p, 0.5)
    assert not torch.equal(out[0].weight, model[0].weight)
    return out


# ---------------------------------------------------------------------------- untrusted files
@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_pickle_payload_is_never_executed(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pth":
        torch.save({"model": {"0.weight": torch.zeros(1)}, "__author__": _Payload(marker)}, path)
    else:  # Detectron2 model-zoo layout, numpy weights
        with open(path, "wb") as f:
            pickle.dump({"model": {"0.weight": np.zeros(1)}, "__author__": _Payload(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load checkpoint") as info:
        SolqD2Checkpointer(_model()).load(str(path))
    assert "system" in str(info.value)  # names the forbidden global
    assert str(path) in str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_namespace_and_numpy_are_the_only_extra_types_allowed(tmp_path):
    path = tmp_path / "official_like.pth"
    torch.save(
        {
            "model": {"w": torch.ones(2), "n": np.arange(3, dtype=np.float32)},
            "args": argparse.Namespace(hidden_dim=384),
            "best": np.float64(0.5),
        },
        path,
    )
    loaded = safe_torch_load(str(path))
    assert loaded["args"].hidden_dim == 384
    np.testing.assert_array_equal(loaded["model"]["n"], np.arange(3, dtype=np.float32))
    assert loaded["best"] == 0.5
    torch.save({"model": {"w": torch.ones(2)}, "opt": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="SimpleNamespace"):
        safe_torch_load(str(path))


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": _model().state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="truncated, corrupt or not a PyTorch checkpoint"):
        SolqD2Checkpointer(_model()).load(str(path))


def test_detectron2_model_zoo_pkl_loads_numpy_weights(tmp_path):
    src = _model()
    state = {k: v.numpy() for k, v in src.state_dict().items()}
    zoo = tmp_path / "zoo.pkl"
    with open(zoo, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    dst = _fresh(src)
    SolqD2Checkpointer(dst).load(str(zoo))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_legacy_numpy_pkl_and_caffe2_blobs(tmp_path):
    """A numpy-1 era pickle (``numpy.core.multiarray``) with Caffe2's ``blobs`` layout."""
    src = _model()
    blobs = {k: v.numpy() for k, v in src.state_dict().items()}
    blobs["0.weight_momentum"] = np.zeros(1, dtype=np.float32)  # dropped, as Detectron2 does
    data = pickle.dumps({"blobs": blobs}, protocol=2)
    legacy = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n" in legacy
    path = tmp_path / "c2.pkl"
    path.write_bytes(legacy)
    loaded = SolqD2Checkpointer(_model())._load_file(str(path))
    assert loaded["__author__"] == "Caffe2" and loaded["matching_heuristics"] is True
    assert set(loaded["model"]) == set(src.state_dict())
    np.testing.assert_array_equal(loaded["model"]["0.weight"], src[0].weight.detach().numpy())


# ---------------------------------------------------------------------------- saving
def test_save_is_atomic_and_tags_last_checkpoint(tmp_path):
    model = _model()
    ckpt = SolqD2Checkpointer(model, str(tmp_path))
    ckpt.save("model_0000004", iteration=4)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]
    assert ckpt.has_checkpoint()
    dst = _fresh(model)
    extra = SolqD2Checkpointer(dst, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 4
    torch.testing.assert_close(dst[0].weight, model[0].weight)


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    ckpt = SolqD2Checkpointer(model, str(tmp_path))
    ckpt.save("model_0000004")
    before = (tmp_path / "model_0000004.pth").read_bytes()

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is stopped in the middle of the write

    monkeypatch.setattr(ckpt_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000009")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert (tmp_path / "model_0000004.pth").read_bytes() == before


def test_partial_files_are_never_picked_up(tmp_path):
    model = _model()
    ckpt = SolqD2Checkpointer(model, str(tmp_path))
    ckpt.save("model_0000004")
    good = (tmp_path / "model_0000004.pth").read_bytes()
    # what a SIGKILL during the next save leaves: a temporary file with half the bytes
    partial = tmp_path / f"model_0000009.pth{ckpt_module._TMP_MARK}12345"
    partial.write_bytes(good[: len(good) // 2])
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000004.pth")
    assert ckpt.get_all_checkpoint_files() == [str(tmp_path / "model_0000004.pth")]
    with pytest.raises(ValueError, match="partially written"):
        ckpt.load(str(partial))

    # a tag naming a truncated file (written by a non-atomic writer): newest complete file wins
    (tmp_path / "model_0000014.pth").write_bytes(good[: len(good) // 2])
    (tmp_path / "last_checkpoint").write_text("model_0000014.pth")
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000004.pth")
    (tmp_path / "model_0000004.pth").unlink()
    assert not ckpt.has_checkpoint()  # nothing complete left: start from MODEL.WEIGHTS


# ---------------------------------------------------------------------------- official formats
@pytest.fixture
def fake_converter(monkeypatch):
    """A converter for a made-up official format: {"official": {"conv1.w": ...}}."""
    mod = types.ModuleType("fake_convert_toy")
    mod.calls = []

    def matches(checkpoint):
        return isinstance(checkpoint, dict) and "official" in checkpoint

    def convert(checkpoint, model=None):
        mod.calls.append(model)
        renames = [
            (k, k.replace("conv1.w", "0.weight").replace("conv1.b", "0.bias"))
            for k in checkpoint["official"]
        ]
        out = {new: checkpoint["official"][old] for old, new in renames}
        return {"model": out, "renames": renames, "dropped": []}

    mod.matches, mod.convert = matches, convert
    monkeypatch.setitem(sys.modules, "fake_convert_toy", mod)
    monkeypatch.setattr(
        ckpt_module,
        "CONVERTER_MODULES",
        ("solq_d2.checkpoint.convert_does_not_exist", "fake_convert_toy"),
    )
    return mod


def _official_file(tmp_path, state, name="official.pth"):
    official = {
        k.replace("0.weight", "conv1.w").replace("0.bias", "conv1.b"): v for k, v in state.items()
    }
    path = tmp_path / name
    torch.save({"official": official, "args": argparse.Namespace(lr=2e-4), "epoch": 49}, path)
    return path


def test_official_checkpoint_is_converted_and_loaded_strictly(tmp_path, fake_converter):
    src = _model()
    path = _official_file(tmp_path, src.state_dict())
    dst = _fresh(src)
    leftover = SolqD2Checkpointer(dst).load(str(path))
    assert fake_converter.calls == [dst]  # the converter may check the config against the model
    assert "epoch" not in leftover and "args" not in leftover
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_official_checkpoint_mismatch_raises_before_loading(tmp_path, fake_converter, defect):
    src = _model()
    state = dict(src.state_dict())
    if defect == "missing":
        del state["2.bias"]
    elif defect == "unexpected":
        state["head.extra"] = torch.zeros(3)
    else:
        state["2.weight"] = torch.zeros(5, 4, 1, 1)
    path = _official_file(tmp_path, state)
    dst = _fresh(src)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        SolqD2Checkpointer(dst).load(str(path))
    text = str(info.value)
    expected = {
        "missing": "missing in checkpoint (1):\n    2.bias",
        "unexpected": "unexpected in checkpoint (1):\n    head.extra",
        "shape": "2.weight: checkpoint (5, 4, 1, 1) vs model (2, 4, 1, 1)",
    }[defect]
    assert expected in text
    for k, v in dst.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k])


def test_own_checkpoints_are_not_taken_for_official_ones(tmp_path):
    """With the real converter list (whichever converters exist), a solq_d2 checkpoint loads."""
    model = _model()
    SolqD2Checkpointer(model, str(tmp_path)).save("model_final", iteration=9)
    dst = _fresh(model)
    extra = SolqD2Checkpointer(dst).load(str(tmp_path / "model_final.pth"))
    assert extra["iteration"] == 9
    torch.testing.assert_close(dst[2].weight, model[2].weight)
