"""Embedded default: a small GPT on tiny Shakespeare, shipped inside the package (no download).

    jaxlm train --config=configs/tiny_shakespeare.py --workdir=runs/tiny_shakespeare

What it reaches: eval/bits_per_byte 2.509 on the held-out last 10% of the plays after 360 steps.
A byte-level BPE (1024 tokens) is trained on the corpus at the first start and saved in the
run directory. `:runlocal` shrinks it further for a smoke test. Measured wall times and s/step:
benchmarks/README.md ("Recipes: measured").
"""

from jaxlm.config import base_config
from jaxlm.data.corpora import path as corpus_path


def get_config(arg: str = ""):
    c = base_config()
    c.task = "causal_lm"
    c.seed = 0
    c.steps = 360
    c.global_batch_size = 32
    c.seq_len = 128
    c.log_every = 20
    c.eval_every = 120
    c.checkpoint_every = 120

    c.data.train_file = corpus_path("tiny_shakespeare")
    c.data.eval_fraction = 0.1  # The last 10% of the documents (speeches) are held out.
    c.data.doc_split = "blank_line"
    c.data.tokenizer = "bpe"
    c.data.bpe_vocab_size = 1024

    c.model.num_layers = 4
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.model.activation = "gelu_tanh"
    c.model.norm = "layernorm"
    c.model.positions = "learned"
    c.model.max_len = 256
    c.model.tie_embeddings = True
    c.model.dropout = 0.0

    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0

    if arg == "runlocal":
        c.steps = 40
        c.log_every = 10
        c.eval_every = 20
        c.checkpoint_every = 20
        c.model.num_layers = 2
        c.model.d_model = 64
        c.model.num_heads = 4
        c.model.d_ff = 256
        c.global_batch_size = 16  # 1,024 tokens a step: a smoke test (and the suite's many runs).
        c.seq_len = 64
    return c
