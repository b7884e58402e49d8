"""Full fine-tuning, step for step against transformers + torch.optim.AdamW.

A tiny random BertForSequenceClassification saved in Hugging Face format is the `init_from`
of `configs/csv_classification.py`, resolved as `jaxlm train` resolves it (fine-tuning
defaults, the source's pooler). The same model in PyTorch, given jaxlm's initial classifier,
trains on the same batches with torch's AdamW, the same linear warmup and decay, gradient
clipping and weight decay on matrices only. Dropout is 0 in both (its random draws cannot be
shared), so every step must agree: losses, gradient norms, learning rates and, at the end,
every parameter. The rate and decay are raised from the defaults so that a wrong decay mask,
schedule or clip shows in the parameters; a clip below the gradient norms makes it act.

This is what benchmarks/README.md leans on: where jaxlm and the Hugging Face peer differ on a
held-out set, it is the peer's protocol (constant rate, no clip, random batch order) and the
random draws, not the update.
"""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

import configs.csv_classification as recipe
from jaxlm import sharding
from jaxlm.compat import mesh_context
from jaxlm.peft import finetuning
from jaxlm.tasks.classification import auto_pooling
from jaxlm.trainer import CompiledSteps, Trainer

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

STEPS, BATCH, SEQ, LABELS = 24, 8, 16, 3
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.1, 0.5


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A saved tiny BERT classifier (random, perturbed LayerNorms and biases) with its tokenizer."""
    path = str(tmp_path_factory.mktemp("tiny_bert_cls"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(os.path.join(path, "vocab.txt"))
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=LABELS)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # Norm scales of 1 and zero biases would hide a wrong decay mask.
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path, tokenizer


def batches(seed: int = 1, count: int = 4) -> list[dict]:
    """[CLS] + random tokens + padding; some rows are sentence pairs (token type 1 at the end)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = rng.integers(4, SEQ + 1, BATCH)
        mask = np.arange(SEQ)[None] < lengths[:, None]
        ids = np.where(mask, rng.integers(5, 64, (BATCH, SEQ)), 0)
        ids[:, 0] = 2
        types = (mask & (np.arange(SEQ)[None] >= lengths[:, None] // 2) & (rng.random(BATCH) < 0.5)[:, None])
        out.append({"inputs": ids.astype(np.int32), "padding_mask": mask, "token_type_ids": types.astype(np.int32),
                    "labels": rng.integers(0, LABELS, BATCH).astype(np.int32),
                    "weights": np.ones(BATCH, np.float32)})
    return out


def flat(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flat(value, prefix + (key,))
    else:
        yield "/".join(prefix), np.asarray(tree)


def torch_name(name: str) -> tuple[str, bool]:
    """jaxlm parameter path -> (transformers parameter name, transpose a kernel)."""
    parts = name.split("/")
    leaf = parts[-1]
    if parts[0] == "cls_head":
        module = {"pooler": "bert.pooler.dense", "classifier": "classifier"}[parts[1]]
        return f"{module}.{'weight' if leaf == 'kernel' else 'bias'}", leaf == "kernel"
    raise KeyError(name)


def test_finetuning_steps_equal_transformers_with_torch_adamw(source):
    path, tokenizer = source
    config = recipe.get_config()
    config.init_from = path
    config.data.num_labels = LABELS
    config.steps, config.global_batch_size, config.seq_len = STEPS, BATCH, SEQ
    config.finetune.learning_rate, config.finetune.weight_decay = LR, WEIGHT_DECAY
    config.optim.clip_norm = CLIP
    resolved = finetuning.resolve_init_from(config, {})
    # What ClassificationTask.resolve picks for this tokenizer, as a real run does.
    config.classification.pooling = auto_pooling(config.model.causal, tokenizer)
    optim = config.optim
    assert (config.classification.pooling, config.classification.pooler) == ("cls", True)
    assert (optim.learning_rate, optim.weight_decay, optim.warmup_steps, optim.schedule) == (LR, WEIGHT_DECAY,
                                                                                             2, "linear")
    assert (config.model.dropout, config.model.attention_dropout) == (0.0, 0.0)  # the source's

    trainer = Trainer(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init_state(config.seed, pretrained=resolved.load(trainer.abstract_params))

    peer = transformers.BertForSequenceClassification.from_pretrained(path)
    with torch.no_grad():  # jaxlm's fresh classifier (and the loaded pooler) into the peer.
        named = dict(peer.named_parameters())
        for name, value in flat(jax.device_get(state.params)["cls_head"], ("cls_head",)):
            target, transpose = torch_name(name)
            named[target].copy_(torch.from_numpy(np.array(value.T if transpose else value)))
    # jaxlm's decay mask (optim.decay_mask): matrices decay; norms, biases and embeddings do not.
    decayed = [p for n, p in peer.named_parameters() if not ("LayerNorm" in n or n.endswith("bias") or "embeddings" in n)]
    others = [p for n, p in peer.named_parameters() if "LayerNorm" in n or n.endswith("bias") or "embeddings" in n]
    adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": WEIGHT_DECAY}, {"params": others, "weight_decay": 0.0}],
                              lr=LR, betas=(optim.b1, optim.b2), eps=optim.eps)
    warmup = optim.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(  # transformers' get_linear_schedule_with_warmup
        adamw, lambda s: s / warmup if s < warmup else max(0.0, (STEPS - s) / (STEPS - warmup)))

    compiled, data, clipped = CompiledSteps(trainer), batches(), 0
    peer.train()
    for step in range(STEPS):
        batch = data[step % len(data)]
        lr = adamw.param_groups[0]["lr"]
        out = peer(input_ids=torch.from_numpy(batch["inputs"]).long(),
                   attention_mask=torch.from_numpy(batch["padding_mask"]).long(),
                   token_type_ids=torch.from_numpy(batch["token_type_ids"]).long(),
                   labels=torch.from_numpy(batch["labels"]).long())
        adamw.zero_grad()
        out.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(peer.parameters(), CLIP))
        adamw.step()
        schedule.step()
        clipped += grad_norm > CLIP

        state, metrics = compiled.train(state, sharding.to_global(batch, trainer.mesh))
        got = {k: float(v) for k, v in metrics.compute().items()}
        np.testing.assert_allclose(got["loss"], out.loss.item(), rtol=0, atol=2e-6, err_msg=f"loss at step {step}")
        np.testing.assert_allclose(got["grad_norm"], grad_norm, rtol=1e-4, err_msg=f"gradient norm at step {step}")
        np.testing.assert_allclose(got["learning_rate"], lr, rtol=1e-6, atol=1e-12, err_msg=f"rate at step {step}")
    assert 0 < clipped < STEPS, f"the clip acted at {clipped} of {STEPS} steps; the test needs both kinds"

    final = dict(flat(jax.device_get(state.params)))
    reference = {n: p.detach().numpy() for n, p in peer.named_parameters()}
    start = dict(flat(resolved.load(trainer.abstract_params)))
    for name in ("cls_head/classifier/kernel", "cls_head/pooler/kernel", "cls_head/pooler/bias"):
        target, transpose = torch_name(name)
        want = reference[target].T if transpose else reference[target]
        np.testing.assert_allclose(final[name], want, rtol=0, atol=2e-5, err_msg=name)
    # Every parameter trained, but the key bias: it adds q.b to every key's logit alike, which the
    # softmax cancels, so its gradient is 0 (in transformers too) and without decay it stays.
    still = sorted(n for n in start if np.abs(final[n] - start[n]).max() < 1e-3)
    assert still == ["body/layers/attn/key/bias"], still
    # The body, through the converter's own mapping: the exported model is the peer's.
    exported = jax.device_get(state.params)
    with mesh_context(trainer.mesh):
        logits_jaxlm = np.asarray(jax.jit(trainer.apply)(exported, sharding.to_global(data[0], trainer.mesh)))
    peer.eval()
    with torch.no_grad():
        logits_peer = peer(input_ids=torch.from_numpy(data[0]["inputs"]).long(),
                           attention_mask=torch.from_numpy(data[0]["padding_mask"]).long(),
                           token_type_ids=torch.from_numpy(data[0]["token_type_ids"]).long()).logits.numpy()
    np.testing.assert_allclose(logits_jaxlm, logits_peer, rtol=0, atol=2e-5)
