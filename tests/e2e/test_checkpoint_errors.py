"""A checkpoint that does not fit the model fails at load with the key (and shapes) named."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

import mstar
from mstar.weights import WeightLoadError


def broken(tiny_ckpt, tmp_path, edit) -> str:
    shutil.copy(tiny_ckpt / "config.json", tmp_path / "config.json")
    tensors = load_file(tiny_ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return str(tmp_path)


def test_missing_key(tiny_ckpt, tmp_path):
    path = broken(tiny_ckpt, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        mstar.load("testvla", model_path=path, max_seq_len=64)


def test_extra_key(tiny_ckpt, tmp_path):
    import torch

    path = broken(tiny_ckpt, tmp_path,
                  lambda t: t.__setitem__("model.layers.0.surprise.weight", torch.zeros(2)))
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.surprise\.weight"):
        mstar.load("testvla", model_path=path, max_seq_len=64)


def test_wrong_shape_names_both_shapes(tiny_ckpt, tmp_path):
    def shrink(t):
        t["model.norm.weight"] = t["model.norm.weight"][:10]

    path = broken(tiny_ckpt, tmp_path, shrink)
    with pytest.raises(WeightLoadError) as err:
        mstar.load("testvla", model_path=path, max_seq_len=64)
    assert "model.norm.weight" in str(err.value)
    assert "10" in str(err.value) and "64" in str(err.value)
