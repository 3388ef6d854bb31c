"""The Mixture type: ordered domain names + token weights >= 0 that sum to 1.

Weights are over *tokens*, never documents. A mixture carries the hash of the data it refers to
(domain names, tokenizer, content) so two artifacts built on different data cannot be mixed up.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from opmix_ray.errors import MixtureError

_TOL = 1e-6


@dataclass(frozen=True)
class Mixture:
    domains: tuple[str, ...]
    weights: tuple[float, ...]
    data_hash: str = field(default="", compare=False)

    def __post_init__(self):
        if len(self.domains) != len(self.weights):
            raise MixtureError(f"{len(self.domains)} domains but {len(self.weights)} weights "
                               "(fix: give one weight per domain)")
        if len(set(self.domains)) != len(self.domains):
            raise MixtureError(f"duplicate domain names in {self.domains} (fix: list each once)")
        for d, w in zip(self.domains, self.weights):
            if not math.isfinite(w) or w < 0:
                raise MixtureError(f"weight of '{d}' is {w} (fix: weights must be finite and >= 0)")
        total = sum(self.weights)
        if abs(total - 1.0) > _TOL:
            raise MixtureError(f"weights sum to {total:.6g}, not 1 (fix: normalise them, "
                               "e.g. Mixture.normalised(...))")

    @classmethod
    def normalised(cls, domains, weights, data_hash: str = "") -> "Mixture":
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(domains),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise MixtureError(f"cannot normalise weights {list(w)} (fix: finite, >= 0, positive sum)")
        w = w / w.sum()
        i = int(np.argmax(w))  # make the float sum exact on the largest weight, so zeros stay exactly 0
        w[i] = 1.0 - (w.sum() - w[i])
        return cls(tuple(domains), tuple(float(x) for x in w), data_hash)

    @classmethod
    def uniform(cls, domains, data_hash: str = "") -> "Mixture":
        return cls.normalised(domains, [1.0] * len(domains), data_hash)

    @classmethod
    def natural(cls, token_counts: dict[str, int], domains, data_hash: str = "") -> "Mixture":
        """Token-proportional: 'training without mixing'."""
        return cls.normalised(domains, [token_counts[d] for d in domains], data_hash)

    @classmethod
    def from_dict(cls, d: dict[str, float], domains=None, data_hash: str = "") -> "Mixture":
        domains = tuple(domains or d)
        missing = [x for x in domains if x not in d]
        extra = [x for x in d if x not in domains]
        if missing or extra:
            raise MixtureError(f"mixture domains differ: missing {missing}, unknown {extra} "
                               "(fix: give a weight for exactly the run's domains)")
        return cls(domains, tuple(float(d[x]) for x in domains), data_hash)

    def over(self, domains) -> "Mixture":
        """The same weights over `domains`, 0 for one this mixture lacks (a domain removed live stays
        in the main run's sampler at weight 0). Dropping a weighted domain is refused."""
        domains = tuple(domains)
        dropped = [d for d, w in zip(self.domains, self.weights) if d not in domains and w > 0]
        if dropped:
            raise MixtureError(f"mixture weights {dropped} but the domains are {list(domains)} "
                               "(fix: give weight only to the run's domains)")
        w = self.as_dict()
        return Mixture(domains, tuple(float(w.get(d, 0.0)) for d in domains), self.data_hash)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.domains, self.weights))

    def as_array(self) -> np.ndarray:
        return np.asarray(self.weights, dtype=np.float64)

    def check_compatible(self, domains, data_hash: str = "") -> None:
        if tuple(domains) != self.domains:
            raise MixtureError(f"mixture domains {self.domains} != run domains {tuple(domains)} "
                               "(fix: rebuild the mixture for this run's domain order)")
        if data_hash and self.data_hash and data_hash != self.data_hash:
            raise MixtureError(f"mixture data hash {self.data_hash[:12]} != run data hash {data_hash[:12]} "
                               "(fix: the data or tokenizer changed; recompute the mixture)")

    def __str__(self) -> str:
        return " ".join(f"{d}={w:.3f}" for d, w in zip(self.domains, self.weights))


def expand_collapsed(coords, a, current: Mixture) -> Mixture:
    """The mixture a candidate over `coords` ("old" and domains) stands for: E[d] = a_old * p_d + a_d.

    The "old" adapter was trained on the current mixture p, so giving it weight a_old is worth
    a_old * p_d of each domain (OP-Mix's collapse; the formula itself is search_spaces.expand).
    """
    from search_spaces import expand
    try:
        e = expand(coords, a, current.as_dict())
    except ValueError as exc:
        raise MixtureError(str(exc)) from None
    return Mixture.normalised(current.domains, [e[d] for d in current.domains], current.data_hash)


def content_hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()
