"""The DDIM paper's evidence measured on any model: Table 1 (sample quality against steps S and η),
Table 2 (inversion error against S), consistency of x_T across S (§5.2), interpolation (§5.3), and
an HTML report of all four. ``ddim eval ...`` and ``ddim report`` call these functions.

And the evidence users ask for: :mod:`~ddim.evaluation.guidance` (guidance × steps, judged in more
than one feature space), :mod:`~ddim.evaluation.diversity` (η against diversity and quality),
:mod:`~ddim.evaluation.memorization` (nearest training image against held-out images) and
:mod:`~ddim.evaluation.cost` (time, network calls and memory against S and batch size), with their
report sections in :mod:`~ddim.evaluation.evidence_report`.

Modules: :mod:`~ddim.evaluation.extractors` (feature extractors: the digit classifier, FID's
Inception-V3, any module), :mod:`~ddim.evaluation.inception`, :mod:`~ddim.evaluation.metrics`
(Fréchet distance, KID, precision/recall, cached reference features), :mod:`~ddim.evaluation.common`
(sampling setup, cached cells), :mod:`~ddim.evaluation.sources` (which data and features by
default), :mod:`~ddim.evaluation.table1`, :mod:`~ddim.evaluation.table2`,
:mod:`~ddim.evaluation.consistency`, :mod:`~ddim.evaluation.interpolation`,
:mod:`~ddim.evaluation.report`, :mod:`~ddim.evaluation.samples` (metrics of a folder or .npz of
samples, sharded under torchrun).
"""

from ddim.evaluation.common import EvalSetup
from ddim.evaluation.consistency import run_consistency
from ddim.evaluation.cost import run_cost
from ddim.evaluation.diversity import run_diversity
from ddim.evaluation.extractors import (
    FeatureExtractor,
    classifier_extractor,
    inception_extractor,
    load_extractor,
    module_extractor,
)
from ddim.evaluation.guidance import run_guidance
from ddim.evaluation.interpolation import run_interpolation
from ddim.evaluation.memorization import run_memorization
from ddim.evaluation.metrics import Reference, fid, kid, precision_recall, quality_metrics, reference_features
from ddim.evaluation.report import ReportSettings, build_report
from ddim.evaluation.samples import evaluate_samples
from ddim.evaluation.table1 import run_table1
from ddim.evaluation.table2 import run_table2

__all__ = [
    "EvalSetup",
    "FeatureExtractor",
    "Reference",
    "ReportSettings",
    "build_report",
    "classifier_extractor",
    "evaluate_samples",
    "fid",
    "inception_extractor",
    "kid",
    "load_extractor",
    "module_extractor",
    "precision_recall",
    "quality_metrics",
    "reference_features",
    "run_consistency",
    "run_cost",
    "run_diversity",
    "run_guidance",
    "run_interpolation",
    "run_memorization",
    "run_table1",
    "run_table2",
]
