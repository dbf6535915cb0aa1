"""Tests for the audio-domain 1D U-Net backbone (domains/audio/unet.py)."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from torch import Tensor, nn

from domains.audio.unet import UNET1D_PRESETS, Downsample1D, UNet1D, Unpatchify1D, Upsample1D

# A small config exercising every module type (patchify, factor-1 level, down/up, attention, mid).
SMALL = dict(channels=16, multipliers=(1, 2, 4), factors=(1, 2, 2), blocks=(1, 1, 2), heads=2, patch=4)
SMALL_T = 64  # total factor 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Move every parameter off its init (zero-init would otherwise hide conditioning paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _small(seed: int = 0, **kw: object) -> UNet1D:
    """The SMALL config, perturbed off its init, in eval mode."""
    torch.manual_seed(seed)
    return _perturb(UNet1D(**{**SMALL, **kw}), seed=seed).eval()


def _inputs(batch: int, T: int = SMALL_T, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random waveforms [B, 1, T] and log-noise-levels in [-6, 6]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, T, generator=g), torch.empty(batch).uniform_(-6, 6, generator=g)


def test_default_shape_and_zero_output_at_init() -> None:
    torch.manual_seed(0)
    model = UNet1D()
    assert 16000 % model.total_factor == 0, "defaults must accept 1 s of 16 kHz audio"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params <= 5_000_000, f"{n_params} params do not fit a 20 MB fp32 checkpoint"
    x, s = torch.randn(2, 1, 16000), torch.tensor([-3.0, 4.0])
    with torch.no_grad():
        out = model(x, s, {"label": torch.tensor([1, 9])})
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", sorted(UNET1D_PRESETS))
def test_presets_fit_one_second_and_checkpoint_budget(name: str) -> None:
    model = UNet1D(**UNET1D_PRESETS[name])
    assert 16000 % model.total_factor == 0
    n_params = sum(p.numel() for p in model.parameters())
    budget = 10_000_000 if name == "large" else 5_000_000  # 20 MB as bf16 / fp32
    assert n_params <= budget


def test_small_config_shape_and_zero_init() -> None:
    model = UNet1D(**SMALL)
    assert model.total_factor == 16
    x, s = _inputs(3, T=4 * SMALL_T)
    out = model(x, s)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("T", [16000 + 64, 16000 - 1, 100])
def test_bad_length_raises(T: int) -> None:
    model = UNet1D()
    with pytest.raises(ValueError, match=rf"T={T}\b.*\b{model.total_factor}\b"):
        model(torch.zeros(1, 1, T), torch.zeros(1))


@pytest.mark.parametrize("factor", [2, 5, 16])
def test_unpatchify_is_a_transposed_conv(factor: int) -> None:
    """The fast overlap-add head equals ConvTranspose1d with the same taps, and inverts Downsample1D's shape."""
    torch.manual_seed(0)
    head = _perturb(Unpatchify1D(6, 2, factor))
    ref = Upsample1D(6, 2, factor)
    with torch.no_grad():  # proj rows are ordered (out channel, tap)
        ref.conv.weight.copy_(rearrange(head.proj.weight[:, :, 0], "(o k) i -> i o k", o=2))
        ref.conv.bias.copy_(head.bias)
    h = torch.randn(3, 6, 7)
    torch.testing.assert_close(head(h), ref(h), rtol=1e-5, atol=1e-5)
    assert Downsample1D(2, 6, factor)(torch.randn(3, 2, 7 * factor)).shape == (3, 6, 7)
    assert Unpatchify1D(6, 2, factor, overlap=False)(h).shape == (3, 2, 7 * factor)
    assert Downsample1D(2, 6, factor, overlap=False)(torch.randn(3, 2, 7 * factor)).shape == (3, 6, 7)


