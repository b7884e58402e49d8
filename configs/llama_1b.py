"""A Llama-style ~1.2B model (RoPE, RMSNorm, SwiGLU, GQA) for TPU pods, FSDP over all chips.

    jaxlm train --config=configs/llama_1b.py --workdir=gs://BUCKET/runs/llama_1b \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.data.tokenizer=/path/to/llama3_tokenizer_dir

The shape of Llama 3.2 1B (Meta, 2024): 16 layers, d_model 2048, 32 query heads and 8 KV heads
of 64, SwiGLU width 8192, RoPE base 500,000, tied embeddings, no biases; the tokenizer (any
local directory with tokenizer files; Llama 3's has 128,256 tokens) sets the vocabulary.
1M tokens per step (512 x 2048) for 25k steps = 25B tokens (about 20 tokens per parameter,
Hoffmann et al. 2022). Sized for a v5p-16 slice (topology v5p:2x2x2: 8 chips of 95 GiB, one JAX
device per chip), FSDP over every chip: 4 micro-batches of 128 sequences (grad_accum_steps) and
the loss in chunks of 16,384 tokens (loss_chunk_size). Check the fit and the step's FLOPs:

    jaxlm aot --config=configs/llama_1b.py --topology=v5p:2x2x2

(tests/test_aot.py compiles these defaults there: 38.74 GiB of 95 per chip, splash attention). On a bigger slice (v5p:2x4x4, 32 chips) set
--config.grad_accum_steps=1: the same 16 sequences a chip.

Expected, not yet measured by us: MFU around 50% with FSDP on v5p. `:runlocal` shrinks it for
a CPU.
"""

from jaxlm.config import base_config
from jaxlm.data.corpora import path as corpus_path


def get_config(arg: str = ""):
    c = base_config()
    c.task = "causal_lm"
    c.steps = 25_000
    c.global_batch_size = 512
    c.seq_len = 2048
    c.grad_accum_steps = 4  # 128 sequences a micro-batch: 16 a chip on v5p:2x2x2.
    c.loss_chunk_size = 16_384  # Tokens per chunk of the vocabulary projection + cross-entropy.
    c.log_every = 50
    c.eval_every = 2_500
    c.eval_batches = 50
    c.checkpoint_every = 1_000
    c.checkpoint_every_minutes = 20.0

    c.data.tfds_name = "c4/en"
    c.data.text_key = "text"
    c.data.tokenizer = "meta-llama/Llama-3.2-1B"  # Or a local directory with its tokenizer files.

    c.model.vocab_size = 128_256  # Llama 3's tokenizer; must be >= the tokenizer's size.
    c.model.num_layers = 16
    c.model.d_model = 2048
    c.model.num_heads = 32
    c.model.num_kv_heads = 8
    c.model.head_dim = 64
    c.model.d_ff = 8192
    c.model.activation = "swiglu"
    c.model.norm = "rmsnorm"
    c.model.norm_eps = 1e-5
    c.model.positions = "rope"
    c.model.rope_theta = 500_000.0
    c.model.max_len = 2048
    c.model.tie_embeddings = True
    c.model.use_bias = False
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "dots_no_batch"

    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 2_000
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.95

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    if arg == "runlocal":
        c.steps, c.global_batch_size, c.seq_len = 20, 8, 128
        c.grad_accum_steps, c.loss_chunk_size = 1, 0
        c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 5, 10, 2, 10
        c.checkpoint_every_minutes = 0.0
        c.data.tfds_name, c.data.train_file, c.data.tokenizer = "", corpus_path("tiny_shakespeare"), "bpe"
        c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.num_kv_heads = 2, 64, 4, 2
        c.model.head_dim, c.model.d_ff, c.model.max_len = 16, 128, 256
        c.model.dtype, c.model.vocab_size = "float32", 0
    return c
