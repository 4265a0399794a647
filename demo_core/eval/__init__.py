"""`python -m demo_core eval`: the quality table, its ablations and the TensorAR rows, as a package.

    cli          the command line (`main`): options, outputs (results.json, results.md, plots)
    quality      every stage per example, scores, distances, in-context check, SCAN T/c and K ablations
    tensor_rows  TensorAR vs the AR draft vs the paper's equal-steps control
    report       results.md and the plots
"""
from .cli import main
from .quality import evaluate

__all__ = ["evaluate", "main"]
