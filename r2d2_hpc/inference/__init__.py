"""Inference and evaluation stage: trained checkpoints segment NIfTI volumes on their own grid, with metrics.

``python -m r2d2_hpc.predict`` and ``python -m r2d2_hpc.evaluate`` are the entry points; this package holds the
pieces they are built from (no Hydra here): the model from a checkpoint (``model``), files (``io``), the sliding
window (``sliding``), one case (``predictor``), many cases over ranks (``runner``), metrics (``metrics``) and
folder-to-folder evaluation (``evaluation``).
"""

from r2d2_hpc.inference.config import EvaluateConfig, PredictConfig
from r2d2_hpc.inference.evaluation import EvaluateRun, run_evaluate, score_files
from r2d2_hpc.inference.io import InputCase, list_input_cases, list_masks, read_case_image
from r2d2_hpc.inference.metrics import case_metrics, overlap_metrics, summarise, surface_metrics
from r2d2_hpc.inference.model import LoadedModel, load_model
from r2d2_hpc.inference.predictor import CasePrediction, predict_image
from r2d2_hpc.inference.runner import PredictRun, run_predict, split_cases
from r2d2_hpc.inference.sliding import WindowSettings, predict_2d, predict_3d

__all__ = [
    "CasePrediction",
    "EvaluateConfig",
    "EvaluateRun",
    "InputCase",
    "LoadedModel",
    "PredictConfig",
    "PredictRun",
    "WindowSettings",
    "case_metrics",
    "list_input_cases",
    "list_masks",
    "load_model",
    "overlap_metrics",
    "predict_2d",
    "predict_3d",
    "predict_image",
    "read_case_image",
    "run_evaluate",
    "run_predict",
    "score_files",
    "split_cases",
    "summarise",
    "surface_metrics",
]
