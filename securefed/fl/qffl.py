"""q-FFL's q-FedAvg (Li, Sanjabi, Beirami, Smith, ICLR 2020, Algorithm 2) as one secure sum.

Site k with loss ``F_k`` of the global model ``w`` on its training records and local update
``Δw_k = L (w - w̄_k)`` (``L = 1/lr``, the paper's Lipschitz estimate) sends

    Δ_k = F_k^q Δw_k,        h_k = q F_k^(q-1) ‖Δw_k‖² + L F_k^q,

and the server steps ``w ← w - Σ Δ_k / Σ h_k``. Our sites already secure-sum a vector
``[n_k u_k, n_k]`` (``u_k = w̄_k - w``, clipped to C_u) and the server applies
``total[:-1] / total[-1]``. Multiplying ``Δ_k`` and ``h_k`` by the same ``c_k / (L B^q)``
changes neither the ratio nor its sign bookkeeping, so a site sends

    [c_k s_k u_k,  c_k h'_k],    s_k = (F_k / B)^q,
    h'_k = s_k + (q L / B) (F_k / B)^(q-1) ‖u_k‖²,

and the server's step is unchanged: ``w + Σ c_k s_k u_k / Σ c_k h'_k`` is exactly q-FedAvg's
(with ``c_k`` = 1 for every site). We keep FedAvg's size weighting, ``c_k = n_k`` (capped at
N_max as today), so that q = 0 is FedAvg bit for bit (``s = h' = 1``); and a site caps ``c_k``
further to ``N_max / h'_k`` so that its last coordinate stays within the secure sum's range
N_max. The individual ``F_k``, ``h_k`` and sizes stay inside the sum, as sizes do today.

Dividing by ``B^q`` (B, the loss bound of :mod:`securefed.dp.fair_loss`) keeps ``s_k <= 1``:
no coordinate is larger than FedAvg's ``n_k u_k``. The poisoning bound still holds in the same
form: ``‖c s u‖ <= c s C_u <= c h' C_u``, so the sum's update is at most C_u times its last
coordinate; only the smallest honest last coordinate changes, from 1 to
``(FLOOR / B)^q`` (:func:`least_weight`).

**The step, decided by measurement** (``--fair-step``). q-FedAvg's ``‖u‖²`` term estimates
the curvature of ``F^(q+1)`` from the update's length. Under DP-SGD that length is mostly DP
noise (PneumoniaMNIST at epsilon 8: ``‖u‖`` about 17 per site, whose signal moves the model
by a fraction of it), so the term sets the step to about 1/700 of FedAvg's and training stalls
(seed 0: accuracy 0.625 in every round, AUC 0.17). ``--fair-step fedavg`` (the default) drops
it: ``h' = s``, so the server applies ``Σ n F^q u / Σ n F^q``, q-FFL's loss weights with
FedAvg's step size. ``--fair-step qffl`` keeps the paper's step (for non-private runs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from securefed.dp.fair_loss import BOUND, FLOOR

__all__ = ["fair_vector", "least_weight", "lipschitz", "server_step"]

#: ``--fair-step``: q-FedAvg's adaptive step (the paper's) or FedAvg's step size.
ADAPTIVE = "qffl"


def lipschitz(config: Any) -> float:
    """L = 1 / lr: q-FFL's estimate of the loss's Lipschitz constant (the run's lr)."""
    return 1.0 / float(config.effective_lr)


def least_weight(config: Any) -> float:
    """Smallest last coordinate an honest site sends: 1 for FedAvg, ``(FLOOR/B)^q`` for q-FFL."""
    q = float(getattr(config, "fair_q", 0.0))
    return 1.0 if q == 0 else min(1.0, (FLOOR / BOUND) ** q)


def fair_vector(
    update: np.ndarray,
    *,
    weight: float,
    loss: float,
    q: float,
    lipschitz: float,
    max_weight: float,
    adaptive: bool = True,
) -> np.ndarray:
    """The vector a site secure-sums: ``[c s u, c h']`` (the module's formula).

    Args:
        update: ``u``, the site's clipped local update ``w̄ - w``.
        weight: ``n``, the site's size capped at N_max (FedAvg's weight).
        loss: ``F``, the site's released loss, in ``[FLOOR, B]``.
        q: The fairness exponent (0: FedAvg's ``[n u, n]`` exactly).
        lipschitz: L.
        max_weight: N_max: the last coordinate is kept at most this.
        adaptive: q-FedAvg's step (``h'`` with its ``‖u‖²`` term); False: ``h' = s``, FedAvg's
            step size on the ``F^q``-weighted updates (``--fair-step fedavg``).

    """
    update = np.asarray(update, dtype=np.float64)
    if q == 0:
        return np.concatenate([weight * update, [weight]])
    ratio = float(loss) / BOUND
    scale = ratio**q
    h = scale
    if adaptive:
        h += (q * lipschitz / BOUND) * ratio ** (q - 1) * float(np.dot(update, update))
    c = min(float(weight), max_weight / h)
    return np.concatenate([(c * scale) * update, [c * h]])


def server_step(
    weights: np.ndarray, updates: list[np.ndarray], losses: list[float], *, q: float, lr: float
) -> np.ndarray:
    """q-FedAvg in the paper's own terms (no size weighting), for checking the sum.

    ``w - Σ F_k^q Δw_k / Σ (q F_k^(q-1) ‖Δw_k‖² + L F_k^q)`` with ``Δw_k = L (w - w̄_k) = -L u_k``.
    """
    big_l = 1.0 / lr
    num = np.zeros_like(np.asarray(weights, dtype=np.float64))
    den = 0.0
    for u, f in zip(updates, losses):
        dw = -big_l * np.asarray(u, dtype=np.float64)
        num += f**q * dw
        den += q * f ** (q - 1) * float(np.dot(dw, dw)) + big_l * f**q
    return np.asarray(weights, dtype=np.float64) - num / den