def test_every_parameter_gets_gradient() -> None:
    """No unused parameters (DDP without find_unused_parameters), with and without labels."""
    torch.manual_seed(0)
    model = _perturb(UNet1D()).train()
    x, s = torch.randn(3, 1, 16000), torch.tensor([-5.0, 0.0, 5.0])
    cond = {"label": torch.tensor([2, 5, 8]), "uncond": torch.tensor([False, True, False])}
    target = torch.randn_like(x)
    (model(x, s, cond) - target).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} unused"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    null = model.label_emb.weight.grad[model.null_class]
    assert null.abs().sum() > 0, "null-class row got no gradient from the uncond row"

    model.zero_grad(set_to_none=True)
    (model(x, s) - target).square().mean().backward()  # no cond: the null class is still used
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("full_rate", [0, 4])
def test_zero_init_trains_to_all_parameters(full_rate: int) -> None:
    """From the zero-initialised state, a few optimiser steps reach every parameter (the refiner's too)."""
    torch.manual_seed(0)
    model = UNet1D(**SMALL, full_rate_channels=full_rate).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, s = _inputs(2)
    cond = {"label": torch.tensor([1, 3]), "uncond": torch.tensor([True, False])}
    target = torch.randn_like(x)
    for _ in range(4):  # depth of zero-init chain: head -> conv2 -> conv1/FiLM/attention
        opt.zero_grad()
        (model(x, s, cond) - target).square().mean().backward()
        opt.step()
    zero = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not zero, f"no gradient reached {zero}"


def test_noise_level_and_label_change_output() -> None:
    model = _small()
    x, _ = _inputs(2)
    lab = {"label": torch.tensor([3, 3])}
    with torch.no_grad():
        base = model(x, torch.tensor([-2.0, -2.0]), lab)
        other_noise = model(x, torch.tensor([2.0, 2.0]), lab)
        near_noise = model(x, torch.tensor([-1.9, -1.9]), lab)
        other_label = model(x, torch.tensor([-2.0, -2.0]), {"label": torch.tensor([7, 7])})
    assert not torch.allclose(base, other_noise, atol=1e-4)
    assert not torch.allclose(base, near_noise, atol=1e-5)
    assert not torch.allclose(base, other_label, atol=1e-4)


def test_uncond_rows_use_the_null_class() -> None:
    model = _small()
    x, s = _inputs(2)
    assert model.label_emb.num_embeddings == model.num_classes + 1 == 11
    assert model.null_class == 10
    with torch.no_grad():
        missing = model(x, s)
        empty = model(x, s, {})
        mixed = model(x, s, {"label": torch.tensor([3, 7]), "uncond": torch.tensor([True, False])})
        mixed2 = model(x, s, {"label": torch.tensor([9, 7]), "uncond": torch.tensor([True, False])})
        only_uncond = model(x, s, {"uncond": torch.tensor([True, True])})
        explicit_null = model(x, s, {"label": torch.tensor([10, 10])})
        cond7 = model(x, s, {"label": torch.tensor([7, 7])})
        per_class = [model(x, s, {"label": torch.full((2,), c)}) for c in range(10)]
    torch.testing.assert_close(mixed[0], missing[0])  # uncond row == missing label
    torch.testing.assert_close(mixed2[0], missing[0])  # ... whatever label value it carries
    torch.testing.assert_close(mixed[1], cond7[1])  # cond row keeps its label
    torch.testing.assert_close(empty, missing)
    torch.testing.assert_close(only_uncond, missing)
    torch.testing.assert_close(explicit_null, missing)
    for c, out in enumerate(per_class):  # the null embedding is none of the 10 classes
        assert not torch.allclose(out, missing, atol=1e-4), f"class {c} coincides with the null class"
    with pytest.raises(ValueError, match="null class"):
        model(x, s, {"label": torch.tensor([0, 11])})


