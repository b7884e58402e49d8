"""`Model`: the Transformer body with one task head. What a task calls and what gets saved."""

from typing import Optional

import flax.linen as nn
import jax

from jaxlm.models.config import ModelConfig
from jaxlm.models.heads import ClassificationHead, LMHead, MLMHead
from jaxlm.models.transformer import Transformer

Array = jax.Array
HEADS = ("lm", "mlm", "classifier")


class Model(nn.Module):
    """Body + head. head: 'lm' (next-token logits), 'mlm' (BERT MLM), 'classifier'."""

    cfg: ModelConfig
    head: str = "lm"
    num_labels: int = 2
    pooling: str = "cls"
    pooler: bool = False
    deterministic: bool = True
    decode: bool = False
    lora_dropout: float = 0.0  # adapter dropout (peft.dropout, the train model's only): see Transformer

    def setup(self):
        self.body = Transformer(self.cfg, self.deterministic, self.decode, self.lora_dropout, name="body")
        if self.head == "lm":
            self.lm_head = LMHead(self.cfg, name="lm_head")
        elif self.head == "mlm":
            self.mlm_head = MLMHead(self.cfg, name="mlm_head")
        elif self.head == "classifier":
            self.cls_head = ClassificationHead(self.cfg, self.num_labels, self.pooling, self.pooler,
                                               self.deterministic, name="cls_head")
        else:
            raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")

    def __call__(self, tokens: Array, *, positions: Optional[Array] = None,
                 padding_mask: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None,
                 segment_ids: Optional[Array] = None) -> Array:
        """segment_ids: [B, T], one id per packed document (see Transformer; None: one segment)."""
        h = self.body(tokens, positions=positions, padding_mask=padding_mask,
                      token_type_ids=token_type_ids, segment_ids=segment_ids)
        if self.head == "lm":
            return self.lm_head(h, self.body.attend)
        if self.head == "mlm":
            return self.mlm_head(h, self.body.attend)
        return self.cls_head(h, padding_mask)

    def loss_inputs(self, tokens: Array, *, positions: Optional[Array] = None,
                    padding_mask: Optional[Array] = None,
                    token_type_ids: Optional[Array] = None,
                    segment_ids: Optional[Array] = None) -> tuple[Array, dict]:
        """(features [B, T, d], projection weights) of a vocabulary head, without its logits:
        `jaxlm.tasks.chunked_loss` projects them chunk by chunk (heads.project_vocab)."""
        h = self.body(tokens, positions=positions, padding_mask=padding_mask,
                      token_type_ids=token_type_ids, segment_ids=segment_ids)
        embedding = self.body.embed.token.embedding  # the tied decoder (set up by the body's call)
        if self.head == "lm":
            return h, self.lm_head.projection(embedding)
        if self.head == "mlm":
            return self.mlm_head.features(h), self.mlm_head.projection(embedding)
        raise ValueError(f"head {self.head!r} does not project onto the vocabulary")
