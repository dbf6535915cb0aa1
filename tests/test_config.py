"""Config loading: typed sections, precise errors (file, line, dotted key, what is allowed), overrides, round-trips."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from multidiff.checkpoint import load_weights, save_weights
from multidiff.config import (
    ConfigError,
    positive,
    apply_overrides,
    config_from_dict,
    config_from_yaml,
    config_to_dict,
    config_to_yaml,
    load_config,
    parse_overrides,
    save_config,
)
from multidiff.training import TrainConfig


@dataclass
class ModelCfg:
    """A stand-in for a domain's model section."""

    channels: int = 32
    dims: tuple[int, ...] = (1, 2, 4)
    kind: Literal["unet", "mlp"] = "unet"
    dropout: float = 0.0
    name: str = "net"
    norm: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Inner:
    """A nested section with a required key."""

    path: Path
    size: int = 1


@dataclass
class RunCfg:
    """A stand-in for a domain's full run config."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelCfg = field(default_factory=ModelCfg)
    tags: list[str] = field(default_factory=list)
    data: Inner | None = None


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    """Write a YAML recipe and return its path."""
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_valid_file_types_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "train:\n  lr: 3e-4\n  steps: 100\n  betas: [0.8, 0.99]\n  max_minutes: 5\n"
        "model:\n  dims: [1, 2]\n  kind: mlp\n  dropout: 0\n  extra: {a: 1, b: 2.5}\n"
        "tags: [x, y]\ndata:\n  path: /tmp/data\n",
    )
    cfg = load_config(path, RunCfg)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 would read '3e-4' as a string
    assert cfg.train.steps == 100 and cfg.train.betas == (0.8, 0.99)
    assert cfg.train.max_minutes == 5.0 and isinstance(cfg.train.max_minutes, float)
    assert cfg.model.dims == (1, 2) and cfg.model.kind == "mlp" and isinstance(cfg.model.dropout, float)
    assert cfg.model.extra == {"a": 1.0, "b": 2.5}
    assert cfg.tags == ["x", "y"] and cfg.data == Inner(Path("/tmp/data"))
    assert cfg.train.batch_size == TrainConfig().batch_size  # unspecified keys keep their defaults


def test_unknown_key_names_file_line_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 10\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, RunCfg)
    msg = str(e.value)
    assert f"{path}:3" in msg and "train.lrr" in msg and "unknown key" in msg
    assert "did you mean 'lr'" in msg
    assert "allowed keys in 'train': " in msg and "batch_size" in msg and "warmup_steps" in msg
    with pytest.raises(ConfigError, match="allowed keys at the top level: data, model, tags, train"):
        load_config(write(tmp_path, "trian: {}\n"), RunCfg)


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, RunCfg)
    assert str(e.value) == f"{path}:2: train.steps: expected int, got str 'many'"
    assert e.value.errors == [(f"{path}:2", "train.steps", "expected int, got str 'many'")]
    for text, needle in [
        ("train:\n  steps: 1.5\n", "train.steps: expected int, got float 1.5"),
        ("train:\n  steps: true\n", "train.steps: expected int, got bool True"),
        ("train:\n  lr: fast\n", "train.lr: expected float, got str 'fast'"),
        ("train:\n  betas: [0.9]\n", "train.betas: expected a list of 2 items (float, float), got 1 items"),
        ("train:\n  max_minutes: soon\n", "train.max_minutes: expected float or null, got str 'soon'"),
        ("model:\n  dims: [1, x]\n", "model.dims[1]: expected int, got str 'x'"),
        ("model:\n  extra: {a: b}\n", "model.extra.a: expected float, got str 'b'"),
        ("model: 3\n", "model: expected a mapping (ModelCfg), got int 3"),
        ("data: {size: 2}\n", "data.path: missing required key (expected Path)"),
    ]:
        with pytest.raises(ConfigError, match="^" + str(path).replace(".", r"\.")) as e:
            load_config(write(tmp_path, text), RunCfg)
        assert needle in str(e.value), (text, str(e.value))


def test_bad_literal_lists_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  precision: fp16\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, RunCfg)
    assert f"{path}:2: train.precision: expected one of 'fp32', 'bf16'; got str 'fp16'" == str(e.value)


def test_all_errors_reported_at_once_and_section_checks(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: x\n  lr: y\nmodel:\n  kind: cnn\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, RunCfg)
    assert str(e.value).startswith("3 config errors:")
    assert [k for _, k, _ in e.value.errors] == ["train.steps", "train.lr", "model.kind"]
    with pytest.raises(ConfigError, match=r"recipe\.yaml:1: train: invalid TrainConfig: lr must be > 0"):
        load_config(write(tmp_path, "train: {lr: -1.0}\n"), RunCfg)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    write(tmp_path, "train: {}\n", "base.yaml")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(missing, RunCfg)
    assert str(missing) in str(e.value) and "not found" in str(e.value) and "base.yaml" in str(e.value)
    with pytest.raises(ConfigError, match=r"recipe\.yaml:3: invalid YAML"):
        load_config(write(tmp_path, "train:\n  lr: 1\n lr: [\n"), RunCfg)
    with pytest.raises(ConfigError, match=r"recipe\.yaml:3: train\.lr: duplicate key \(first defined on line 2\)"):
        load_config(write(tmp_path, "train:\n  lr: 1.0\n  lr: 2.0\n"), RunCfg)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n"), RunCfg)
    assert load_config(write(tmp_path, ""), RunCfg) == RunCfg()  # empty file: all defaults
    assert load_config(write(tmp_path, "train:\n"), RunCfg) == RunCfg()  # empty section: its defaults


def test_parse_overrides_yaml_scalars() -> None:
    got = parse_overrides(
        ["train.lr=3e-4", "model.dims=[1,2]", "train.precision=bf16", "train.max_minutes=null", "x.y.z=true"]
    )
    assert got == {
        "train": {"lr": 3e-4, "precision": "bf16", "max_minutes": None},
        "model": {"dims": [1, 2]},
        "x": {"y": {"z": True}},
    }
    assert isinstance(got["train"]["lr"], float)
    for bad in ["train.lr", "=3", "train..lr=1", "1train=2"]:
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_overrides([bad])


def test_overrides_apply_and_errors_name_the_override(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  steps: 10\nmodel:\n  channels: 16\n")
    cfg = load_config(
        path, RunCfg, ["train.lr=3e-4", "model.channels=64", "model.dims=[8,16]", "model.name=007",
                       "model.extra.w=2", "train.max_minutes=1.5", "tags=[a]"]
    )
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 10 and cfg.model.channels == 64
    assert cfg.model.dims == (8, 16) and cfg.model.name == "007"  # a str field keeps the override's text
    assert cfg.model.extra == {"w": 2.0} and cfg.train.max_minutes == 1.5 and cfg.tags == ["a"]
    assert load_config(None, RunCfg, ["train.steps=5"]).train.steps == 5
    with pytest.raises(ConfigError) as e:
        load_config(path, RunCfg, ["train.lrr=1"])
    assert str(e.value).startswith("command-line override 'train.lrr=1': train.lrr: unknown key (did you mean 'lr'?)")
    with pytest.raises(ConfigError, match=r"^command-line override 'train\.steps=ten': train\.steps: expected int"):
        load_config(path, RunCfg, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"^command-line override 'train\.precision=fp8': .*'fp32', 'bf16'"):
        load_config(path, RunCfg, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"^<ckpt>: train\.lr: expected float"):
        apply_overrides(RunCfg, {"train": {"lr": "x"}}, ["train.steps=3"], source="<ckpt>")


def test_yaml_and_json_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, RunCfg, ["train.lr=3e-4", "model.dims=[3]", "data.path=/x", "model.norm=group"])
    assert config_from_yaml(RunCfg, config_to_yaml(cfg)) == cfg
    save_config(cfg, tmp_path / "a.yaml")
    save_config(cfg, tmp_path / "a.json")
    assert load_config(tmp_path / "a.yaml", RunCfg) == cfg
    assert config_from_dict(RunCfg, json.loads((tmp_path / "a.json").read_text())) == cfg


def test_round_trip_through_checkpoint_metadata(tmp_path: Path) -> None:
    cfg = load_config(None, RunCfg, ["train.lr=1e-3", "model.kind=mlp", "train.betas=[0.5,0.6]"])
    model = torch.nn.Linear(2, 2)
    save_weights(tmp_path / "w.safetensors", model, model, config_to_dict(cfg))
    _, _, stored, _ = load_weights(tmp_path / "w.safetensors")
    back = config_from_dict(RunCfg, stored, source=str(tmp_path / "w.safetensors"))
    assert back == cfg and back.train.betas == (0.5, 0.6)
    stored["train"]["precision"] = "fp16"
    with pytest.raises(ConfigError, match=r"w\.safetensors: train\.precision: expected one of"):
        config_from_dict(RunCfg, stored, source=str(tmp_path / "w.safetensors"))


def test_yaml_12_scalars(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "model:\n  name: yes\n  norm: 2024-01-01\ntrain:\n  lr: 1e-3\n"), RunCfg)
    assert cfg.model.name == "yes" and cfg.model.norm == "2024-01-01" and cfg.train.lr == 1e-3
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got str '010'"):  # not octal 8
        load_config(write(tmp_path, "train:\n  steps: 010\n"), RunCfg)
    with pytest.raises(ConfigError, match=r"train\.precision: expected one of 'fp32', 'bf16'; got bool False"):
        load_config(write(tmp_path, "train:\n  precision: false\n"), RunCfg)


def test_section_check_failing_on_an_override_names_the_argument(tmp_path: Path) -> None:
    """A section's own check (TrainConfig.__post_init__) broken by an override blames the override, not the file."""
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  steps: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, RunCfg, ["train.lr=-1"])
    assert str(e.value).startswith("command-line override 'train.lr=-1': train.lr: ") and "lr must be > 0" in str(e.value)
    assert "recipe.yaml" not in str(e.value)
    bad_file = write(tmp_path, "train:\n  lr: -1.0\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"^.*bad\.yaml:1: train: invalid TrainConfig: lr must be > 0"):
        load_config(bad_file, RunCfg, ["train.steps=3"])  # the file's value is at fault, not the override


@dataclass
class Sized:
    """A section with `positive` fields."""

    width: int = positive(8)
    scale: float = positive(1.0)
    dims: tuple[int, ...] = positive((1, 2))
    limit: int | None = positive(None)
    offset: int = 0


@dataclass
class SizedRun:
    """A run config with a `positive` section."""

    model: Sized = field(default_factory=Sized)


def test_positive_fields_reject_zero_and_negative_sizes(tmp_path: Path) -> None:
    assert load_config(None, SizedRun, ["model.offset=-3", "model.limit=2"]).model.limit == 2
    for override, message in [("model.width=0", "must be >= 1, got 0"), ("model.scale=0", "must be > 0, got 0.0"),
                              ("model.dims=[4,0]", "must be >= 1, got (4, 0)"), ("model.limit=-1", ">= 1")]:
        with pytest.raises(ConfigError, match=rf"^command-line override '{re.escape(override)}': .*{re.escape(message)}"):
            load_config(None, SizedRun, [override])
    path = write(tmp_path, "model:\n  width: 4\n  scale: -2.0\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:3: model\.scale: must be > 0"):
        load_config(path, SizedRun)


def test_mapping_override_replaces_instead_of_merging(tmp_path: Path) -> None:
    """`key={}` on the command line clears the recipe's mapping; a dotted key into it keeps the siblings."""
    path = write(tmp_path, "model:\n  channels: 16\n  extra: {power: 2.0, precision: 1.0e-5}\n")
    assert load_config(path, RunCfg, ["model.extra={}"]).model.extra == {}
    assert load_config(path, RunCfg, ["model.extra={w: 1}"]).model.extra == {"w": 1.0}
    assert load_config(path, RunCfg, ["model.extra.w=1"]).model.extra == {"power": 2.0, "precision": 1e-5, "w": 1.0}
    assert load_config(path, RunCfg, ["model.extra={}"]).model.channels == 16  # the section keeps its other keys


def test_molecules_schedule_can_be_switched_from_the_command_line() -> None:
    from multidiff.pipeline import load_run_config
    from multidiff.registry import get_domain

    dom = get_domain("molecules")
    cfg = load_run_config(dom, "fast", ["diffusion.schedule=flow", "diffusion.schedule_args={}"])
    assert cfg.diffusion.schedule == "flow" and cfg.diffusion.schedule_args == {}
    cfg.diffusion.build_schedule()


def test_zero_sized_domain_models_are_config_errors() -> None:
    from multidiff.pipeline import load_run_config
    from multidiff.registry import get_domain

    for domain, override in [("audio", "model.channels=0"), ("audio", "data.sample_rate=0"), ("molecules", "model.layers=0"),
                             ("toy", "model.hidden=0")]:
        with pytest.raises(ConfigError, match=rf"^command-line override '{re.escape(override)}': .*must be >= 1"):
            load_run_config(get_domain(domain), None, [override])
