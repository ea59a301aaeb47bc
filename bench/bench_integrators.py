"""Norm drift and step cost: torchsde's Euclidean solvers vs the geodesic integrators.

Problem: the forward Brownian motion on S^{d-1} (dimension-scaled linear schedule, T = 1),
dt = 0.01, 100 steps, the same torchsde Brownian path for every method, d = 16 and 576.
torchsde integrates the Ito form (``euler``) and the Stratonovich form (``midpoint``) of the same
SDE; the geodesic steps use the intrinsic drift (see spindiff/integrators.py).

Columns: max and mean | |S_T| - 1 | at t = 1, and a check of the law at t = 0.5 (simulated
E[S_t . S_0] vs exp(-(d-1) s(t)/2); the batch shares one path, so expect a few 1/sqrt(B d) of noise).
Then the cost of one isolated step (same batch, d, precomputed dW): geodesic EM vs torchsde's
Euler update y + f dt + g_prod(dW), with the ratio (target <= 1.5); and the same with the Brownian
increment queried from a BrownianInterval (torchsde's own ``Euler.step`` vs geodesic EM + query).
Times are CPU seconds of this process (min over repeats), which a shared machine distorts less
than wall time. Last, the spin sampler's per-token SDE (PosteriorReverseSDE over 512 candidates on
the shipped grid) with its shipped noise (GaussianIncrements) vs torchsde's BrownianInterval, and
with geoopt's exponential map vs the hand-fused one it replaced.

Usage: python bench/bench_integrators.py [--quick] [--batch B] [--dtype float32|float64]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchsde

from spindiff.sphere.integrators import get_integrator, integrate, make_brownian
from spindiff.sphere.schedules import make_schedule
from spindiff.sphere.sde import BrownianSphereSDE


def _time_it(fn, repeat: int, inner: int) -> float:
    """Minimum over ``repeat`` runs of the mean CPU time (this process) of ``inner`` calls, in
    seconds: the least disturbed estimate on a shared machine (run with --threads 1)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(inner):
            fn()
        times.append((time.process_time() - t0) / inner)
    return min(times)


def drift_table(dims: list[int], batch: int, dtype: torch.dtype, steps: int = 100, dt: float = 0.01) -> list[dict]:
    rows = []
    for d in dims:
        gen = torch.Generator().manual_seed(0)
        sched = make_schedule("linear", d)
        sde_ito = BrownianSphereSDE(sched, sde_type="ito")
        sde_str = BrownianSphereSDE(sched, sde_type="stratonovich")
        s0 = sde_ito.prior_sampling(batch, dtype=dtype, generator=gen)
        T = steps * dt
        ts = torch.linspace(0.0, T, steps + 1, dtype=torch.float64)
        half = steps // 2
        law = float(sched.mean_cosine(float(ts[half])))
        runs = {
            "torchsde euler (Ito)": lambda bm: torchsde.sdeint(sde_ito, s0, ts.to(dtype), bm=bm, method="euler", dt=dt),
            "torchsde midpoint (Strat.)": lambda bm: torchsde.sdeint(sde_str, s0, ts.to(dtype), bm=bm, method="midpoint", dt=dt),
            "geodesic_em": lambda bm: integrate(sde_ito, s0, ts, "geodesic_em", bm=bm, return_path=True),
            "geodesic_midpoint": lambda bm: integrate(sde_str, s0, ts, "geodesic_midpoint", bm=bm, return_path=True),
            "geodesic_heun": lambda bm: integrate(sde_str, s0, ts, "geodesic_heun", bm=bm, return_path=True),
        }
        for name, run in runs.items():
            bm = make_brownian(batch, d, 0.0, T, dtype, seed=1)
            path = run(bm)  # (steps + 1, B, d)
            err = (path[-1].norm(dim=-1) - 1).abs()
            cos_half = float((path[half] * s0).sum(-1).mean() / (path[half].norm(dim=-1).mean()))
            rows.append({"d": d, "method": name, "max_norm_err": float(err.max()), "mean_norm_err": float(err.mean()),
                         "cos_t05": cos_half, "law_t05": law})
    return rows


def step_cost(dims: list[int], batch: int, dtype: torch.dtype, repeat: int, inner: int) -> list[dict]:
    rows = []
    for d in dims:
        gen = torch.Generator().manual_seed(0)
        sde = BrownianSphereSDE(make_schedule("linear", d))
        y = sde.prior_sampling(batch, dtype=dtype, generator=gen)
        dw = 0.1 * torch.randn(batch, d, dtype=dtype, generator=gen)
        t0, t1 = torch.tensor(0.3, dtype=dtype), torch.tensor(0.31, dtype=dtype)
        h = float(t1 - t0)
        step = get_integrator("geodesic_em")

        def euler() -> torch.Tensor:  # torchsde's Euler.step body: y + f dt + g_prod
            f, gp = sde.f(t0, y), sde.g_prod(t0, y, dw)
            return y + f * h + gp

        solver_sde = torchsde._core.base_sde.ForwardSDE(sde)  # what sdeint wraps the SDE in
        bm = make_brownian(batch, d, 0.0, 1.0, dtype, seed=0)
        solver = torchsde._core.methods.select(method="euler", sde_type="ito")(
            sde=solver_sde, bm=bm, dt=h, adaptive=False, rtol=0.0, atol=0.0, dt_min=1e-5, options={})

        def torchsde_step() -> torch.Tensor:
            return solver.step(t0, t1, y, ())[0]

        def geodesic() -> torch.Tensor:
            return step(sde, float(t0), float(t1), y, dw)

        def geodesic_with_bm() -> torch.Tensor:
            return step(sde, float(t0), float(t1), y, bm(t0, t1))

        te = _time_it(euler, repeat, inner)
        ts_ = _time_it(torchsde_step, repeat, inner)
        tg = _time_it(geodesic, repeat, inner)
        tgb = _time_it(geodesic_with_bm, repeat, inner)
        rows.append({"d": d, "batch": batch, "euler_us": 1e6 * te, "torchsde_step_us": 1e6 * ts_,
                     "geodesic_us": 1e6 * tg, "geodesic_bm_us": 1e6 * tgb,
                     "ratio_vs_euler_update": tg / te, "ratio_vs_torchsde_step": tgb / ts_})
    return rows


