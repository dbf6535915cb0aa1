"""multidiff: conditional diffusion for non-image data (audio waveforms, 3D molecules).

The core is domain-agnostic: schedules, prediction targets and losses (``Denoiser``), pure sampler
functions, guidance wrappers and the spaces noise lives in.
"""

from .diffusion import Denoiser, DiffusionConfig, convert, loss_weight
from .guidance import ClassifierFreeGuidance, GradientGuidance, Inpaint, drop_conditions, inpaint, sample_repaint
from .samplers import SAMPLERS, get_sampler, nfe, prior, sample
from .schedules import GRIDS, SCHEDULES, Schedule, append_dims, get_schedule, make_grid
from .spaces import Euclidean, Graph, Masked, Product, Space, ZeroCoM

__version__ = "0.1.0"

__all__ = [
    "ClassifierFreeGuidance",
    "Denoiser",
    "DiffusionConfig",
    "Euclidean",
    "GRIDS",
    "GradientGuidance",
    "Graph",
    "Inpaint",
    "Masked",
    "Product",
    "SAMPLERS",
    "SCHEDULES",
    "Schedule",
    "Space",
    "ZeroCoM",
    "append_dims",
    "convert",
    "drop_conditions",
    "get_sampler",
    "get_schedule",
    "inpaint",
    "loss_weight",
    "make_grid",
    "nfe",
    "prior",
    "sample",
    "sample_repaint",
    "__version__",
]
