"""Benchmark shape: the GPT-2 model of the peer script `benchmarks/peers/peer_hf_torch.py gpt2`.

Shapes copied from that script (so the two time the same model): GPT-2 layout (learned
positions, pre-LayerNorm with eps 1e-5, tanh GELU, tied embeddings, biases), 6 layers,
d_model 384, 6 heads, d_ff 1536, vocab 8192 (set exactly: no tokenizer, no padding to
vocab_multiple), 256 positions, seq 256, batch 16, no dropout: 13,891,584 parameters, the
count transformers' GPT2LMHeadModel gives (tests/test_bench_configs.py checks it).
Optimizer as torch.optim.AdamW(lr=1e-4) with its defaults: b1 0.9, b2 0.999, eps 1e-8,
weight decay 0.01 on every parameter, constant rate, no warmup, no clipping.

    jaxlm bench --mode=train --config=configs/bench/gpt2_cpu.py --steps=10        # float32
    jaxlm bench --mode=train --config=configs/bench/gpt2_cpu.py:bf16 --steps=10   # bf16 matmuls
    python benchmarks/train_vs_hf.py --models=gpt2    # jaxlm and the peer alternating

`:bf16` is mixed precision where only the matmuls take bfloat16 inputs (model.matmul_dtype,
float32 results; norms, softmax and the residual stream in float32; float32 parameters), the
counterpart of the peer's torch.autocast(cpu, bfloat16). Layers are unrolled
(model.scan_layers=False): at 6 layers on XLA:CPU the unrolled step is 1.13x faster than the
scanned one (benchmarks/README.md); scan pays off in compile time for deep models. `jaxlm bench` feeds synthetic batches, so no data is read.
"""

from jaxlm.config import base_config


def get_config(arg: str = ""):
    if arg not in ("", "bf16"):
        raise ValueError(f"unknown variant {arg!r}: use configs/bench/gpt2_cpu.py or configs/bench/gpt2_cpu.py:bf16")
    c = base_config()
    c.task = "causal_lm"
    c.seed = 0
    c.steps = 20
    c.global_batch_size = 16
    c.seq_len = 256
    c.eval_every = 0
    c.checkpoint_every = 0

    c.data.tokenizer = "bpe"
    c.data.bpe_vocab_size = 8192

    c.model.vocab_size = 8192  # Exactly the peer's: no rounding up to vocab_multiple.
    c.model.num_layers = 6
    c.model.d_model = 384
    c.model.num_heads = 6
    c.model.d_ff = 1536
    c.model.activation = "gelu_tanh"  # GPT-2's gelu_new.
    c.model.norm = "layernorm"
    c.model.norm_eps = 1e-5
    c.model.norm_position = "pre"
    c.model.positions = "learned"
    c.model.max_len = 256
    c.model.tie_embeddings = True
    c.model.use_bias = True
    c.model.causal = True
    c.model.dropout = 0.0
    c.model.dtype = "float32"
    c.model.matmul_dtype = "bfloat16" if arg == "bf16" else ""
    c.model.param_dtype = "float32"
    c.model.scan_layers = False

    # torch.optim.AdamW(lr=1e-4): its defaults, and decay on every parameter.
    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.decay_embeddings = True
    c.optim.decay_norms_and_biases = True
    c.optim.clip_norm = 0.0
    return c
