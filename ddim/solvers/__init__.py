"""The samplers, registered in :data:`ddim.sampling.SAMPLERS` on import.

One module per paper, each a float64 coefficient table and its declaration, run by :mod:`ddim.engine`
(docs/engine.md: how to add one):

- :mod:`~ddim.solvers.ddim`: "ddim", "ddpm" (Song et al. 2021; Ho et al. 2020);
- :mod:`~ddim.solvers.plms`: "plms" (PNDM's pseudo linear multistep, Liu et al. 2022);
- :mod:`~ddim.solvers.dpmpp`: "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde" (DPM-Solver++, Lu et al. 2022);
- :mod:`~ddim.solvers.unipc`: "unipc" (UniPC-bh2 predictor–corrector, Zhao et al. 2023);
- :mod:`~ddim.solvers.dpmv3`: "dpmv3" (DPM-Solver-v3, Zheng et al. 2023), with the model statistics of
  :mod:`ddim.model_stats`;
- :mod:`~ddim.solvers.restart`: "restart" (Restart sampling, Xu et al. 2023: forward noise between ODE
  segments, seeded per sample);
- :mod:`~ddim.solvers.karras`: "euler", "heun" (σ-space, Karras et al. 2022);
- :mod:`~ddim.solvers.exact`: a Gaussian mixture with exact ε* and ODE solution, to measure them.

Adaptive step size from an error tolerance (DPM-Solver's order-1/2 pair) is not in the registry (its
calls are not known before it runs): :func:`ddim.adaptive.sample_adaptive` (``ddim sample --rtol``).

Every sampler works on the model adapter's (x̂₀, ε̂) only (:class:`~ddim.prediction.Denoiser`) and on
the core's levels (:class:`~ddim.sampling.Levels`), makes a number of network calls known before it
starts (:func:`ddim.nfe`: ``steps`` for all but "heun", which makes 2·steps - 1), and never syncs
with the device inside the engine's loop.
"""

from ddim.solvers import consistency, ddim, dpmpp, dpmv3, karras, plms, restart, unipc  # noqa: F401 - registers
from ddim.solvers.exact import GaussianMixture

__all__ = ["GaussianMixture", "ODE_SAMPLERS", "STOCHASTIC_SAMPLERS"]

#: The samplers that solve the probability-flow ODE (deterministic), in rough order of accuracy.
ODE_SAMPLERS = ("ddim", "euler", "plms", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "dpmv3")
#: The samplers that solve the reverse SDE (seeded per sample).
STOCHASTIC_SAMPLERS = ("ddpm", "dpmpp_2m_sde", "restart")
