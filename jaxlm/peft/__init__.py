"""Parameter-efficient fine-tuning: adapters on a frozen pretrained base (LoRA, AdaLoRA).

    targets.py     which kernels get adapters and which params train in full (regexes over paths)
    lora.py        the LoRA method: adapter arrays, their init, their logical axes, the weight delta
    adalora.py     the AdaLoRA method: SVD-form adapters, orthogonality term, rank allocation in the step
    adapted.py     `AdaptedParams`: the trainable tree (adapters + full params), its shardings, the
                   frozen rest, merging both into the model's params inside the jitted step
    finetuning.py  fine-tuning defaults and the peft.* checks, where init_from is resolved
    inference.py   a LoRA run's params for eval / predict / generate / export: base + adapters, merged
    hf_format.py   the Hugging Face PEFT directory layout (adapter_config.json, adapter_model.safetensors)
    export.py      `jaxlm export --adapters_only`

Nothing is imported here, so that any module can import one part without pulling in the others
(pretrained.py imports hf_format; inference.py imports pretrained).
"""
