"""Validation of the diffusion core on a known density: a von Mises-Fisher mixture on S^{d-1}.

Train the tangent score network by denoising score matching on samples of the mixture, integrate
the reverse SDE and compare the sampled mode weights (and MMD) with the truth. Lives above
:mod:`spindiff.sphere` and :mod:`spindiff.score` because it uses both.
"""
from __future__ import annotations
import time
from dataclasses import dataclass
from typing import Any
import numpy as np
import torch
from torch import Tensor

from spindiff.sphere.vmf import sample_vmf, vmf_log_density


@dataclass
class VMFMixture:
    """Mixture sum_k w_k vMF(mu_k, kappa_k) on S^{d-1}.

    means: (K, d) unit; kappas: (K,); weights: (K,) summing to 1.
    """

    means: Tensor
    kappas: Tensor
    weights: Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x (n, d), labels (n,) int64)."""
        labels = torch.multinomial(self.weights.to(torch.float64), n, replacement=True, generator=generator)
        x = sample_vmf(self.means[labels], self.kappas[labels], generator=generator)
        return x, labels

    def log_prob(self, x: Tensor) -> Tensor:
        """log density w.r.t. surface measure. x: (B, d) -> (B,)."""
        comps = torch.stack(
            [vmf_log_density(x, self.means[k], float(self.kappas[k])) for k in range(len(self.weights))],
            dim=-1,
        )  # (B, K)
        return torch.logsumexp(comps + self.weights.to(x).log(), dim=-1)

    def score(self, x: Tensor) -> Tensor:
        """Riemannian score sum_k r_k(x) kappa_k P_x mu_k (r_k = responsibilities). (B, d)."""
        comps = torch.stack(
            [vmf_log_density(x, self.means[k], float(self.kappas[k])) for k in range(len(self.weights))],
            dim=-1,
        )  # (B, K)
        resp = torch.softmax(comps + self.weights.to(x).log(), dim=-1)  # (B, K)
        euclid = torch.einsum("bk,k,kd->bd", resp, self.kappas.to(x), self.means.to(x))
        return euclid - (euclid * x).sum(-1, keepdim=True) * x


def random_mixture(
    dim: int,
    weights: tuple[float, ...] = (0.5, 0.3, 0.2),
    kappa: float = 30.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> VMFMixture:
    """Mixture whose K <= d means are mutually orthogonal (random rotation of e_1..e_K)."""
    k = len(weights)
    if k > dim:
        raise ValueError("need K <= d for orthogonal means")
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
    means = q[:, :k].T.contiguous()  # (K, d) orthonormal rows
    w = torch.tensor(weights, dtype=torch.float64)
    return VMFMixture(means.to(dtype), torch.full((k,), float(kappa), dtype=dtype), (w / w.sum()).to(dtype))


def assign_modes(x: Tensor, means: Tensor) -> Tensor:
    """Nearest mode mean by cosine. x: (B, d), means: (K, d) -> (B,) int64."""
    return (x @ means.T).argmax(-1)


def mode_weights(x: Tensor, means: Tensor) -> Tensor:
    """Fraction of samples assigned to each mode. (K,) float64."""
    lab = assign_modes(x, means)
    return torch.bincount(lab, minlength=means.shape[0]).to(torch.float64) / x.shape[0]


def mmd2(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel exp(-|a-b|^2 / (2 h^2)).

    x: (n, d), y: (m, d). ``bandwidth=None`` uses the median pairwise distance of the pooled
    sample (median heuristic). On the sphere |a-b|^2 = 2 - 2 a.b, so this is also a cosine kernel.
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    if bandwidth is None:
        z = torch.cat([x, y])[:2000]
        bandwidth = float(torch.cdist(z, z).median())
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x).square())
    kyy = torch.exp(-gamma * torch.cdist(y, y).square())
    kxy = torch.exp(-gamma * torch.cdist(x, y).square())
    n, m = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


# ---------------------------------------------------------------------------- validation
def run_mixture_experiment(
    dim: int,
    weights: tuple[float, ...] = (0.5, 0.3, 0.2),
    kappa: float = 30.0,
    train_steps: int = 1500,
    batch_size: int = 512,
    hidden: int = 128,
    layers: int = 3,
    time_dim: int = 32,
    lr: float = 2e-3,
    n_samples: int = 4000,
    n_heldout: int = 2000,
    sample_steps: int = 200,
    method: str = "geodesic_em",
    schedule: str = "linear",
    t_eps: float = 1e-3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Fit the residual score net (eta_train = 0) on a vMF mixture, sample, and score the result.

    Returns a dict with the true weights, the recovered weights (trained and untrained nets),
    MMD^2 against held-out data for trained / untrained nets and for a second held-out set
    (the noise floor), the final training loss and wall times.
    """
    from spindiff.sphere.integrators import sample as sde_sample
    from spindiff.score.losses import dsm_loss
    from spindiff.sphere.schedules import make_schedule
    from spindiff.score.net import ResidualScoreNet, make_score_fn
    from spindiff.sphere.sde import BrownianSphereSDE

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mix = random_mixture(dim, weights, kappa, seed=seed, dtype=dtype)
    sde = BrownianSphereSDE(make_schedule(schedule, dim), t_eps=t_eps)
    net = ResidualScoreNet(dim, hidden=hidden, layers=layers, time_dim=time_dim).to(dtype)
    untrained = ResidualScoreNet(dim, hidden=hidden, layers=layers, time_dim=time_dim).to(dtype)
    untrained.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=train_steps, eta_min=lr * 0.05)
    t0 = time.perf_counter()
    losses = []
    for _ in range(train_steps):
        x0, _ = mix.sample(batch_size, generator=gen)
        loss = dsm_loss(sde, make_score_fn(net, sde), x0, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t0

    heldout, _ = mix.sample(n_heldout, generator=gen)
    heldout2, _ = mix.sample(n_heldout, generator=gen)
    out: dict[str, Any] = {
        "dim": dim,
        "true_weights": [float(w) for w in mix.weights],
        "train_s": train_s,
        "final_loss": float(np.mean(losses[-100:])),
        "mmd2_floor": mmd2(heldout2, heldout),
    }
    for name, model in (("trained", net), ("untrained", untrained)):
        t1 = time.perf_counter()
        with torch.no_grad():
            rev = sde.reverse(make_score_fn(model, sde))
            x = sde_sample(rev, n_samples, steps=sample_steps, method=method, dtype=dtype, seed=seed + 1,
                           replayable=False)
        out[f"{name}_weights"] = [float(w) for w in mode_weights(x, mix.means)]
        out[f"{name}_mmd2"] = mmd2(x, heldout)
        out[f"{name}_norm_err"] = float((x.norm(dim=-1) - 1).abs().max())
        out[f"{name}_sample_s"] = time.perf_counter() - t1
    out["max_weight_err"] = float(
        np.max(np.abs(np.array(out["trained_weights"]) - np.array(out["true_weights"])))
    )
    return out
