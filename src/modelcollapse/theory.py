"""Closed forms from the paper's §3 (Theorems 1 and 2, and the "halfway" control).

With c = σ²d / (T − d − 1), the expected test error E‖ŵ_n − w*‖² after n iterations (n = 1: real data) is
- replace (Theorem 1, from Dohmatob et al. 2024): c · n
- accumulate (Theorem 2): c · Σ_{i≤n} 1/i², bounded by c · π²/6
- replace-grown (synthetic only, n·T samples at iteration n): c · Σ_{i≤n} 1/i
"""

from __future__ import annotations

import math

import numpy as np

from modelcollapse.errors import BadInput

LINREG_POLICIES = ("replace", "accumulate", "replace-grown")


def linreg_c(d: int, T: int, sigma2: float) -> float:
    if T < d + 2:
        raise BadInput(f"T must be at least d + 2 = {d + 2} for a finite test error (T={T}, d={d})")
    if d < 1 or sigma2 <= 0:
        raise BadInput(f"need d >= 1 and sigma2 > 0 (d={d}, sigma2={sigma2})")
    return sigma2 * d / (T - d - 1)


def linreg_test_error(policy: str, d: int, T: int, sigma2: float, iterations: int) -> np.ndarray:
    """E‖ŵ_n − w*‖² for n = 1..iterations."""
    if iterations < 1:
        raise BadInput(f"iterations must be at least 1 (got {iterations})")
    c = linreg_c(d, T, sigma2)
    n = np.arange(1, iterations + 1, dtype=float)
    if policy == "replace":
        return c * n
    if policy == "accumulate":
        return c * np.cumsum(1.0 / n**2)
    if policy == "replace-grown":
        return c * np.cumsum(1.0 / n)
    raise BadInput(f"no closed form for policy {policy!r}; choose one of {', '.join(LINREG_POLICIES)}")


def linreg_accumulate_bound(d: int, T: int, sigma2: float) -> float:
    return linreg_c(d, T, sigma2) * math.pi**2 / 6


# -- second moments under every policy: the Gaussian's trace and mean, the categorical's Gini–Simpson --------
#
# Fit the mean and SS/(N − ddof) (SS the scatter about the mean) to N points, sample from the fit, repeat.
# Only two facts about the sampler enter: a set of s points drawn from a fit of mean μ and covariance Σ has
# mean ~ (μ, Σ/s) and E SS = (s − 1)Σ; and a simple random subsample of m of N points has E SS_sub =
# (m − 1)/(N − 1)·SS and a mean with E‖mean_sub − mean‖² = (1/m − 1/N)·tr SS/(N − 1). So the recursions hold
# for any distribution refit by its moments — a Gaussian, and a categorical seen as one-hot vectors, whose MLE
# covariance has trace 1 − Σp̂² (its Gini–Simpson index). docs/theory.md derives each line.

SECOND_MOMENT_POLICIES = ("replace", "replace-grown", "accumulate", "accumulate-subsample", "mix", "fresh")


