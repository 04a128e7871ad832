"""Fast check of the behaviour claim of bench/lora_pro_behaviour.py (task: support/behaviour.py) on a tiny teacher–student task:
with SGD at a moderate learning rate, LoRA-Pro's loss curve is closer to full fine-tuning's than
LoRA's, for each of 3 seeds (the setting where the full benchmark shows it with a wide margin)."""

from __future__ import annotations

import numpy as np
import optax

import lora_jax
from support import behaviour as lpb

KW = dict(dims=(16, 32, 32, 8), n=256, teacher_rank=8, rank=4, alpha=8.0, init="lora")


def test_lora_pro_sgd_follows_full_ft_closer_than_lora():
    seeds, steps, lrs = (0, 1, 2), 60, (1.0,)
    data = lpb.make_data(seeds, **KW)
    full = lpb.all_curves("full", optax.sgd, lrs, data, steps)[0]
    lora = lpb.all_curves("lora", optax.sgd, lrs, data, steps)[0]
    pro = lpb.all_curves("lora", lambda lr: optax.chain(lora_jax.lora_pro(), optax.sgd(lr)),
                         lrs, data, steps)[0]
    assert np.all(np.isfinite(full)) and np.all(np.isfinite(lora)) and np.all(np.isfinite(pro))
    assert np.all(full[:, -1] < 0.5 * full[:, 0])          # full FT actually learns the task
    d_lora, d_pro = lpb.distance(lora, full), lpb.distance(pro, full)
    assert np.all(d_pro < d_lora), (d_pro, d_lora)
