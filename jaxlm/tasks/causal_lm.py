"""Causal language modelling: next-token cross-entropy over packed sequences.

data.packing: `concat` packs documents (EOS between them) into windows and attends across them;
`segmented` adds segment_ids to the batch, and the model keeps attention (and positions) inside
each document.
"""

from typing import Any, Optional

import jax.numpy as jnp

from jaxlm.tasks.base import Batch, token_batch_spec
from jaxlm.tasks.token_prediction import TokenPredictionTask


class CausalLMTask(TokenPredictionTask):
    name = "causal_lm"
    head = "lm"
    can_generate = True

    def build_data(self, config, workdir: str, process_index: int, process_count: int):
        """Tokenizer, resumable train iterator and exact eval batches (see jaxlm/data)."""
        from jaxlm.data import build_lm_data  # pylint: disable=import-outside-toplevel
        return build_lm_data(config.data, seq_len=config.seq_len, global_batch_size=config.global_batch_size,
                             seed=config.seed, workdir=workdir, process_index=process_index,
                             process_count=process_count)

    def batch_spec(self, config) -> dict:
        columns = [("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32)]
        if config.data.get("packing", "concat") == "segmented":
            columns.append(("segment_ids", jnp.int32))
        return token_batch_spec(config, *columns)

    def model_kwargs(self, config) -> dict:
        return {"head": self.head}

    def model_inputs(self, batch: Batch) -> Batch:
        if "segment_ids" in batch:  # Only segmented packing: concat batches compile as they always did.
            return {"tokens": batch["inputs"], "segment_ids": batch["segment_ids"]}
        return {"tokens": batch["inputs"]}

    def tokens_per_byte(self, data: Any) -> Optional[float]:
        return data.eval_tokens_per_byte
