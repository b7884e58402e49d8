"""LoRA on the real pretrained MiniLM-L6-H384 for SST-2: configs/minilm_sst2.py with rank-8
adapters on the attention query and value kernels; the body stays frozen, the classification
head (BERT's pooler and the classifier) trains in full.

    jaxlm train --config=configs/minilm_sst2_lora.py --workdir=runs/minilm_sst2_lora
    jaxlm export --workdir=runs/minilm_sst2_lora --out=hf/minilm_sst2_lora                    # merged
    jaxlm export --workdir=runs/minilm_sst2_lora --out=peft/minilm_sst2_lora --adapters_only  # PEFT

The log prints the trainable parameters (adapters 73,728 + head 148,610 = 222,338 of the model's
22.7M, under 1%) and the optimizer state's bytes against full fine-tuning's. The learning rate is
the LoRA fine-tuning default (finetune.peft_learning_rate, 5e-4: adapters want a higher rate than
full fine-tuning); warmup and weight decay are the full recipe's. Checkpoints hold the adapters and
the head only; eval, predict, generate and export read the base from init_from (the MiniLM
directory) and merge. Same data, time budget and steps as the full recipe, so the two compare at
the same training time. Rank, alpha and learning rate are not tuned yet.
"""

import os

from jaxlm.config import load_config

FULL_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_sst2.py")


def get_config(arg: str = ""):
    c = load_config(f"{FULL_RECIPE}:{arg}" if arg else FULL_RECIPE)
    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 16.0  # scale alpha / rank = 2
    c.peft.targets = "attn/(query|value)/kernel$"
    c.peft.trainable = "^cls_head/"  # BERT's pooler and the classifier
    c.finetune.keep = "optim.warmup_steps,optim.weight_decay"  # the learning rate: LoRA's default
    return c
