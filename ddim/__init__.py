"""ddim: sample DDPM-trained diffusion models fast (DDIM and its successors).

Main entry points: :func:`sample`, :func:`invert`, :func:`ddim_step`, :func:`timesteps`,
:func:`randn`, :func:`slerp` and :class:`NoiseSchedule`. Note that ``ddim.timesteps`` is the function;
the module of the same name is reached with ``from ddim.timesteps import ...`` or
``sys.modules["ddim.timesteps"]``.
"""

from ddim.checkpoint import load, save_model
from ddim.consistency import ConsistencyModel  # registers the "consistency" sampler
from ddim.interpolate import slerp
from ddim.noise import StepNoise, randn
from ddim.optimize import optimize_timesteps
from ddim.prediction import PREDICTIONS, Denoiser, conversion_coefficients, dynamic_threshold, to_x0_eps
from ddim.sampling import (
    SAMPLERS,
    VARIANCES,
    Levels,
    SamplerSpec,
    ddim_coefficients,
    ddim_step,
    ddpm_coefficients,
    invert,
    nfe,
    register_sampler,
    sample,
)
from ddim.schedule import NoiseSchedule
from ddim.solvers import GaussianMixture  # registers plms, dpmpp_*, unipc, euler, heun
from ddim.timesteps import SPACINGS, check_timesteps, register_spacing, timesteps

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "ConsistencyModel",
    "load",
    "save_model",
    "PREDICTIONS",
    "SAMPLERS",
    "SPACINGS",
    "VARIANCES",
    "Denoiser",
    "GaussianMixture",
    "Levels",
    "SamplerSpec",
    "StepNoise",
    "check_timesteps",
    "conversion_coefficients",
    "ddim_coefficients",
    "ddim_step",
    "ddpm_coefficients",
    "dynamic_threshold",
    "invert",
    "nfe",
    "optimize_timesteps",
    "randn",
    "register_sampler",
    "register_spacing",
    "sample",
    "slerp",
    "timesteps",
    "to_x0_eps",
    "__version__",
]