def second_moments(policy, n: int, iterations: int, ddof: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(E tr Σ_t / tr Σ_0, E‖μ_t − μ_0‖² / tr Σ_0) for t = 1..iterations under `policy` (a Policy), real data
    n i.i.d. points; None for a policy this module has no recursion for."""
    if policy.name not in SECOND_MOMENT_POLICIES:
        return None
    T, M = np.empty(iterations), np.empty(iterations)
    T[0], M[0] = (n - 1) / (n - ddof), 1 / n  # generation 1: the fit on real data
    C = 1 / n  # mix: E⟨μ_t − μ_0, mean of the real data − μ_0⟩ / tr Σ_0
    Q, D = n - 1.0, 1 / n  # accumulate(-subsample): E tr SS of the pool and E‖pool mean − μ_0‖², / tr Σ_0
    for t in range(2, iterations + 1):
        Tp, Mp = T[t - 2], M[t - 2]
        if policy.name in ("replace", "replace-grown"):  # s points from the last fit
            s = policy.synthetic_size(t, n)
            T[t - 1], M[t - 1] = Tp * (s - 1) / (s - ddof), Mp + Tp / s
        elif policy.name in ("mix", "fresh"):  # m real points (a subsample of the real data, or fresh) and s synthetic
            m = policy.real_part(n)
            s = n - m
            shared = C if policy.name == "mix" else 0.0  # the fresh part is independent of the past
            cross = 0.0 if m == 0 or s == 0 else m * s / n * (1 / m + Mp - 2 * shared + Tp / s)
            T[t - 1] = (max(m - 1, 0) + max(s - 1, 0) * Tp + cross) / (n - ddof)
            M[t - 1] = m / n**2 + (s / n) ** 2 * Mp + s / n**2 * Tp + 2 * m * s / n**2 * shared
            C = m / n**2 + s / n * C
        else:  # the pool of (t − 1)·n points grows by n points from the last fit
            N0, N = (t - 1) * n, t * n
            Q = Q + (n - 1) * Tp + N0 * n / N * (Tp / n + Mp - D)
            D = (N0**2 * D + 2 * N0 * n * D + n**2 * (Tp / n + Mp)) / N**2
            if policy.name == "accumulate":
                T[t - 1], M[t - 1] = Q / (N - ddof), D
            else:  # a subsample of n of the pool
                T[t - 1], M[t - 1] = (n - 1) / (N - 1) * Q / (n - ddof), D + (1 / n - 1 / N) * Q / (N - 1)
    return T, M


# -- the Wishart chain: a Gaussian refit, each generation, on one sample of the previous fit ------------------


def wishart_chain(policy, d: int, n: int, iterations: int, ddof: int = 0) -> dict[str, np.ndarray] | None:
    """E det Σ_t / det Σ_0 and E KL(N_0 ‖ N_t) for policies whose generation t trains on s_t points of the
    last fit alone (replace, replace-grown); None otherwise. KL is left out where its expectation is infinite
    (some s_t ≤ d + 2: E tr Σ_t⁻¹ diverges)."""
    from scipy.special import digamma

    if policy.name not in ("replace", "replace-grown"):
        return None
    sizes = [n] + [policy.synthetic_size(t, n) for t in range(2, iterations + 1)]
    i = np.arange(1, d + 1)
    det, logdet, trinv, q = [], [], [], []
    r_det, r_log, r_inv, r_q = 1.0, 0.0, float(d), 0.0
    for s in sizes:  # Σ_t = L_{t−1} W L_{t−1}ᵀ / (s − ddof), W ~ Wishart_d(s − 1, I)
        r_det *= float(np.prod((s - i) / (s - ddof)))
        r_log += float(np.sum(digamma((s - i) / 2))) + d * math.log(2) - d * math.log(s - ddof)
        c = (s - ddof) / (s - d - 2) if s > d + 2 else math.inf  # E[Σ_t⁻¹ | past] = c Σ_{t−1}⁻¹
        r_inv, r_q = r_inv * c, c * (r_q + d / s)  # the mean moves by N(0, Σ_{t−1}/s), independent of W
        det.append(r_det), logdet.append(r_log), trinv.append(r_inv), q.append(r_q)
    out = {"det_ratio": np.array(det)}
    if all(s > d + 2 for s in sizes):
        out["kl"] = 0.5 * (np.array(trinv) + np.array(q) - d + np.array(logdet))
    return out


# -- the categorical family: each outcome's count is a Markov chain of its own --------------------------------
#
# Refitting frequencies (c + α)/(N + Kα) and drawing from them, outcome i's count in the next sample is
# Binomial(s, its fitted probability), whatever the other outcomes do: so the distribution of one outcome's
# count, propagated generation by generation, gives the exact expectation of any sum over outcomes of a
# function of that outcome's fit (entropy, Gini–Simpson, lost, tail mass, TV, KL). The state is the count in
# the training set (replace, fresh), the count in the pool (accumulate, accumulate-subsample: n + 1 to t·n + 1
# states) or the pair (real count, training count) (mix).

CHAIN_BUDGET = 1.5e9  # the cost `chain_cost` estimates, a few seconds; larger settings get no chain curves
CATEGORICAL_METRICS = ("entropy", "gini_simpson", "lost", "tail_mass", "tv", "kl", "reward")


def _binom_rows(N: int, q: np.ndarray) -> np.ndarray:
    """Binomial(N, q_c) over 0..N for each q_c: (len(q), N + 1)."""
    from scipy.stats import binom

    return binom.pmf(np.arange(N + 1)[None, :], N, np.asarray(q, dtype=float)[:, None])


def _hyper_rows(total: int, successes: np.ndarray, draws: int) -> np.ndarray:
    """Hypergeometric: successes among `draws` of `total` without replacement, for each number of successes
    in the population: (len(successes), draws + 1). From a table of log-factorials (scipy's pmf is ~100×
    slower, and accumulate-subsample needs t·n·n of them per generation)."""
    from scipy.special import gammaln

    lf = gammaln(np.arange(total + 2, dtype=float))  # lf[k] = log (k − 1)!

    def log_choose(a, b):
        return lf[a + 1] - lf[b + 1] - lf[a - b + 1]

    K, c = np.asarray(successes)[:, None], np.arange(draws + 1)[None, :]
    ok = (c <= K) & (draws - c <= total - K)
    c_ok = np.where(ok, c, 0)  # any valid pair where the probability is 0 anyway
    K_ok = np.where(ok, K, 0)
    log = log_choose(K_ok, c_ok) + log_choose(total - K_ok, draws - c_ok) - log_choose(total, draws)
    return np.where(ok, np.exp(np.where(ok, log, -np.inf)), 0.0)


def _add_shifted(Z: np.ndarray, H: np.ndarray) -> np.ndarray:
    """out[..., h + y] = Σ Z[..., y] H[..., h]: the distribution of the sum of two independent counts."""
    out = np.zeros(Z.shape[:-1] + (Z.shape[-1] + H.shape[-1] - 1,))
    for h in range(H.shape[-1]):
        out[..., h : h + Z.shape[-1]] += Z * H[..., h : h + 1]
    return out


def chain_cost(policy, n: int, groups: int, iterations: int) -> float | None:
    """Multiply-adds `categorical_chain` takes (about; building a binomial row counts ~20), or None for a
    policy it has no chain for. Chains whose
    steps do not depend on the outcome run from each of the n + 1 real counts when that is fewer rows than
    the outcomes' distributions."""
    t, rows = iterations, min(groups, n + 1)
    if policy.name == "replace":
        return t * (rows + 2) * (n + 1) ** 2
    if policy.name == "fresh":
        return t * (groups + 2) * (n + 1) ** 2
    if policy.name == "mix":
        return t * ((n + 1) ** 3 + groups * (n + 1) ** 2)
    if policy.name == "accumulate":
        return t**2 * (n + 1) ** 2 * (rows + 20) / 2
    if policy.name == "accumulate-subsample":  # its n³ term is a matrix product, ~8× cheaper per multiply-add
        return t**2 * (n + 1) ** 2 * (n / 8 + rows + 40) / 2
    if policy.name == "replace-grown":
        return t**3 * (n + 1) ** 2 * (rows + 20) / 3
    return None


def _training_counts(policy, p: np.ndarray, n: int, alpha: float, K: int, iterations: int):
    """Yield, for t = 1..iterations, (D, N): D[g, c] = P(outcome g's count in generation t's training set is
    c), N the training set's size."""
    real = _binom_rows(n, p)  # generation 1: the real counts
    yield real, n
    name = policy.name
    # every policy but fresh steps alike for every outcome: then run from each real count (rows of the
    # identity) when there are fewer of those than outcomes, and mix in the real counts' distribution after
    D = real if name == "fresh" or len(p) <= n + 1 else np.eye(n + 1)
    out = (lambda X: X) if D is real else (lambda X: real @ X)
    if name in ("replace", "replace-grown"):
        N = n
        for t in range(2, iterations + 1):
            s = policy.synthetic_size(t, n)
            D = D @ _binom_rows(s, (np.arange(N + 1) + alpha) / (N + K * alpha))
            N = s
            yield out(D), N
    elif name == "fresh":
        m = policy.real_part(n)
        B, fresh = _binom_rows(n - m, (np.arange(n + 1) + alpha) / (n + K * alpha)), _binom_rows(m, p)
        for _ in range(2, iterations + 1):
            D = _add_shifted(D @ B, fresh)
            yield D, n
    elif name == "mix":
        m = policy.real_part(n)
        B = _binom_rows(n - m, (np.arange(n + 1) + alpha) / (n + K * alpha))
        H = _hyper_rows(n, np.arange(n + 1), m)  # the real subsample's count, given the real count R
        F = np.eye(n + 1)  # F[R, c]: P(training count c | real count R); generation 1 trains on the real data
        for _ in range(2, iterations + 1):
            F = _add_shifted(F @ B, H)
            yield real @ F, n
    else:  # accumulate, accumulate-subsample: the state is the count in the pool of t·n
        for t in range(2, iterations + 1):
            N0 = (t - 1) * n
            if name == "accumulate":
                Y = _binom_rows(n, (np.arange(N0 + 1) + alpha) / (N0 + K * alpha))  # (N0 + 1, n + 1)
            else:
                sub = _hyper_rows(N0, np.arange(N0 + 1), n)  # generation t − 1's training count, given the pool's
                Y = sub @ _binom_rows(n, (np.arange(n + 1) + alpha) / (n + K * alpha))
            pool = np.zeros((D.shape[0], N0 + n + 1))
            for y in range(n + 1):  # the pool gains y of this outcome with probability Y[C, y]
                pool[:, y : y + N0 + 1] += D * Y[:, y]
            D = pool
            if name == "accumulate":
                yield out(D), t * n
            else:
                yield out(D) @ _hyper_rows(t * n, np.arange(t * n + 1), n), n


def categorical_chain(policy, p0: np.ndarray, tail: np.ndarray, n: int, alpha: float, iterations: int,
                      budget: float = CHAIN_BUDGET, reward: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """The exact expectation per iteration of each of CATEGORICAL_METRICS, for the truth `p0` (K,), `tail`
    (K,) marking the outcomes of its last 10% of mass, `reward` (K,) each outcome's reward (default 0), n
    draws per generation and additive smoothing α. None for a policy without a chain, or one whose chain
    would cost more than `budget` multiply-adds."""
    p0 = np.asarray(p0, dtype=float)
    K = len(p0)
    reward = np.zeros(K) if reward is None else np.asarray(reward, dtype=float)
    keys, group, weight = np.unique(np.stack([p0, np.asarray(tail, dtype=float)], axis=1), axis=0, return_inverse=True, return_counts=True)
    p, in_tail = keys[:, 0], keys[:, 1]  # outcomes alike in probability and tail share one chain
    r = np.bincount(group.ravel(), weights=reward, minlength=len(p)) / weight  # a group's mean reward: E p̂ is alike within it
    cost = chain_cost(policy, n, len(p), iterations)
    if cost is None or cost > budget:
        return None
    out = {k: np.empty(iterations) for k in CATEGORICAL_METRICS}
    for t, (D, N) in enumerate(_training_counts(policy, p, n, alpha, K, iterations)):
        q = (np.arange(N + 1) + alpha) / (N + K * alpha)  # the fitted probability of a count
        with np.errstate(divide="ignore", invalid="ignore"):
            qlogq = np.where(q > 0, q * np.log(q), 0.0)
        Eq = D @ q  # (G,)
        out["entropy"][t] = -weight @ (D @ qlogq)
        out["gini_simpson"][t] = 1 - weight @ (D @ q**2)
        out["lost"][t] = weight @ (D @ (q == 0))
        out["tail_mass"][t] = weight @ (in_tail * Eq)
        out["tv"][t] = 0.5 * weight @ np.einsum("gc,gc->g", D, np.abs(q[None, :] - p[:, None]))
        out["kl"][t] = weight @ (D @ qlogq) - weight @ (Eq * np.log(p))
        out["reward"][t] = weight @ (r * Eq)
    return out


def family_curves(family: str, policy: dict, options: dict, iterations: int):
    """(config, policy, {metric: curve}) of a family's `theory` for the command line; BadInput naming the
    problem (a bad option, a policy without a closed form)."""
    from pydantic import ValidationError

    from modelcollapse.families import load_family
    from modelcollapse.policies import from_spec

    if iterations < 1:
        raise BadInput(f"iterations must be at least 1 (got {iterations})")
    spec = load_family(family)

    def one_line(err: ValidationError, what: str) -> str:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        return f"theory {family}: {what}{': ' + loc if loc else ''}: {e['msg'].removeprefix('Value error, ')}"

    try:
        config = spec.Config(**options)
    except ValidationError as e:
        raise BadInput(one_line(e, "bad option")) from None
    try:
        policy = from_spec(policy)
    except ValidationError as e:
        raise BadInput(one_line(e, f"policy {policy['name']}")) from None
    except ValueError as e:
        raise BadInput(f"theory {family}: {e}") from None
    curves = spec.theory(config, policy, iterations) if spec.theory else None
    if not curves:
        raise BadInput(f"theory {family}: no exact curve for policy {policy.label!r} at these settings (docs/theory.md says where there are)")
    return config, policy, curves
