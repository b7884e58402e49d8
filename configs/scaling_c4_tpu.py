"""An IsoFLOP scaling-law sweep on C4 for a TPU v5p-16 slice (8 chips, topology 2x2x2).

    jaxlm scaling run --config=configs/scaling_c4_tpu.py --workdir=gs://BUCKET/scaling/c4 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

needs `c4/en` prepared in data_dir (`tfds build c4/en --data_dir=...`) and the GPT-2 tokenizer
(the hub's `gpt2`, or a local directory with its files: --config.data.tokenizer=DIR). The
default sweep (scaling.budgets x scaling.isoflop_sizes) is 4 budgets from 3e17 to 1e19 FLOPs,
5 Llama-style models per budget spread 8x around the 20-tokens-a-parameter size (11M to 680M
non-embedding parameters, 3 to 140 tokens a parameter): 7.2e19 FLOPs in all, about 13 hours on
8 v5p chips at 40% MFU.
Every run is an ordinary `jaxlm train` run of this recipe under DIR/runs/<name>/, so the sweep
can also be spread over several slices: `jaxlm scaling list` prints one command per run, and
`jaxlm scaling fit --workdir=DIR` collects them. Check a run's fit first, e.g. the largest:

    jaxlm scaling list --config=configs/scaling_c4_tpu.py --workdir=/tmp/plan   # its overrides
    jaxlm aot --config=configs/scaling_c4_tpu.py --topology=v5p:2x2x2 --config.model.num_layers=...

Not trained by us (no TPU here): the losses and the fitted exponents are yours to measure. The
largest run's step was compiled for v5p:2x2x2 on a CPU with libtpu (`jaxlm aot ...
--config.model.num_layers=24 --config.model.d_model=1536 --config.model.num_heads=12
--config.model.d_ff=4096`): 27.08 GiB of 95 per chip with splash
attention (40.0 GiB with XLA attention), compiled / counted FLOPs 1.003.
"""

from jaxlm.config import base_config

SIZE_RULE = dict(
    aspect_ratio=64.0, head_dim=128, ffn_ratio=8 / 3, width_multiple=128,
    budgets="3e17,1e18,3e18,1e19", isoflop_sizes=5, isoflop_spread=8.0, tokens_per_param=20.0,
    warmup_fraction=0.02, min_steps=200, loss="final", bootstrap=200, flops_check="one")


def get_config(arg: str = ""):  # pylint: disable=unused-argument
    c = base_config()
    c.task = "causal_lm"
    c.seed = 0
    c.global_batch_size = 256
    c.seq_len = 1024  # 262,144 tokens a step.
    # In 4 micro-batches: the sweep's largest model (24 layers, d_model 1536) needs 138 GiB of
    # temporaries per v5p chip in one (XLA attention); in four, 27 GiB of 95 in all (`jaxlm aot`).
    c.grad_accum_steps = 4
    c.log_every = 50
    c.eval_every = 0  # The fit takes the final evaluation.
    c.eval_batches = 40  # 10M held-out tokens of C4's validation split.
    c.checkpoint_every = 1000
    c.checkpoint_every_minutes = 15.0
    c.keep_checkpoints = 2

    c.data.tfds_name = "c4/en"
    c.data.text_key = "text"
    c.data.num_workers = 8  # grain processes per host tokenizing its rows' documents while training
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.tokenizer = "gpt2"
    c.model.vocab_size = 50_304  # GPT-2's 50,257 tokens, padded to a multiple of 128.

    # Width, depth, heads and d_ff come from the size rule (SwiGLU: d_ff = 8/3 d_model).
    c.model.activation = "swiglu"
    c.model.norm = "rmsnorm"
    c.model.positions = "rope"
    c.model.max_len = 1024
    c.model.tie_embeddings = False
    c.model.use_bias = False
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "none"

    c.optim.name = "adamw"
    c.optim.learning_rate = 2e-3
    c.optim.schedule = "cosine"  # Over each run's own steps, to 10% (Hoffmann et al.).
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0

    c.mesh.data = 1
    c.mesh.fsdp = -1  # FSDP over the slice's 8 chips.
    c.mesh.tensor = 1

    c.scaling.update(SIZE_RULE)
    return c
