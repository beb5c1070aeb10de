"""Token heads for Fluid: the tied softmax head and the per-token diffusion (DiffLoss) head.

A head owns both sides of a token: the input embedding (``embed``) and the output side
(``loss`` and ``sample``), so a trunk is agnostic of discrete vs continuous tokens.
"""

from __future__ import annotations

from . import diffusion
from .__about__ import __version__
from .diffloss import DiffLossHead, DiffLossHeadConfig, DiffLossMLP
from .diffusion import GaussianDiffusion, create_diffusion
from .softmax import SoftmaxHead, SoftmaxHeadConfig, TokenSample

__all__ = [
    "DiffLossHead",
    "DiffLossHeadConfig",
    "DiffLossMLP",
    "GaussianDiffusion",
    "SoftmaxHead",
    "SoftmaxHeadConfig",
    "TokenSample",
    "__version__",
    "create_diffusion",
    "diffusion",
]
