"""The Domain contract (#13): resolve is pure, collate_fn depends only on the config it is made from, and a
checkpoint is read one way (registry.read_run / pipeline.load_run) whoever reads it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from multidiff import pipeline
from multidiff.config import ConfigError
from multidiff.registry import get_domain, read_run, run_config_class

CKPTS = Path(__file__).resolve().parents[1] / "data" / "checkpoints"


def test_toy_resolve_and_collate_fn() -> None:
    dom = get_domain("toy")
    cfg = pipeline.load_run_config(dom, None, ["data.num_train=16"])
    assert dom.resolve(cfg) is cfg  # nothing derived from data: the same config
    ds = dom.build_dataset(cfg)
    x, label = dom.collate_fn(cfg)([ds[i] for i in range(4)])
    assert x.shape == (4, 2) and label.shape == (4,)
    with pytest.raises(ValueError, match="data.components"):
        dom.resolve(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, components=0)))


def test_audio_resolve_fills_class_names_without_touching_its_argument() -> None:
    dom = get_domain("audio")
    cfg = run_config_class(dom)()
    assert cfg.data.class_names is None
    resolved = dom.resolve(cfg)
    assert cfg.data.class_names is None  # pure
    assert resolved.data.class_names == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert dom.resolve(resolved) is resolved and resolved.model == cfg.model


def test_read_run_is_the_one_checkpoint_reader() -> None:
    run = pipeline.load_run(CKPTS / "molecules.safetensors")
    assert run.domain.name == "molecules" and sum(run.cfg.data.n_atoms_counts) > 0 and run.step is not None
    model = pipeline.load_model(CKPTS / "molecules.safetensors")
    assert model.cfg == run.cfg and model.path == run.path
    same = read_run(run.checkpoint, run.domain)  # domain code passes its own domain: no registry lookup
    assert same.cfg == run.cfg
    with pytest.raises(ConfigError, match=r"a checkpoint of domain 'molecules', not 'toy'"):
        read_run(run.checkpoint, get_domain("toy"))
    with pytest.raises(ConfigError, match=r"molecules.safetensors: weights do not match the model"):
        run.load_into(nn.Linear(2, 2), "denoiser.")
    assert isinstance(next(iter(run.checkpoint.weights().values())), torch.Tensor)
