"""Flax Linen Transformer models."""

from jaxlm.models.config import ModelConfig
from jaxlm.models.model import Model
from jaxlm.models.transformer import Transformer, count_params

__all__ = ["Model", "ModelConfig", "Transformer", "count_params"]
