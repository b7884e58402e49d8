"""AdaLoRA on the real pretrained MiniLM-L6-H384 for SST-2: configs/minilm_sst2.py with SVD-form
adapters P·diag(λ)·Q on the attention query and value kernels (as configs/minilm_sst2_lora.py's
LoRA), starting at rank 12 per matrix and pruned by sensitivity to an average rank of 8, so that
at the end it holds the LoRA recipe's budget (12 matrices x rank 8) spread where it matters. The
body stays frozen; the classification head (BERT's pooler and the classifier) trains in full.

    jaxlm train --config=configs/minilm_sst2_adalora.py --workdir=runs/minilm_sst2_adalora
    jaxlm export --workdir=runs/minilm_sst2_adalora --out=hf/minilm_sst2_adalora                    # merged
    jaxlm export --workdir=runs/minilm_sst2_adalora --out=peft/minilm_sst2_adalora --adapters_only  # PEFT

The schedule (peft's names): 200 steps at rank 12 (tinit), then the cubic budget from 144 to 96
triplets over steps 200-1800 with a reallocation every 10 steps (delta_t), then 200 steps with the
final mask frozen (tfinal). AdaLoRA's schedule counts steps (total_step = steps), so this recipe
turns the full recipe's 20-minute time budget off: a run cut short would stop mid-pruning, with
more than the target rank and no DIR/adalora_ranks.json. alpha 24 keeps the LoRA recipe's scale
(alpha / init_r = 2); the learning rate is the adapters' fine-tuning default
(finetune.peft_learning_rate, 5e-4); orth_reg_weight 0.5 and beta1 = beta2 = 0.85 are peft's
defaults. `--adapters_only` writes peft's AdaLoRA layout (adapter_config.json with the
AdaLoraConfig fields and the rank_pattern of the kept triplets; adapter_model.safetensors) for
peft.PeftModel.from_pretrained on AutoModelForSequenceClassification. `:runlocal` is the full
recipe's 20-step smoke run with a schedule that fits it (tinit 4, tfinal 4, delta_t 2).

Measured: nothing on SST-2 yet (no dev accuracy, no time per step); the tests check the mechanics
(tests/test_adalora.py: schedule, masks, resume, the PEFT export's logits on the real MiniLM).
Not tuned: init_r, target_r, the schedule, alpha and the learning rate.
"""

import os

from jaxlm.config import load_config

FULL_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_sst2.py")


def get_config(arg: str = ""):
    c = load_config(f"{FULL_RECIPE}:{arg}" if arg else FULL_RECIPE)
    c.train_time_budget_minutes = 0.0  # the schedule is in steps: run all of them
    c.peft.method = "adalora"
    c.peft.init_r = 12
    c.peft.target_r = 8
    c.peft.alpha = 24.0  # scale alpha / init_r = 2, the LoRA recipe's
    c.peft.tinit = 200
    c.peft.tfinal = 200
    c.peft.delta_t = 10
    c.peft.targets = "attn/(query|value)/kernel$"
    c.peft.trainable = "^cls_head/"  # BERT's pooler and the classifier
    c.finetune.keep = "optim.warmup_steps,optim.weight_decay"  # the learning rate: the adapters' default
    if arg == "runlocal":  # 20 steps
        c.peft.tinit, c.peft.tfinal, c.peft.delta_t = 4, 4, 2
    return c
