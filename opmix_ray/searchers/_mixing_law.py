"""The OP-Mix searcher: fit a log-linear mixing law per eval domain, propose its KL-regularised optimum.

What the OP-Mix reference implementation (arXiv 2605.15220, code at github.com/michahu/on-policy-mix,
pipeline/olmix_fit.py, adapted there from OLMix and mixinglaws) does, and how this module runs it:

1. Candidates are adapter weights a over ("old", d_1..d_k), "old" being the adapter trained on the
   current mixture. Score n_init Dirichlet(1) candidates (warm starts count too) as merged-adapter
   trials; the draws go through space.sample, so they satisfy the space's bounds and cap rows.
2. For every eval domain d, fit L_d(a) = exp(c_d) + exp(t_d . a) with a summed Huber loss
   (delta 0.02, as the reference: a few noisy evaluations must not drag the fit) from many restarts
   (the exp-of-linear fit is not convex). The reference runs torch L-BFGS from a grid of 300 starts;
   here every restart of every domain is one block of a batched Levenberg-Marquardt (IRLS weights for
   the Huber loss), which stays fast enough to refit once per left-out trial.
3. Propose argmin_a sum_d v_d exp(t_d . a) + lam * KL(a || q) with lam = 0.05, v the objective's
   per-domain weights (the reference: uniform) and q the reference's prior {old: 0.5, each d_i: 0.5/k}
   (uniform without an "old" coordinate). exp(c_d) is a constant and drops out; the problem is convex.
   The reference solves it by cvxpy on the plain simplex; here SLSQP also keeps the space's bounds and
   its linear cap rows A_ub @ a <= b_ub, so repetition caps on the mixture a stands for hold.
4. Fit quality: leave-one-out refits predict each trial's objective (loo_rmse, loo_spearman), beside
   the in-sample R^2; they go with every proposal, and law_proposal() hands the engine the law's own
   proposal with them, so the engine pushes it only when the law predicts held-out trials well.
5. The proposal is scored as an ordinary trial; every later suggestion refits on everything seen. A
   proposal within 1e-3 of a point already tried is replaced by a fresh draw, so a longer budget
   keeps adding information instead of re-scoring one mixture.

If trials report no per-domain losses (a custom trainable), the law is fitted to the objective.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import minimize

from opmix_ray.searchers.base import METRIC, MODE, MixtureSearcher, SearcherError

HUBER_DELTA = 0.02
KL_LAMBDA = 0.05
LM_ITERS = 150  # Levenberg-Marquardt steps; the blocks here converge in well under 100


def _huber(r: np.ndarray, m: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return (m * np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))).sum(axis=1)


def fit_laws(A: np.ndarray, Y: np.ndarray, rng: np.random.Generator, restarts: int = 24,
             delta: float = HUBER_DELTA, masks: np.ndarray | None = None):
    """Per column d of Y: (c, t, huber loss) of the best of `restarts` fits of Y[:, d] ~ exp(c) + exp(A t).

    masks [F, n] (0/1) fits F folds at once, each on its own rows (leave-one-out: 1 - eye(n)), and
    returns one such list per fold. Every (fold, domain, restart) is an independent block with k + 1
    parameters, solved together by batched damped Gauss-Newton (8x8 solves, converged blocks frozen).
    One scipy L-BFGS-B over all the stacked blocks ran out of its 2000 steps at n=24, k=D=7 and took
    ~1 s of CPU per fit (17-40 s wall with BLAS threads on a loaded machine); this takes ~0.03 s."""
    n, k = A.shape
    M = np.ones((1, n)) if masks is None else np.asarray(masks, dtype=np.float64).reshape(-1, n)
    F, D, R = len(M), Y.shape[1], int(restarts)
    B = F * D * R  # block b = (fold, domain, restart) in C order
    y = np.broadcast_to(Y.T[None, :, None, :], (F, D, R, n)).reshape(B, n)
    m = np.broadcast_to(M[:, None, None, :], (F, D, R, n)).reshape(B, n)
    ymin, ymax = np.where(m > 0, y, np.inf).min(axis=1), np.where(m > 0, y, -np.inf).max(axis=1)
    ymean = (m * y).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    c0 = np.log(np.maximum(ymin * rng.uniform(0.2, 0.95, B), 1e-6))
    t0 = np.log(np.maximum(ymean - np.exp(c0), 1e-4))[:, None] + rng.normal(0.0, 1.0, (B, k))
    lo = np.r_[-12.0, np.full(k, -25.0)]
    hi = np.concatenate([(np.log(np.maximum(ymax, 1e-6)) + 1.0)[:, None], np.full((B, k), 25.0)], axis=1)
    x = np.clip(np.concatenate([c0[:, None], t0], axis=1), lo, hi)

    def parts(x, y):
        ec, et = np.exp(x[:, 0]), np.exp(x[:, 1:] @ A.T)  # [b], [b, n]; bounded, so finite
        return ec, et, ec[:, None] + et - y

    ec, et, r = parts(x, y)
    loss, mu = _huber(r, m, delta), np.full(B, 1e-3)
    done, eye = np.zeros(B, dtype=bool), np.eye(k + 1)
    for _ in range(LM_ITERS):
        i = np.flatnonzero(~done)  # converged or stuck blocks are frozen: the rest get cheaper each step
        if not len(i):
            break
        mi, ri = m[i], r[i]
        J = np.concatenate([np.broadcast_to(ec[i, None, None], (len(i), n, 1)), et[i, :, None] * A[None]], axis=2)
        a = np.abs(ri)
        wt = mi * np.where(a <= delta, 1.0, delta / np.maximum(a, delta))  # IRLS: Huber as reweighted LSQ
        g = np.einsum("bn,bnj->bj", mi * np.clip(ri, -delta, delta), J)  # the Huber gradient
        H = (J * wt[:, :, None]).transpose(0, 2, 1) @ J  # [b, k+1, k+1]; a 3-operand einsum is ~10x slower
        damp = mu[i, None, None] * (np.diagonal(H, axis1=1, axis2=2)[:, :, None] * eye + 1e-12 * eye)
        xn = np.clip(x[i] - np.linalg.solve(H + damp + 1e-14 * eye, g[:, :, None])[:, :, 0], lo, hi[i])
        ecn, etn, rn = parts(xn, y[i])
        ln = _huber(rn, mi, delta)
        ok = np.isfinite(ln) & (ln < loss[i])
        gain = np.where(ok, loss[i] - ln, 0.0)
        j = i[ok]
        x[j], ec[j], et[j], r[j], loss[j] = xn[ok], ecn[ok], etn[ok], rn[ok], ln[ok]
        mu[i] = np.where(ok, np.maximum(mu[i] / 3.0, 1e-10), mu[i] * 4.0)
        done[i] = (ok & (gain <= 1e-10 * loss[i])) | (mu[i] > 1e8)
    X, L = x.reshape(F, D, R, k + 1), np.where(np.isfinite(loss), loss, np.inf).reshape(F, D, R)
    best = L.argmin(axis=2)
    folds = [[(float(X[f, d, best[f, d], 0]), X[f, d, best[f, d], 1:].copy(), float(L[f, d, best[f, d]]))
              for d in range(D)] for f in range(F)]
    return folds[0] if masks is None else folds


def predict(fits, v: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The law's objective sum_d v_d (exp(c_d) + exp(t_d . w)) at each row w of W."""
    W = np.atleast_2d(W)
    return sum(vd * (np.exp(c) + np.exp(W @ t)) for vd, (c, t, _) in zip(v, fits))


