"""Evaluation of trained models: the ELBO (NELBO, perplexity bound, bits per token and byte)."""

from dlmtrain.eval.elbo import ELBOAccumulator, evaluate

__all__ = ["ELBOAccumulator", "evaluate"]