def _fused_expmap(spin: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The hand-fused exponential map the sampler used before geoopt's (reference for the timing only):
    S cos|u| + u sinc|u|, renormalised."""
    norm = u.norm(dim=-1, keepdim=True)
    sinc = torch.where(norm > 1e-3, torch.sin(norm) / norm.clamp_min(1e-3), 1.0 - norm * norm / 6.0)
    out = torch.addcmul(spin * torch.cos(norm), u, sinc)
    return out / out.norm(dim=-1, keepdim=True)


def sampler_cost(batch: int, dtype: torch.dtype, repeat: int, inner: int, K: int = 512, d: int = 576) -> dict:
    """CPU time of the spin sampler's per-token SDE (PosteriorReverseSDE over K candidates, the shipped
    grid and steps) with geoopt's expmap and GaussianIncrements (shipped), with torchsde's
    BrownianInterval instead, and with the hand-fused expmap instead: the costs of issue 19's choices."""
    from spindiff.config import compose
    from spindiff.score.posterior import CandidatePosterior
    from spindiff.score.reverse import PosteriorReverseSDE, integrate_posterior
    from spindiff.sphere.grids import reverse_grid

    cfg = compose("sample", [])
    sde = BrownianSphereSDE.from_config(cfg.sde, d)
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(K, d, generator=gen, dtype=dtype), dim=-1)
    post = CandidatePosterior(torch.randn(batch, K, generator=gen, dtype=dtype), table,
                              torch.arange(K).expand(batch, K), torch.zeros(batch, dtype=dtype))
    grid = reverse_grid(sde, int(cfg.sampler.steps), str(cfg.sampler.grid), end_kappa=cfg.sampler.exit_kappa)
    rev = PosteriorReverseSDE(sde, post, 1)
    geo = sde.geometry

    def run(brownian: str) -> None:
        integrate_posterior(rev, grid, str(cfg.sampler.method), gen, brownian=brownian)

    shipped = _time_it(lambda: run("increments"), repeat, inner)
    interval = _time_it(lambda: run("interval"), repeat, inner)
    geo.expmap = _fused_expmap  # instance attribute: this geometry only
    try:
        fused = _time_it(lambda: run("increments"), repeat, inner)
    finally:
        del geo.expmap
    return {"batch": batch, "K": K, "d": d, "steps": len(grid) - 1, "shipped_ms": 1e3 * shipped,
            "interval_ms": 1e3 * interval, "fused_ms": 1e3 * fused,
            "interval_over_shipped": interval / shipped, "shipped_over_fused": shipped / fused}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batch and fewer timing repeats")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    batch = args.batch or (64 if args.quick else 256)
    repeat, inner = (5, 20) if args.quick else (15, 50)
    dims = [16, 576]

    print(f"# norm drift after 100 steps of dt = 0.01 (batch {batch}, {args.dtype}); law at t=0.5: "
          "E[S_t.S_0] = exp(-(d-1)s/2)")
    print(f"{'d':>4}  {'method':<28}{'max||S|-1|':>12}{'mean||S|-1|':>13}{'E[S.S0] t=.5':>14}{'law':>9}")
    for r in drift_table(dims, batch, dtype):
        print(f"{r['d']:>4}  {r['method']:<28}{r['max_norm_err']:>12.2e}{r['mean_norm_err']:>13.2e}"
              f"{r['cos_t05']:>14.4f}{r['law_t05']:>9.4f}")
    print()
    print(f"# cost of one step (batch {batch}, {args.dtype}, {args.threads} threads, min of {repeat}x{inner})")
    print(f"{'d':>4}{'Euler update us':>17}{'geodesic EM us':>16}{'ratio':>7}   "
          f"{'torchsde Euler.step us':>23}{'geodesic EM + bm us':>21}{'ratio':>7}")
    for r in step_cost(dims, batch, dtype, repeat, inner):
        print(f"{r['d']:>4}{r['euler_us']:>17.1f}{r['geodesic_us']:>16.1f}{r['ratio_vs_euler_update']:>7.2f}   "
              f"{r['torchsde_step_us']:>23.1f}{r['geodesic_bm_us']:>21.1f}{r['ratio_vs_torchsde_step']:>7.2f}")
    print("target: geodesic step <= 1.5x torchsde's Euler step")
    print()
    print(f"# the spin sampler's per-token SDE (K = 512 candidates, shipped grid/steps, {args.dtype}, CPU ms, "
          f"min of {repeat}x{max(1, inner // 10)})")
    print(f"{'batch':>6}{'shipped (geoopt expmap, GaussianIncrements)':>46}{'BrownianInterval':>18}{'ratio':>7}"
          f"{'fused expmap':>14}{'geoopt/fused':>14}")
    for bs in (1, 8, 64):
        r = sampler_cost(bs, dtype, repeat, max(1, inner // 10))
        print(f"{bs:>6}{r['shipped_ms']:>46.2f}{r['interval_ms']:>18.2f}{r['interval_over_shipped']:>7.2f}"
              f"{r['fused_ms']:>14.2f}{r['shipped_over_fused']:>14.2f}")


if __name__ == "__main__":
    main()
