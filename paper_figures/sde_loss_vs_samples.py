"""Figure: loss vs samples on the noisy quadratic model, simulation vs SDE prediction, across batch sizes.

Rows: SGD (linear rule) and Adam (square-root rule with beta**kappa, eps / sqrt(kappa)); columns: rescaled by
sdebatch.LogicalBatchOptimizer vs naive (the reference hyperparameters used at every batch, rule="none").
Lines: Monte Carlo means of the real torch optimizers (bands: +-2 standard errors over replicas); dashed black:
the SDE prediction (sdebatch.sde). Runs at different batch sizes see the same sample stream.

    python -m paper_figures.sde_loss_vs_samples --out paper_figures/out

Runs only these simulations (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import matplotlib

from sdebatch.utils import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sdebatch import sde  # noqa: E402

KAPPAS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
# Okabe-Ito: cool colours below the logical batch, warm above; the reference kappa = 1 in neutral grey.
COLOURS = ("#0072B2", "#56B4E9", "#009E73", "#7F7F7F", "#E69F00", "#D55E00", "#CC79A7")
B0 = 8                                              # logical batch (samples)
H = torch.logspace(math.log10(0.2), 0.0, 8)         # curvatures 0.2 .. 1, d = 8 (as in tests/test_sde.py)
SETUPS = {
    # name: (model, reference lr, horizon in samples); noise covariance proportional to the Hessian, s = c h
    "SGD": (sde.NoisyQuadratic(H, 1.0 * H, 1.0), 0.1, 2048),
    "Adam": (sde.NoisyQuadratic(H, 50.0 * H, 1.0), 0.03, 4096),
}


def kappa_label(k: float) -> str:
    return f"1/{round(1 / k)}" if k < 1 else f"{k:g}"


def sde_curve(name: str, model: sde.NoisyQuadratic, lr: float, batch: float, grid: torch.Tensor,
              rescaled: bool, k: float) -> torch.Tensor:
    """SDE prediction of the run at batch k * B0: the rule maps every rescaled run to the kappa = 1 SDE."""
    if name == "SGD":
        return sde.sgd_sde_moments(model, lr / (B0 if rescaled else batch), grid).loss
    if rescaled:
        return sde.adam_sde_moments(model, lr, B0, grid, beta1=0.9).loss
    return sde.adam_sde_moments(model, lr, batch, grid, beta1=0.9).loss


def run(seeds: int) -> dict:
    results = {}
    for name, (model, lr, horizon) in SETUPS.items():
        grid = sde.sample_grid(horizon, 65, multiple_of=int(B0 * max(KAPPAS)))
        for rescaled in (True, False):
            for k in KAPPAS:
                b = int(B0 * k)
                if not rescaled and k == 1:   # identical to the rescaled kappa = 1 run
                    results[name, False, k] = results[name, True, k]
                    continue
                sim = sde.simulate(model, name.lower(), lr=lr, logical_batch_size=B0, batch_size=b, samples=grid,
                                   seeds=seeds, rule="auto" if rescaled else "none")
                results[name, rescaled, k] = (sim, sde_curve(name, model, lr, b, grid, rescaled, k))
    return results


def report(results: dict) -> None:
    """Per curve: max relative deviation from the kappa = 1 simulation (same samples, so little noise) and mean
    relative deviation from its own SDE prediction (each point also carries ~2.5% Monte Carlo noise at 400 replicas)."""
    for name in SETUPS:
        ref = results[name, True, 1][0].loss_mean[1:]
        for rescaled in (True, False):
            row = []
            for k in KAPPAS:
                sim, pred = results[name, rescaled, k]
                vs_ref = float(((sim.loss_mean[1:] - ref) / ref).abs().max())
                vs_sde = float(((sim.loss_mean[1:] - pred[1:]) / pred[1:]).abs().mean())
                row.append(f"{kappa_label(k)}: {vs_ref:.3f}/{vs_sde:.3f}")
            print(f"  {name:4s} {'rescaled' if rescaled else 'naive   '}  max|dev| vs kappa=1 run / mean|dev| vs SDE:  "
                  + "  ".join(row))


def plot(results: dict, out_dir: str, dpi: int) -> list[str]:
    plt.rcParams.update({"font.size": 7, "axes.titlesize": 7.5, "axes.labelsize": 7, "legend.fontsize": 6.5,
                         "xtick.labelsize": 6.5, "ytick.labelsize": 6.5, "axes.linewidth": 0.6,
                         "lines.linewidth": 1.1, "pdf.fonttype": 42})
    fig, axes = plt.subplots(2, 2, figsize=(3.5, 3.55), sharex="row", sharey="row", constrained_layout=True)
    for r, (name, (model, lr, horizon)) in enumerate(SETUPS.items()):
        rule = "linear rule" if name == "SGD" else "square-root rule"
        for c, rescaled in enumerate((True, False)):
            ax = axes[r, c]
            for k, colour in zip(KAPPAS, COLOURS):
                sim, pred = results[name, rescaled, k]
                x = sim.samples / 1000
                lo, hi = sim.loss_mean - 2 * sim.loss_se, sim.loss_mean + 2 * sim.loss_se
                ax.fill_between(x, lo, hi, color=colour, alpha=0.25, lw=0)
                ax.plot(x, sim.loss_mean, color=colour, lw=1.5 if k == 1 else 1.1,
                        label=f"$\\kappa$ = {kappa_label(k)}")
                if not rescaled or k == 1:   # one SDE curve for all rescaled runs
                    ax.plot(x, pred, color="black", ls=(0, (3, 2)), lw=0.8, zorder=4, label="SDE" if k == 1 else None)
            ax.set_yscale("log")
            ax.set_xlim(0, horizon / 1000)
            ax.grid(True, which="major", lw=0.3, alpha=0.5)
            ax.tick_params(length=2, width=0.5, pad=1.5)
            title = f"{name}, {rule}" if rescaled else f"{name}, naive (no rescaling)"
            ax.set_title(title, pad=3)
            if c == 0:
                ax.set_ylabel("expected loss")
            if r == 1:
                ax.set_xlabel("samples seen (thousands)")
            b_simple = float(sde.noise_scale(model))
            if c == 0:
                ax.text(0.97, 0.95, f"$B_L$ = {B0}, lr = {lr:g}\n$B_{{simple}}(\\theta_0)$ = {b_simple:.0f}",
                        transform=ax.transAxes, ha="right", va="top", fontsize=6)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    order = [labels.index(f"$\\kappa$ = {kappa_label(k)}") for k in KAPPAS] + [labels.index("SDE")]
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center", ncol=4,
               frameon=False, handlelength=1.6, columnspacing=1.0, handletextpad=0.4)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(out_dir, f"sde_loss_vs_samples.{ext}")
        atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=dpi))  # a reader never sees half a figure
        paths.append(path)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="paper_figures/out", help="output directory (default paper_figures/out)")
    parser.add_argument("--seeds", type=int, default=400, help="replicas per curve (default 400)")
    parser.add_argument("--dpi", type=int, default=300, help="PNG resolution (default 300)")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    t0 = time.time()
    results = run(args.seeds)
    report(results)
    paths = plot(results, args.out, args.dpi)
    print(f"wrote {', '.join(paths)} ({time.time() - t0:.0f} s, {args.seeds} replicas per curve)")


if __name__ == "__main__":
    main()
