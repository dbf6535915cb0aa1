"""Cheaper inference for a trained denoiser: bf16 autocast or int8 dynamic quantization of its backbone.

The ``Denoiser`` keeps its preconditioning, target conversion and the sampler arithmetic in fp32/float64 (as EDM's
``EDMPrecond``); only the backbone changes:

- ``bf16``: the backbone's forward under ``torch.autocast(dtype=bfloat16)`` with fp32 outputs. On a CPU without
  native bf16 (AVX-512 BF16 or AMX) bf16 is emulated and slower than fp32, so it falls back to fp32 with one warning.
- ``int8``: ``torch.ao.quantization.quantize_dynamic`` on the backbone's ``nn.Linear`` layers (int8 weights, activations
  quantized per call; Jacob et al. 2018). CPU only; a backbone without linear layers stays fp32, with one warning.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from .diffusion import Denoiser
from .training import _AutocastForward, cpu_has_fast_bf16

__all__ = ["PRECISIONS", "Precision", "PrecisionWarning", "resolve_precision", "set_precision"]

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
_said: set[str] = set()  # fallbacks already announced in this process


class PrecisionWarning(UserWarning):
    """A requested inference precision is not available here; the model runs in fp32."""


def _warn_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        warnings.warn(message, PrecisionWarning, stacklevel=3)


def resolve_precision(precision: str, domain: object, device: torch.device | str = "cpu") -> str:
    """``multidiff sample --precision``: 'auto' (the default) is the domain's ``sample_precision`` (a class attribute,
    set where bench/inference_precision.py measured it faster at equal quality: audio bf16) on a CPU that runs it
    natively (bf16: AVX-512 BF16 or AMX), else fp32, without a warning; any other value is returned unchanged."""
    if precision != "auto":
        return precision
    preferred = getattr(domain, "sample_precision", "fp32")
    if torch.device(device).type != "cpu" or (preferred == "bf16" and not cpu_has_fast_bf16()):
        return "fp32"  # only measured on CPU
    return preferred


def set_precision(denoiser: Denoiser, precision: str, device: torch.device | str = "cpu") -> str:
    """Run ``denoiser``'s backbone in ``precision`` ('fp32', 'bf16', 'int8'), in place; returns the precision used."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    backbone = denoiser.backbone
    if isinstance(backbone, _AutocastForward) or getattr(denoiser, "precision", "fp32") != "fp32":
        raise ValueError(f"--precision {precision}: this model already runs in {getattr(denoiser, 'precision', 'bf16')}")
    used = precision
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_fast_bf16():
            _warn_once("bf16", "--precision bf16: this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be emulated "
                               "(slower than fp32); sampling in fp32")
            used = "fp32"
        else:
            denoiser.backbone = _AutocastForward(backbone, device.type)
    elif precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"--precision int8: dynamic int8 quantization runs on CPU only (device {device}); "
                             f"use --precision bf16 there")
        if not any(isinstance(m, nn.Linear) for m in backbone.modules()):
            _warn_once("int8", f"--precision int8: the backbone {type(backbone).__name__} has no nn.Linear layer to "
                               f"quantize; sampling in fp32")
            used = "fp32"
        else:
            with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (torchao is its successor)
                warnings.simplefilter("ignore", DeprecationWarning)
                denoiser.backbone = torch.ao.quantization.quantize_dynamic(backbone, {nn.Linear}, dtype=torch.qint8)
            if next(denoiser.parameters(), None) is None:  # all-linear backbone: packed int8 weights are no Parameters,
                # and callers find the model's device as next(parameters()).device
                denoiser.register_parameter("device_anchor", nn.Parameter(torch.zeros(0), requires_grad=False))
    denoiser.precision = used  # type: ignore[assignment]
    return used
