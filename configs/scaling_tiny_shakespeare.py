"""A scaling-law sweep on tiny Shakespeare that fits on a 2-core CPU (`jaxlm scaling`).

    jaxlm scaling run --config=configs/scaling_tiny_shakespeare.py --workdir=runs/scaling_tiny \
        --sizes=100k,200k,330k,500k,800k --tokens=300k,600k,1.2M

trains 15 runs (5 sizes from 0.1M to 0.8M non-embedding parameters, each on 0.3M, 0.6M and
1.2M tokens: SIZE_RULE's sizes and tokens, the defaults once the base config has the scaling
section), then fits L(N, D) and writes DIR/scaling_report.json and the plots. Every run is an
ordinary `jaxlm train` run of this recipe under DIR/runs/<name>/ with the model's width, depth,
heads and MLP width from the size rule below and `steps` from its tokens.

Measured (benchmarks/README.md): 1,274 s for the 15 runs and the fit on the shared 2-core
machine; eval/loss 4.75 (0.1M parameters, 0.3M tokens) to 3.91 (0.6M, 1.2M); counted FLOPs
within 2.7-4.3% of the compiled steps'; the fitted exponents are loose (alpha 0.87 [0.10, 2.40],
beta 0.12 [0.11, 0.36]) since no run gets near its loss floor at these token counts.

The size rule keeps d_model / num_layers at 32 with heads of width 32: at head_dim 32 and
d_model >= 64 the analytic FLOPs (6N + attention) stay within 5% of the compiled step's (the
vocabulary softmax and the attention softmax, which it leaves out, cost about 10 FLOPs per logit).
The 90% of the corpus trained on is 0.41M BPE tokens (1024-token BPE), so 1.2M tokens is 2.9
passes over it (Muennighoff et al. 2023 found up to 4 passes worth nearly as much as new data).
"""

from jaxlm.config import base_config
from jaxlm.data.corpora import path as corpus_path

SIZE_RULE = dict(
    aspect_ratio=32.0, head_dim=32, ffn_ratio=4.0, width_multiple=32,
    sizes="100k,200k,330k,500k,800k", tokens="300k,600k,1.2M", warmup_fraction=0.05, min_steps=20,
    loss="final", bootstrap=200, flops_check="all")


def get_config(arg: str = ""):  # pylint: disable=unused-argument
    c = base_config()
    c.task = "causal_lm"
    c.seed = 0
    c.global_batch_size = 16
    c.seq_len = 128
    c.log_every = 10
    c.eval_every = 0  # One evaluation, at the end: the fit takes the final eval/loss.
    c.eval_batches = 0  # The whole held-out split.
    c.checkpoint_every = 100
    c.keep_checkpoints = 2

    c.data.train_file = corpus_path("tiny_shakespeare")
    c.data.eval_fraction = 0.1
    c.data.doc_split = "blank_line"
    c.data.tokenizer = "bpe"
    c.data.bpe_vocab_size = 1024

    # Width, depth, heads and d_ff come from the size rule; the rest is every run's.
    c.model.activation = "gelu_tanh"
    c.model.norm = "layernorm"
    c.model.positions = "learned"
    c.model.max_len = 128
    c.model.tie_embeddings = True
    c.model.dropout = 0.0

    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.schedule = "cosine"  # Decays over each run's own steps (Hoffmann et al.: match the run length).
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0

    c.scaling.update(SIZE_RULE)
    return c