def test_batch_independence() -> None:
    """Sample 0 never influences sample 1 (guards batch mixing in reshapes, attention, norms)."""
    model = _small().train()  # train mode: GroupNorm has no running stats, but still check it
    x, s = _inputs(3, T=2 * SMALL_T)
    x.requires_grad_(True)
    cond = {"label": torch.tensor([1, 2, 3]), "uncond": torch.tensor([False, True, False])}
    out = model(x, s, cond)
    out[1:].square().sum().backward()
    assert x.grad is not None
    assert torch.count_nonzero(x.grad[0]) == 0
    assert torch.count_nonzero(x.grad[1]) > 0

    model.eval()
    with torch.no_grad():
        ref = model(x, s, cond)
        x2, s2 = x.detach().clone(), s.clone()
        x2[0] = torch.randn_like(x2[0]) * 3
        s2[0] = -s2[0]
        cond2 = {"label": torch.tensor([9, 2, 3]), "uncond": torch.tensor([True, True, False])}
        out2 = model(x2, s2, cond2)
    assert not torch.allclose(out2[0], ref[0])
    torch.testing.assert_close(out2[1:], ref[1:], rtol=0, atol=1e-6)


def test_unconditional_model() -> None:
    model = _small(num_classes=0)
    assert model.label_emb is None
    x, s = _inputs(2)
    assert model(x, s).shape == x.shape
    with pytest.raises(ValueError, match="num_classes=0"):
        model(x, s, {"label": torch.tensor([0, 1])})


def test_overfits_two_sines() -> None:
    """Denoise two fixed sines (clean from noisy) for a few hundred steps: the loss must fall markedly."""
    torch.manual_seed(0)
    T = 256
    t = torch.arange(T) / T
    clean = torch.stack([torch.sin(2 * math.pi * 5 * t), torch.sin(2 * math.pi * 17 * t + 1.0)])[:, None]
    sigma = 0.5
    model = UNet1D(channels=16, multipliers=(1, 2), factors=(1, 2), blocks=1, heads=2, patch=4).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        noisy = clean + sigma * torch.randn_like(clean)
        loss = (model(noisy, torch.full((2,), math.log(sigma))) - clean).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-20:]) / 20
    assert first == pytest.approx(0.5, rel=1e-3)  # zero output at init: loss = mean(clean^2)
    # Returning the noisy input would score sigma^2 = 0.25; actual denoising must do far better.
    assert last < 0.1 * first, f"loss {first:.3f} -> {last:.3f}"


def test_full_rate_refiner_zero_at_init_and_keeps_base_keys() -> None:
    """The refiner starts at zero and only adds parameters, so a checkpoint without it keeps its key set."""
    torch.manual_seed(0)
    base, ref = UNet1D(**SMALL), UNet1D(**SMALL, full_rate_channels=4)
    x, s = _inputs(2)
    with torch.no_grad():
        assert torch.equal(ref(x, s), torch.zeros_like(x))
    extra = set(ref.state_dict()) - set(base.state_dict())
    assert extra and all(k.startswith("refiner.") for k in extra), extra
    assert ref.state_dict()["head.proj.weight"].shape[0] == (1 + 4) * 2 * SMALL["patch"]  # (waveform + 4) x taps


def test_full_rate_refiner_acts_at_the_sample_rate() -> None:
    """With only the refiner active, a one-sample change of x moves the output within the refiner's receptive field.

    The patchified path alone cannot do this: its stem mixes 2 x patch samples into each frame and its head spreads a
    frame over 2 x patch output samples, so its response to one input sample spans whole frames.
    """
    model = _small(full_rate_channels=4)
    with torch.no_grad():
        model.head.proj.weight.zero_()  # silence the U-Net path: output = refiner(features = 0, x)
        x, s = _inputs(1)
        base = model(x, s)
        x2 = x.clone()
        x2[..., 30] += 1.0
        delta = (model(x2, s) - base).abs()[0, 0]
    changed = torch.nonzero(delta > 1e-7).flatten().tolist()
    assert changed and set(changed) <= {28, 29, 30, 31, 32}, changed  # two kernel-3 convs: +-2 samples


@pytest.mark.parametrize("kw", [dict(full_rate_channels=-1), dict(full_rate_channels=4, patch=1)])
def test_full_rate_refiner_bad_config(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="full_rate_channels"):
        UNet1D(**{**SMALL, **kw})
