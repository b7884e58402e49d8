"""BERT's masking for masked-LM pretraining (Devlin et al., 2019, section 3.1).

Each maskable token is selected with probability mask_rate (15%); a selected token is replaced by
the mask token (80%), by a random token (10%) or left as it is (10%), and is predicted. Special
tokens ([CLS], [SEP], padding, EOS …) are never selected.
"""

import numpy as np


def mask_row(tokens: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, *, mask_id: int,
             random_ids: np.ndarray, mask_rate: float = 0.15, mask_token_rate: float = 0.8,
             random_token_rate: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights) for one row of token ids.

    targets are the original tokens; weights are 1.0 at the selected positions, else 0.
    """
    selected = (rng.random(tokens.shape) < mask_rate) & maskable
    choice = rng.random(tokens.shape)
    to_mask = selected & (choice < mask_token_rate)
    to_random = selected & (choice >= mask_token_rate) & (choice < mask_token_rate + random_token_rate)
    inputs = tokens.copy()
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.choice(random_ids, int(to_random.sum()))
    return inputs, tokens.copy(), selected.astype(np.float32)


def row_rng(seed: int, *stream: int) -> np.random.Generator:
    """A generator fixed by (seed, stream…): e.g. (seed, batch, row) — the same whatever the hosts."""
    return np.random.default_rng([seed % 2**63, *stream])
