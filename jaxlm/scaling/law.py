"""The Chinchilla scaling law and its compute-optimal frontier (pure numpy).

L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2), N the non-embedding
parameters, D the training tokens. Minimising L under C = 6 N D gives (their eq. 4)

    N*(C) = G (C/6)^a,   D*(C) = G^-1 (C/6)^b,
    a = beta / (alpha + beta),  b = alpha / (alpha + beta),  G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

import dataclasses

import numpy as np

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def a(self) -> float:
        """Exponent of N*(C)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D*(C)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:  # pylint: disable=invalid-name
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal_params(self, flops):
        return self.G * (np.asarray(flops, np.float64) / 6.0) ** self.a

    def optimal_tokens(self, flops):
        return (np.asarray(flops, np.float64) / 6.0) ** self.b / self.G

    def optimal_loss(self, flops):
        return self.loss(self.optimal_params(flops), self.optimal_tokens(flops))

    def as_dict(self) -> dict:
        return {k: float(getattr(self, k)) for k in PARAM_NAMES}

    @classmethod
    def from_vector(cls, v) -> "Law":
        return cls(*(float(x) for x in v))

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, k) for k in PARAM_NAMES], np.float64)


# Published fits, for tests and for comparison in the report.
CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022.
BESIROGLU = Law(E=1.82, A=482.0, B=2085.0, alpha=0.35, beta=0.37)  # Besiroglu et al. 2024, refit.
