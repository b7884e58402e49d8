"""Text classification from a local CSV (or TSV / JSONL / Parquet) file: a text column and a label
column with integer labels or names such as positive/negative. A small encoder from scratch, with
the run's own BPE tokenizer; or fine-tune a pretrained model with --config.init_from.

    jaxlm train --config=configs/csv_classification.py --workdir=runs/reviews \\
        --config.data.train_file=reviews.csv --config.data.text_column=review \\
        --config.data.label_column=sentiment [--config.data.eval_file=held_out.csv]

    # Fine-tune a Hugging Face model directory (BERT, GPT-2 or Llama family) or a jaxlm run:
    ... --config.init_from=/path/to/hf_model_or_jaxlm_run
    # ... or train LoRA adapters on it (the model stays frozen; the classifier trains in full):
    ... --config.init_from=/path/to/hf_model --config.peft.method=lora [--config.peft.rank=8]

With init_from the run takes fine-tuning defaults instead of this recipe's from-scratch optimizer
values (which suit the small encoder below): peak learning rate finetune.learning_rate (5e-5;
finetune.peft_learning_rate, 5e-4, with LoRA), warmup over finetune.warmup_fraction (10%) of the
steps, weight decay 0.01 on matrices only, the source model's dropout (hidden and attention), and
the source's pretrained pooler (classification.pooler) where it has one, as
BertForSequenceClassification. A field given on the command line (e.g.
--config.optim.learning_rate=1e-4) keeps its value; the log says which values were chosen
("fine-tuning defaults (init_from=...): optim.learning_rate=5e-05, ...").

Without data.eval_file a fixed random 10% of the rows is held out. The label names are stored
with the prepared data and in DIR/config.json (data.label_names); eval/precision, eval/recall
and eval/f1 are binary (positive class: a label named 'positive', else label 1) for two classes
and macro averages for more; DIR/eval_report.json has per-class values and the confusion
matrix, and DIR/best/ the params of the best eval/f1. Integer labels from 0 are class indices
(named by data.label_names if given, as SST-2's 0/1 by configs/sst2.py); integers that start
elsewhere (1..4 of a news-topic CSV, 1..5 stars) are the names of their classes; config.json records
the kind (data.label_kind), so a later `jaxlm eval --config.data.eval_file=...` maps integer or
name labels of another file exactly as training did. A Hugging Face Hub Parquet file's ClassLabel
names its integer labels. A CSV without a header line takes --config.data.header=false and
columns by number: --config.data.label_column=1 --config.data.text_column=2.

`:runlocal` (a 1-layer encoder, sequences of 16 tokens, 80 steps) on the 2-class rule-based
reviews that tests/test_classification.py writes (400 train, 61 eval rows):

    python -c "import sys; sys.path.insert(0, 'tests'); from sample_data import write_reviews; \
        write_reviews('reviews_train.csv', 400, 0); write_reviews('reviews_eval.csv', 61, 1)"
    jaxlm train --config=configs/csv_classification.py:runlocal --workdir=runs/reviews_local \
        --config.data.train_file=reviews_train.csv --config.data.eval_file=reviews_eval.csv \
        --config.data.text_column=review --config.data.label_column=sentiment

reaches eval/accuracy 1.0 (61/61) at steps 40 and 80, eval/loss 0.0052 at step 80; the test
asserts eval/accuracy >= 0.95 at step 80.
"""

from jaxlm.config import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.task = "classification"
    c.seed = 0
    c.steps = 1000
    c.global_batch_size = 32
    c.seq_len = 128
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.best_metric = "eval/f1"

    c.data.train_file = ""  # Set on the command line: --config.data.train_file=FILE.
    c.data.eval_file = ""
    c.data.eval_fraction = 0.1
    c.data.text_column = "text"
    c.data.label_column = "label"
    c.data.tokenizer = "bpe"
    c.data.bpe_vocab_size = 4096
    c.data.length_buckets = 3  # Batches of short texts run at seq_len/4 or seq_len/2.

    c.classification.pooling = "auto"  # mean for an encoder with the run's BPE (it has no [CLS]).
    c.classification.class_weights = ""  # 'balanced' for skewed labels.

    # A small BERT-style encoder.
    c.model.causal = False
    c.model.norm_position = "post"
    c.model.embed_norm = True
    c.model.type_vocab_size = 2
    c.model.num_layers = 2
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.model.max_len = 512
    c.model.dropout = 0.1

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "linear"
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.b2 = 0.999

    if arg == "runlocal":
        # A tiny encoder learns fast: a short warmup and a high peak rate, decayed over 80 steps.
        c.steps = 80
        c.log_every = 10
        c.eval_every = 40
        c.checkpoint_every = 40
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 10
        c.seq_len = 16
        c.data.length_buckets = 1  # Short texts: one batch shape, one compile.
        c.data.bpe_vocab_size = 512
        c.model.num_layers = 1
        c.model.d_model = 32
        c.model.num_heads = 2
        c.model.d_ff = 64
        c.model.max_len = 64
    return c
