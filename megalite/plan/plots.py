"""Pictures for `--plot FILE.png`: isoFLOP curves and memory breakdown bars (matplotlib, Agg).

matplotlib is imported here only, when a picture is asked for: it takes about a second to load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from megalite.plan.gpus import GIB
from megalite.plan.scaling import isoflop_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def isoflop_plot(
    path: str,
    *,
    fit: str,
    budgets: Sequence[float],
    optima: Sequence[tuple[float, float]],
    models: Sequence[tuple[float, float, str]] = (),
) -> None:
    """Loss against parameters for each compute budget (C = 6ND), each optimum marked.

    `optima` are the (params, loss) points of the chosen method, one per budget; `models` are
    (params, loss, name) of given models, drawn as crosses.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for budget, (n_opt, loss_opt) in zip(budgets, optima, strict=True):
        lo, hi = math.log10(n_opt) - 1.5, math.log10(n_opt) + 1.5
        params = [10 ** (lo + (hi - lo) * i / 199) for i in range(200)]
        line = ax.plot(params, isoflop_curve(fit, budget, params), label=f"C = {budget:.1e}")[0]
        ax.plot([n_opt], [loss_opt], "o", color=line.get_color())
        ax.annotate(f"{n_opt:.2g}", (n_opt, loss_opt), textcoords="offset points", xytext=(0, 6))
    for n, loss, name in models:
        ax.plot([n], [loss], "kx")
        ax.annotate(name, (n, loss), textcoords="offset points", xytext=(4, -12))
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(f"predicted loss ({fit} fit)")
    ax.set_title("IsoFLOP curves, optimum marked")
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_plot(path: str, **figure: Any) -> None:
    """`memory_figure(**figure)` saved to `path`."""
    plt = _pyplot()
    fig = memory_figure(**figure)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def memory_figure(
    *,
    labels: Sequence[str],
    parts: Sequence[dict[str, float]],
    usable_bytes: float,
    title: str,
) -> Figure:
    """One stacked bar per entry of `parts` (name -> bytes), with the usable memory as a line;
    the legend beside the axes, never over a bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) + 3), 4.5))
    bottoms = [0.0] * len(labels)
    names = list(parts[0])
    for name in names:
        heights = [p[name] / GIB for p in parts]
        ax.bar(labels, heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.axhline(usable_bytes / GIB, color="black", linestyle="--", label="usable")
    ax.set_ylabel("GiB per GPU")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize="small")
    fig.tight_layout()
    return fig
