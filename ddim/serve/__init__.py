"""``ddim serve``: interactive drafts in the browser (the optional extra ``ddim[serve]``: Flask + waitress).

:func:`create_app` builds the app around one loaded model (the CLI is a thin layer over it);
:func:`serve` runs it until Ctrl-C. The HTTP API is documented in docs/serve.md.
"""

from ddim.serve.app import LOOPBACK_HOSTS, create_app, serve
from ddim.serve.drafts import Drafts
from ddim.serve.engine import Engine, JobInfo, QueueFull, ShuttingDown, Superseded
from ddim.serve.params import BadParam, Limits, read_params

__all__ = [
    "LOOPBACK_HOSTS",
    "BadParam",
    "Drafts",
    "Engine",
    "JobInfo",
    "Limits",
    "QueueFull",
    "ShuttingDown",
    "Superseded",
    "create_app",
    "read_params",
    "serve",
]
