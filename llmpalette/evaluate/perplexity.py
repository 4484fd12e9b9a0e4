"""Perplexity of a causal LM on fixed windows: exp of the mean next-token negative log-likelihood."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> float:
    """windows [N, L] token ids -> exp(mean NLL of tokens 1..L-1 of every window given the tokens before it).

    Every window predicts the same number of tokens, so this is the token-weighted mean. The sum is
    taken in float64, so the result does not depend on batch_size beyond float32 logits.
    """
    if windows.numel() == 0:
        raise ValueError("no evaluation windows")
    device = next(model.parameters()).device
    total_nll = 0.0
    count = 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()  # [B, L-1, V]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll.double())
        count += batch[:, 1:].numel()
    return math.exp(total_nll / count)
