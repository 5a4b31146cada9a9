"""Analytic QP task weights: Balanced R-D "Solution 2" (research/balanced.md section 3).

With g_i = grad(L_i) / (L_i - m_i + eps) the gradient of task i's log loss and Q the Gram
matrix Q_ij = g_i . g_j, the weights solve

    min_w  w^T Q w   subject to  sum_i w_i = 1,

whose equality-constrained solution is w* = Q^-1 1 / (1^T Q^-1 1). For two tasks this is

    w_1 = (|g_2|^2 - g_1.g_2) / |g_1 - g_2|^2 ,   w_2 = 1 - w_1.

Only the equality is imposed, so a weight can leave [0, 1]; we clip to [0, 1] and renormalise
(the MGDA convention; whether the paper clips is unknown). Degenerate Gram matrices (identical
or zero gradients: every feasible w is optimal) give uniform weights, documented and tested.
"""

from __future__ import annotations

import torch

# Relative size below which a Gram matrix is treated as rank-deficient.
_DEGENERATE_RTOL = 1e-12


def gram_matrix(task_grads: list[list[torch.Tensor | None]]) -> torch.Tensor:
    """Q_ij = sum over parameters of <g_i, g_j>, in float64; ``None`` grads count as zero."""
    n = len(task_grads)
    n_params = len(task_grads[0]) if n else 0
    # Accumulated on the gradients' device and moved to the host once: a .cpu() per parameter
    # tensor would be one blocking synchronisation each on CUDA.
    device = next(
        (g.device for grads in task_grads for g in grads if g is not None), torch.device("cpu")
    )
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for k in range(n_params):
        present = [i for i in range(n) if task_grads[i][k] is not None]
        if not present:
            continue
        flat = torch.stack([task_grads[i][k].reshape(-1).double() for i in present])
        block = flat @ flat.T
        if len(present) == n:
            gram += block
        else:
            index = torch.tensor(present, device=device)
            gram[index.unsqueeze(1), index.unsqueeze(0)] += block
    return gram.cpu()


def two_task_weights(gram: torch.Tensor) -> torch.Tensor:
    """The closed form for n = 2, before clipping."""
    g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
    diff = g11 - 2 * g12 + g22  # |g_1 - g_2|^2
    if diff <= _DEGENERATE_RTOL * max(float(g11 + g22), 1e-300):
        return torch.full((2,), 0.5, dtype=torch.float64)
    w1 = (g22 - g12) / diff
    return torch.stack([w1, 1 - w1])


def equality_qp_weights(gram: torch.Tensor) -> torch.Tensor:
    """General n: solve the KKT system [2Q 1; 1^T 0][w; mu] = [0; 1], before clipping.

    The KKT form (solved by least squares) also covers a singular Q, as long as the problem
    restricted to the simplex's affine hull is not flat; a flat problem returns uniform weights.
    """
    n = gram.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    scale = float(gram.diagonal().sum())
    if scale <= 0.0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    q = gram / scale  # conditioning only: the minimiser is scale-invariant
    kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    kkt[:n, :n] = 2 * q
    kkt[:n, n] = 1
    kkt[n, :n] = 1
    rhs = torch.zeros(n + 1, dtype=torch.float64)
    rhs[n] = 1
    solution = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    weights = solution[:n]
    # Projected curvature on the constraint plane: zero means every feasible w is optimal.
    centred = q - q.mean(0, keepdim=True) - q.mean(1, keepdim=True) + q.mean()
    if float(centred.abs().max()) <= _DEGENERATE_RTOL:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return weights


def clip_and_renormalise(weights: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and rescale to sum 1 (the unclipped weights sum to 1, so some are > 0)."""
    clipped = weights.clamp(0.0, 1.0)
    total = clipped.sum()
    if not total > 0:
        raise ValueError(f"QP weights {weights.tolist()} have no positive entry to renormalise")
    return clipped / total


def qp_task_weights(gram: torch.Tensor) -> torch.Tensor:
    """Clipped, renormalised Solution-2 weights for a Gram matrix of log-loss gradients."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(
            f"gram must be a square (n, n) matrix with n >= 1, got shape {tuple(gram.shape)}"
        )
    if not torch.isfinite(gram).all():
        raise ValueError("gram contains non-finite entries")
    raw = two_task_weights(gram) if gram.shape[0] == 2 else equality_qp_weights(gram)
    return clip_and_renormalise(raw)