def fit_quality(A, Y, obs, v, fits, rng, restarts: int) -> dict:
    """In-sample R^2 of the objective, and leave-one-out RMSE / Spearman: each trial predicted by the
    law refitted without it. None where undefined (constant observations or predictions)."""
    from scipy.stats import spearmanr  # scipy.stats is slow to import; only the law needs it

    n = len(A)
    ss_tot = float(np.sum((obs - obs.mean()) ** 2))
    r2 = 1.0 - float(np.sum((predict(fits, v, A) - obs) ** 2)) / ss_tot if ss_tot > 0 else None
    folds = fit_laws(A, Y, rng, restarts, masks=1.0 - np.eye(n))
    loo = np.array([predict(folds[i], v, A[i])[0] for i in range(n)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: rho is nan, reported as None
        rho = float(spearmanr(loo, obs).statistic)
    return {"loo_rmse": float(np.sqrt(np.mean((loo - obs) ** 2))), "loo_spearman": rho if np.isfinite(rho) else None,
            "r2": r2}


def propose_mixture(T: np.ndarray, v: np.ndarray, prior: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                    lam: float = KL_LAMBDA, A_ub: np.ndarray | None = None, b_ub: np.ndarray | None = None,
                    x0: np.ndarray | None = None) -> np.ndarray:
    """argmin_w sum_d v_d exp(T_d . w) + lam * KL(w || prior) s.t. sum w = 1, lower <= w <= upper,
    A_ub @ w <= b_ub."""
    eps = 1e-10
    q = np.clip(prior, eps, None)

    def f(w):
        w = np.clip(w, eps, None)
        with np.errstate(over="ignore"):
            e = np.exp(T @ w)
        val = float(v @ e + lam * np.sum(w * np.log(w / q)))
        grad = T.T @ (v * e) + lam * (np.log(w / q) + 1.0)
        return val, grad

    bounds = list(zip(np.maximum(lower, eps), np.maximum(upper, eps)))
    cons = [{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}]
    if A_ub is not None and len(A_ub):
        cons.append({"type": "ineq", "fun": lambda w: b_ub - A_ub @ w, "jac": lambda w: -A_ub})
    res = minimize(f, np.clip(q, lower, upper) if x0 is None else x0, jac=True, method="SLSQP", bounds=bounds,
                   constraints=cons, options={"maxiter": 300, "ftol": 1e-12})
    return res.x


def reference_prior(coords) -> np.ndarray:
    """The reference's KL prior: {old: 0.5, each other coordinate: 0.5 / k}; uniform without "old"."""
    k = len(coords)
    if "old" not in coords:
        return np.full(k, 1.0 / k)
    return np.array([0.5 if c == "old" else 0.5 / (k - 1) for c in coords])


class MixingLawSearcher(MixtureSearcher):
    def __init__(self, *, space, seed: int = 0, points_to_evaluate=None, n_init: int = 12,
                 restarts: int = 24, kl_lambda: float = KL_LAMBDA, prior=None,
                 objective_weights: dict[str, float] | None = None,
                 metric: str = METRIC, mode: str = MODE):
        super().__init__(space=space, seed=seed, points_to_evaluate=points_to_evaluate, metric=metric, mode=mode)
        if n_init < 2 or restarts < 1 or not kl_lambda >= 0:
            raise SearcherError(f"mixing-law n_init={n_init}, restarts={restarts}, kl_lambda={kl_lambda} "
                                "(fix: n_init >= 2, restarts >= 1, kl_lambda >= 0)")
        self.n_init, self.restarts, self.lam = int(n_init), int(restarts), float(kl_lambda)
        k = len(space.coords)
        if isinstance(prior, dict):
            prior = [prior.get(c, 0.0) for c in space.coords]
        q = reference_prior(space.coords) if prior is None else np.asarray(prior, dtype=np.float64).ravel()
        if q.shape != (k,) or not np.all(np.isfinite(q)) or np.any(q < 0) or not q.sum() > 0:
            raise SearcherError(f"mixing-law prior {np.asarray(prior).tolist()} (fix: {k} finite weights >= 0 "
                                f"over {list(space.coords)}, not all 0)")
        # Not projected onto the space: the prior says where the data is, the caps only where a can go.
        self.prior = q / q.sum()
        self.A_ub = np.asarray(getattr(space, "A_ub", np.zeros((0, k))), dtype=np.float64).reshape(-1, k)
        self.b_ub = np.asarray(getattr(space, "b_ub", np.zeros(0)), dtype=np.float64).reshape(-1)
        self._x0 = space.project(self.prior)  # a feasible start for SLSQP
        self.objective_weights = dict(objective_weights) if objective_weights else None
        self.proposals: list[dict] = []  # what the law proposed and predicted, with its fit quality

    def _targets(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """(A [n, k], Y [n, D], domains, objective [n]) from successful trials: per-domain losses when
        every trial has the objective's domains, else the objective itself as one 'domain'."""
        ok = [h for h in self.history if h["value"] is not None]
        A = np.array([h["w"] for h in ok], dtype=np.float64).reshape(-1, len(self.space.coords))
        obs = np.array([h["value"] for h in ok], dtype=np.float64)
        doms = sorted(self.objective_weights) if self.objective_weights else \
            sorted(set.intersection(*(set(h["losses"]) for h in ok))) if ok else []
        if doms and all(all(d in h["losses"] for d in doms) for h in ok):
            return A, np.array([[h["losses"][d] for d in doms] for h in ok]), doms, obs
        return A, obs[:, None], ["objective"], obs

    def _law(self, rng: np.random.Generator) -> dict | None:
        """Fit on every completed trial, solve for the proposal, measure the fit; None before n_init."""
        A, Y, doms, obs = self._targets()
        if len(A) < self.n_init:
            return None
        fits = fit_laws(A, Y, rng, self.restarts)
        ow = self.objective_weights or {}
        v = np.array([ow.get(d, 1.0) for d in doms]) if ow and doms != ["objective"] else np.ones(len(doms))
        v = v / v.sum()
        T = np.stack([t for _, t, _ in fits])
        w = propose_mixture(T, v, self.prior, self.space.lower, self.space.upper, self.lam,
                            A_ub=self.A_ub, b_ub=self.b_ub, x0=self._x0)
        w = self.space.project(w)  # the solver's tolerance can leave a bound or row off by ~1e-9
        if not (self.space.contains(w, tol=1e-6) and np.all(self.A_ub @ w <= self.b_ub + 1e-6)):
            raise SearcherError(f"mixing-law proposal {np.round(w, 6).tolist()} is off the space after "
                                f"{type(self.space).__name__}.project (fix: make the space's project return a "
                                "point its contains() and A_ub @ w <= b_ub accept)")
        quality = fit_quality(A, Y, obs, v, fits, rng, max(4, self.restarts // 3))
        return {"w": w.tolist(), "predicted": float(predict(fits, v, w)[0]), **quality, "n_fit": len(A)}

    def law_proposal(self) -> dict | None:
        """The law refitted on every completed trial: {"w", "predicted", "loo_rmse", "loo_spearman",
        "r2", "n_fit"}, or None before n_init trials completed. Depends only on (seed, history)."""
        return self._law(self.rng(len(self.history)))

    def propose(self, trial_id: str):
        rng = self.rng(self.n_suggested)
        law = self._law(rng)
        if law is None:
            return self.space.weights(self.space.sample(rng))  # the Dirichlet(1) phase
        w = np.asarray(law["w"])
        tried = [h["w"] for h in self.history] + list(self.live.values())
        repeat = any(np.abs(w - np.asarray(p)).max() < 1e-3 for p in tried)
        self.proposals.append({"trial": trial_id, **law, "used": not repeat})
        if repeat:
            return self.space.weights(self.space.sample(rng))  # nothing new to learn there: explore
        return w

    def state(self) -> dict:
        return {"proposals": self.proposals}

    def load_state(self, state: dict) -> None:
        self.proposals = list(state["proposals"])
