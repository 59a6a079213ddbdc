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
    n i.i.d. points; None for a policy this module has no recursion for. A `real_weight` w on the policy
    (weighted moments: the real points' share of the fit) has one under mix and fresh, and changes nothing
    where no training set has both kinds (replace, replace-grown); accumulate(-subsample) has none."""
    if policy.name not in SECOND_MOMENT_POLICIES or policy.select is not None:
        return None
    if policy.real_weight is not None and policy.name in ("accumulate", "accumulate-subsample"):
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
            # a: the real points' share of the fit, m/n unless weighted (where there are both kinds)
            a = policy.real_weight if policy.real_weight is not None and m and s else m / n
            shared = C if policy.name == "mix" else 0.0  # the fresh part is independent of the past
            real = a * (m - 1) / m if m else 0.0  # E tr SS_r / m, and of the synthetic part likewise
            synthetic = (1 - a) * (s - 1) / s * Tp if s else 0.0
            cross = a * (1 - a) * (1 / m + Mp - 2 * shared + Tp / s) if m and s else 0.0  # E‖x̄_r − x̄_s‖²
            c = 1 - ddof * ((a**2 / m if m else 0.0) + ((1 - a) ** 2 / s if s else 0.0))  # the unbiased estimator's
            T[t - 1] = (real + synthetic + cross) / c
            M[t - 1] = (a**2 / m if m else 0.0) + (1 - a) ** 2 * (Mp + (Tp / s if s else 0.0)) + 2 * a * (1 - a) * shared
            C = a / n + (1 - a) * C
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


# -- curation: a categorical refit to draws each chosen among k candidates by a reward (Ferbach et al. 2024) --
#
# Each kept draw is one of k i.i.d. candidates from the fit p̂, candidate c chosen with probability
# exp(r_c/τ) / Σ exp(r/τ) (the k-choice selector, Gumbel-max). Outcome i is kept with probability
#     q_i(p̂) = k p̂_i v_i E[1 / (v_i + V_2 + … + V_k)] = k p̂_i v_i ∫₀^∞ e^{−v_i t} (Σ_j p̂_j e^{−v_j t})^{k−1} dt,
# v = e^{r/τ}, V_c the v of candidate c (1/x = ∫₀^∞ e^{−xt} dt); as k → ∞, q → p̂ v / (p̂·v). A kept set of s
# draws is Multinomial(s, q(p̂)): E[p̂_{t+1} | p̂_t] = q(p̂_t), a nonlinear map, so the expected curve is not q
# iterated from p (that is the mean-field approximation, `curation_mean_field`). It is exact over the
# distribution of the whole count vector, a Markov chain on the C(n + K − 1, K − 1) count vectors
# (`curation_chain`), for small K and n.

CURATION_BUDGET = 3e8  # multiply-adds of the count-vector chain (a few seconds)


def choice_probs(p: np.ndarray, reward: np.ndarray, k: int, temperature: float = 1.0) -> np.ndarray:
    """q(p): the probability that a k-choice selector keeps each outcome, for each row of p (..., K)."""
    from scipy.integrate import quad_vec

    p = np.asarray(p, dtype=float)
    P = p.reshape(-1, p.shape[-1])
    v = np.exp((np.asarray(reward, dtype=float) - np.max(reward)) / temperature)  # (K,), largest 1

    def integrand(t):
        e = np.exp(-v * t)
        return e[None, :] * ((P @ e) ** (k - 1))[:, None]

    total, _ = quad_vec(integrand, 0, np.inf, epsabs=1e-14, epsrel=1e-12)
    q = k * P * v * total
    return (q / q.sum(axis=1, keepdims=True)).reshape(p.shape)  # the sum is 1 up to quadrature error, ~1e-12


def curation_mean_field(p0: np.ndarray, reward: np.ndarray, k: int, temperature: float, iterations: int) -> np.ndarray:
    """p_t for t = 1..iterations with p_1 = p0 and p_{t+1} = q(p_t): the curve without sampling noise (an
    APPROXIMATION of the expected fit, whose map is nonlinear; exact as n → ∞). (iterations, K)."""
    out = [np.asarray(p0, dtype=float)]
    for _ in range(iterations - 1):
        out.append(choice_probs(out[-1], reward, k, temperature))
    return np.array(out)


def count_vectors(n: int, K: int) -> np.ndarray:
    """Every vector of K non-negative counts summing to n (stars and bars): (C(n + K − 1, K − 1), K)."""
    import itertools

    bars = np.array(list(itertools.combinations(range(n + K - 1), K - 1)), dtype=np.int64).reshape(-1, K - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), n + K - 1)], axis=1)
    return np.diff(edges, axis=1) - 1


def multinomial_rows(s: int, q: np.ndarray, states: np.ndarray) -> np.ndarray:
    """P(counts = states[j]) under Multinomial(s, q[i]) for each row q[i]: (len(q), len(states))."""
    from scipy.special import gammaln

    logq = np.where(q > 0, np.log(np.where(q > 0, q, 1.0)), -1e4)  # a count on an impossible outcome: probability 0
    log = gammaln(s + 1) - gammaln(states + 1).sum(1)[None, :] + logq @ states.T
    return np.exp(log)


def curation_cost(policy, n: int, K: int) -> float | None:
    from math import comb

    M = comb(n + K - 1, K - 1)
    if policy.name == "replace":
        return M * M * K
    if policy.name == "fresh":
        m = policy.real_part(n)
        return M * comb(n - m + K - 1, K - 1) * (comb(m + K - 1, K - 1) + K)
    return None


def curation_chain(policy, p0: np.ndarray, tail: np.ndarray, reward: np.ndarray, n: int, alpha: float, k: int,
                   temperature: float, iterations: int, budget: float = CURATION_BUDGET) -> dict[str, np.ndarray] | None:
    """The exact expectation per iteration of each of CATEGORICAL_METRICS when every synthetic set is kept by
    a k-choice selector on the reward: the distribution of the training count vector, propagated. For
    replace and fresh (the real part a fresh Multinomial(m, p0)); None for other policies or above `budget`."""
    p0, reward, tail = np.asarray(p0, dtype=float), np.asarray(reward, dtype=float), np.asarray(tail, dtype=bool)
    K = len(p0)
    cost = curation_cost(policy, n, K)
    if cost is None or cost > budget:
        return None
    states = count_vectors(n, K)
    index = {tuple(c): i for i, c in enumerate(states)}
    fits = (states + alpha) / (n + K * alpha)  # p̂ of each state
    q = choice_probs(fits, reward, k, temperature)
    if policy.name == "replace":
        step = multinomial_rows(n, q, states)
    else:  # s kept draws plus m fresh real draws, added count vector by count vector
        m = policy.real_part(n)
        small, real = count_vectors(n - m, K), count_vectors(m, K)
        kept = multinomial_rows(n - m, q, small)  # (M, M_s)
        fresh = multinomial_rows(m, p0[None, :], real)[0]  # (M_m,)
        step = np.zeros((len(states), len(states)))
        for a, pa in zip(real, fresh):
            target = np.array([index[tuple(b + a)] for b in small])
            step[:, target] += pa * kept
    D = multinomial_rows(n, p0[None, :], states)[0]  # generation 1: the real counts
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(fits > 0, fits * np.log(np.where(fits > 0, fits, 1.0)), 0.0).sum(1)
    per_state = {
        "entropy": -plogp, "gini_simpson": 1 - (fits**2).sum(1), "lost": (fits == 0).sum(1).astype(float),
        "tail_mass": fits @ tail.astype(float), "tv": 0.5 * np.abs(fits - p0).sum(1), "kl": plogp - fits @ np.log(p0),
        "reward": fits @ reward,
    }
    out = {key: np.empty(iterations) for key in CATEGORICAL_METRICS}
    for t in range(iterations):
        for key, values in per_state.items():
            out[key][t] = D @ values
        D = D @ step
    return out
