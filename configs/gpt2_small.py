"""GPT-2 small (124M parameters) on C4, for one TPU v5e host (v5e-4, topology v5e:2x2).

    jaxlm train --config=configs/gpt2_small.py --workdir=gs://BUCKET/runs/gpt2_small \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Shape as in Radford et al. 2019 (12 layers, d_model 768, 12 heads, 1024 context, GPT-2's
50,257-token BPE, tied embeddings, learned positions, pre-LayerNorm, tanh-GELU). Data: the
prepared tfds `c4/en` in data_dir (prepare it once with `tfds build c4/en --data_dir=…`).
0.5M tokens per step (512 x 1024) for 20k steps = 10B tokens, about 4x Chinchilla's 20 tokens
per parameter. Expected from published GPT-2-small replications on web text (nanoGPT,
levanter), not yet measured by us: eval/loss around 3.0-3.3 nats on C4 validation by the end.
Sized for v5e:2x2 (4 chips of 16 GiB, data parallel): 8 micro-batches of 64 sequences
(grad_accum_steps) and the loss in chunks of 8,192 tokens (loss_chunk_size), so no step holds a
[batch, 1024, 50,304] float32 logits array; `jaxlm aot --config=configs/gpt2_small.py
--topology=v5e:2x2` compiles it there (tests/test_aot.py does, at these defaults): 8.18 GiB
of 16 per chip, splash attention. On more chips
(v5e:2x4, v4-8, a GPU) fewer micro-batches fit: lower grad_accum_steps. `:runlocal` shrinks
everything for a CPU smoke test on the embedded corpus.
"""

from jaxlm.config import base_config
from jaxlm.data.corpora import path as corpus_path


def get_config(arg: str = ""):
    c = base_config()
    c.task = "causal_lm"
    c.steps = 20_000
    c.global_batch_size = 512
    c.seq_len = 1024
    c.grad_accum_steps = 8  # 64 sequences a micro-batch: 16 a chip on v5e:2x2.
    c.loss_chunk_size = 8192  # Tokens per chunk of the vocabulary projection + cross-entropy.
    c.log_every = 100
    c.eval_every = 2_000
    c.eval_batches = 50
    c.checkpoint_every = 2_000
    c.checkpoint_every_minutes = 30.0

    c.data.tfds_name = "c4/en"
    c.data.text_key = "text"
    c.data.num_workers = 8  # grain processes per host tokenizing its rows' documents while training
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.tokenizer = "gpt2"  # A hub name or a local directory holding GPT-2's tokenizer files.

    c.model.vocab_size = 50_304  # GPT-2's 50,257 tokens padded to a multiple of 128.
    c.model.num_layers = 12
    c.model.d_model = 768
    c.model.num_heads = 12
    c.model.d_ff = 3072
    c.model.activation = "gelu_tanh"
    c.model.norm = "layernorm"
    c.model.positions = "learned"
    c.model.max_len = 1024
    c.model.tie_embeddings = True
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "dots_no_batch"

    c.optim.name = "adamw"
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 700
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.95

    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    if arg == "runlocal":
        c.steps, c.global_batch_size, c.seq_len = 20, 8, 128
        c.grad_accum_steps, c.loss_chunk_size = 1, 0
        c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 5, 10, 2, 10
        c.checkpoint_every_minutes = 0.0
        c.data.tfds_name, c.data.train_file, c.data.tokenizer = "", corpus_path("tiny_shakespeare"), "bpe"
        c.data.num_workers = 0
        c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.d_ff = 2, 64, 4, 256
        c.model.dtype, c.model.vocab_size = "float32", 0
    return c
