"""Helpers shared by the benchmarks: where a number was measured, and one JSON line per result."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch

__all__ = ["machine", "emit"]


def machine() -> str:
    """A short description of where the numbers were measured, with the current load."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load1 {load:.1f}")


def emit(what: str, setting: dict[str, Any] | str, number: float | None, unit: str, digits: int = 5) -> dict[str, Any]:
    """Print (and return) one result as a JSON line: what, setting, number (rounded to ``digits``), unit, machine."""
    rec = {"what": what, "setting": setting, "number": None if number is None else round(float(number), digits),
           "unit": unit, "machine": machine()}
    print(json.dumps(rec), flush=True)
    return rec
