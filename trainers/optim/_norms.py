"""The layer norm of the trust ratios (LARS, LAMB), per worker on stacked parameters."""
from __future__ import annotations

import torch
from torch import Tensor


def layer_l2(t: Tensor, worker_dim: bool) -> Tensor:
    """L2 norm of one layer; with a worker dim, one norm per worker, shaped [K, 1, ...] to broadcast.

    Per worker because each worker is its own model: a norm over the stack would mix them."""
    if not worker_dim:
        return torch.linalg.vector_norm(t)
    if t.ndim == 1:  # a stacked scalar parameter
        return t.abs()
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)
