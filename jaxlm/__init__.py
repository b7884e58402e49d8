"""jaxlm: a JAX/Flax training stack for language models (pretraining and classification)."""

__version__ = "0.1.0"
