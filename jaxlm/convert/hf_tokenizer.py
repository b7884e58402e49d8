"""The tokenizer an export writes: `tokenizer(prompt)` in transformers frames a prompt as the run's
training framed every document, and its length limit is the model's.

    exported = export_tokenizer(run_tokenizer, max_len=256, causal=True)

Training puts each document right after an EOS (the one ending the document before: data/
token_cache.py), and `jaxlm generate` prepends that EOS to a prompt (`document_prefix`). For a
causal LM the exported tokenizer's post-processor prepends the same ids and names the EOS its
bos_token, as Llama's tokenizer does with <s>, so `tokenizer(prompt)` + `model.generate(...)`
continue a prompt as `jaxlm generate` does. A tokenizer that adds special tokens of its own
(Llama's <s>, BERT's [CLS] … [SEP]) has them replaced, never doubled: the run's training never
saw them (documents are encoded without them). Masked-LM and classifier tokenizers keep their
own framing, which is the one their training used.
"""

import copy
from typing import Any

from absl import logging
from tokenizers import processors

from jaxlm.data import tokenizer as tokenizer_lib

_PROBE = "framing probe"  # Any text: only the ids around its own are compared.


def export_tokenizer(tokenizer: Any, max_len: int, causal: bool) -> Any:
    """A copy of `tokenizer` for the export directory (the run's own is left as it is)."""
    exported = copy.deepcopy(tokenizer)
    exported.model_max_length = int(max_len)  # Transformers' default (1e30) means "no limit".
    if causal:
        _frame_as_documents(exported)
    return exported


def _frame_as_documents(tokenizer: Any) -> None:
    prefix = tokenizer_lib.document_prefix(tokenizer)
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if tokenizer(_PROBE)["input_ids"] == prefix + plain:  # Already so (e.g. an exported one).
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        logging.warning("The exported tokenizer (%s) has no tokenizers backend, so it cannot prepend the "
                        "EOS a prompt follows in training: prepend it to the input ids by hand",
                        type(tokenizer).__name__)
        return
    tokens = tokenizer.convert_ids_to_tokens(prefix)
    first, second = (" ".join(f"{token}:{kind}" for token in tokens) for kind in (0, 1))
    template = processors.TemplateProcessing(single=f"{first} $A:0", pair=f"{first} $A:0 {second} $B:1",
                                             special_tokens=sorted(set(zip(tokens, prefix))))
    if isinstance(backend.post_processor, processors.ByteLevel):  # GPT-2's: keep its offset trimming.
        template = processors.Sequence([backend.post_processor, template])
    # bos_token first: transformers may rebuild the post-processor when special tokens change.
    tokenizer.bos_token = tokens[0]
    backend.post_processor = template
    if "add_bos_token" in tokenizer.init_kwargs:  # Rebuilt at load from bos_token when true (Llama).
        tokenizer.init_kwargs["add_bos_token"] = True
    if "add_eos_token" in tokenizer.init_kwargs:
        tokenizer.init_kwargs["add_eos_token"] = False
    framed = tokenizer(_PROBE)["input_ids"]
    if framed != prefix + plain:  # A transformers version that rebuilt the post-processor its own way.
        logging.warning("The exported tokenizer frames a prompt as %s, where training put %s before %s: "
                        "prepend the EOS to the input ids by hand", framed, prefix, plain)
