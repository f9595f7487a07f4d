"""Strategies and server optimizers: the registered plug-ins of :mod:`securefed.plugins`.

A :class:`Strategy` says how many global models the server keeps and which one each site
trains (CFL picks per site); the round itself is the engine's (:mod:`securefed.fl.engine`).
What a strategy changes at the site (FedProx's proximal term, FTL's frozen backbone) is read
from the configuration there (``RunConfig.effective_prox_mu``, ``effective_freeze``).

Server-side optimizers on the securely aggregated update (FedAvg, FedAvgM, FedAdam).

The server only ever holds the *average* update ``Δ = Σ n_i u_i / Σ n_i`` (a sum it got from
the aggregator), so every optimizer here is post-processing of DP outputs and costs no
privacy. Following Reddi et al. 2021 ("Adaptive Federated Optimization"), ``Δ`` is treated
as a pseudo-gradient step: FedAvg applies it as is, FedAvgM adds server momentum
(Hsu et al. 2019), FedAdam scales it by a running second moment.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from securefed.errors import ConfigError

__all__ = [
    "CFL",
    "FEDAVG",
    "FEDPROX",
    "FTL",
    "TEACHER_STUDENT",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "ServerOptimizer",
    "Strategy",
    "build_server_optimizer",
    "build_strategy",
]


class ServerOptimizer(ABC):
    """Turns the current global vector and the average update into the next global vector."""

    name: str = ""

    @classmethod
    def create(cls, *, lr: float, momentum: float) -> ServerOptimizer:
        """This optimizer for a run's ``--server-lr`` and ``--server-momentum``."""
        return cls(lr=lr)

    def __init__(self, *, lr: float) -> None:
        self.lr = float(lr)

    @abstractmethod
    def step(self, *, current: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Return the new global vector; ``current`` is left untouched."""

    def state(self) -> dict[str, np.ndarray]:
        """The optimizer's running state (momentum, moments), for a server checkpoint."""
        return {k.lstrip("_"): v.copy() for k, v in vars(self).items() if isinstance(v, np.ndarray)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state` (a resumed server continues the same optimizer)."""
        for key, value in state.items():
            attr = "_" + key
            if not hasattr(self, attr):
                raise ConfigError(f"{type(self).__name__} has no state `{key}`")
            setattr(self, attr, np.asarray(value, dtype=np.float64).copy())

    def describe(self) -> dict[str, Any]:
        """Name and hyper-parameters for ``config.json``."""
        return {"name": self.name, "lr": self.lr}


class FedAvg(ServerOptimizer):
    """``w <- w + lr * Δ``; lr = 1 is McMahan et al.'s FedAvg."""

    name = "none"

    def step(self, *, current: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """One FedAvg step."""
        return current + self.lr * delta


class FedAvgM(ServerOptimizer):
    """Server momentum: ``v <- beta v + Δ``, ``w <- w + lr v`` (Hsu et al. 2019)."""

    name = "avgm"

    @classmethod
    def create(cls, *, lr: float, momentum: float) -> ServerOptimizer:
        """FedAvgM with the run's server momentum."""
        return cls(lr=lr, momentum=momentum)

    def __init__(self, *, lr: float, momentum: float) -> None:
        super().__init__(lr=lr)
        self.momentum = float(momentum)
        self._velocity: np.ndarray | None = None

    def step(self, *, current: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """One FedAvgM step."""
        if self._velocity is None:
            self._velocity = np.zeros_like(delta)
        self._velocity = self.momentum * self._velocity + delta
        return current + self.lr * self._velocity

    def describe(self) -> dict[str, Any]:
        """Adds the momentum."""
        return {**super().describe(), "momentum": self.momentum}


class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2), without bias correction as in the paper.

    ``m <- b1 m + (1-b1) Δ``, ``v <- b2 v + (1-b2) Δ²``, ``w <- w + lr m / (sqrt(v) + tau)``.
    """

    name = "adam"

    @classmethod
    def create(cls, *, lr: float, momentum: float) -> ServerOptimizer:
        """FedAdam whose beta1 is the run's server momentum."""
        return cls(lr=lr, beta1=momentum)

    def __init__(
        self, *, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr=lr)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self._m: np.ndarray | None = None
        self._v: np.ndarray | None = None

    def step(self, *, current: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """One FedAdam step."""
        if self._m is None or self._v is None:
            self._m = np.zeros_like(delta)
            # tau^2 as the initial second moment, as in the paper's experiments.
            self._v = np.full_like(delta, self.tau**2)
        self._m = self.beta1 * self._m + (1 - self.beta1) * delta
        self._v = self.beta2 * self._v + (1 - self.beta2) * delta**2
        return current + self.lr * self._m / (np.sqrt(self._v) + self.tau)

    def describe(self) -> dict[str, Any]:
        """Adds betas and tau."""
        return {**super().describe(), "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}


def build_server_optimizer(*, name: str, lr: float, momentum: float = 0.9) -> ServerOptimizer:
    """The optimizer registered as ``--server-opt NAME`` (``plugins.SERVER_OPTIMIZERS``).

    Raises:
        ConfigError: Unknown name.

    """
    from securefed.plugins import SERVER_OPTIMIZERS

    return SERVER_OPTIMIZERS.get(name).create(lr=lr, momentum=momentum)


class Strategy:
    """A ``--strategy``: how many global models, and which one each site trains.

    Subclass and register (:func:`securefed.plugins.register_strategy`) to add one.
    """

    name = "fedavg"
    #: Whether sites choose their model (then a ``select`` stage precedes ``fit``).
    selects_model = False

    def num_models(self, config: Any) -> int:
        """Global models the server keeps."""
        return 1

    def describe(self, config: Any) -> dict[str, Any]:
        """Extra entries for ``strategy`` in config.json and privacy.json."""
        return {}


class _FedProx(Strategy):
    name = "fedprox"


class _FTL(Strategy):
    name = "ftl"


class _CFL(Strategy):
    """IFCA (Ghosh et al. 2020): K cluster models; each site trains the one that fits it best."""

    name = "cfl"
    selects_model = True

    def num_models(self, config: Any) -> int:
        return int(config.clusters)

    def describe(self, config: Any) -> dict[str, Any]:
        return {
            "clusters": config.clusters,
            "cluster_selection": "IFCA: lowest loss on the site's training data",
        }


class _TeacherStudent(Strategy):
    """Semi-supervised segmentation: self-training from a pretrained teacher.

    One global model, aggregated like FedAvg. At the site, the teacher (frozen) pseudo-labels
    the site's unlabelled volumes before local DP-SGD trains the student on labelled and
    pseudo-labelled volumes together (:mod:`securefed.fl.teacher_student`). The teacher is the
    ``--pretrained`` model, which the server sends beside the global model each round
    (``--teacher fixed``), or the round's global model (``--teacher global``). Nothing new
    leaves a site.
    """

    name = "teacher-student"

    def describe(self, config: Any) -> dict[str, Any]:
        return {
            "recipe": (
                "self-training from a teacher pretrained on public labelled volumes, with "
                "FixMatch-style confidence-thresholded pseudo-labels (Sohn et al. 2020); "
                + (
                    "the teacher is the --pretrained model in every round"
                    if config.teacher == "fixed"
                    else "the teacher of round r is the global model each site receives in "
                    "round r, initialised from --pretrained"
                )
            ),
            "teacher": config.teacher,
            "labelled_fraction": config.labelled_fraction,
            "pseudo_threshold": config.pseudo_threshold,
            "unlabelled_weight": config.unlabelled_weight,
            "unlabelled_augmentation": "always (TorchIO, as --augment)",
            "pseudo_labels": (
                "computed at each site from its private unlabelled volumes and the teacher; "
                "they never leave the site, and training on them is DP-SGD like any step"
            ),
        }


FEDAVG = Strategy()
FEDPROX = _FedProx()
FTL = _FTL()
CFL = _CFL()
TEACHER_STUDENT = _TeacherStudent()


def build_strategy(name: str) -> Strategy:
    """The strategy registered as ``--strategy NAME``."""
    from securefed.plugins import STRATEGIES

    return STRATEGIES.get(name)
