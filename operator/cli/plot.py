"""``promptcache replay --plot FILE.png`` (docs/design.md#the-picture): a replay read at a glance.

Three panels: the bootstrap distribution of savings, with the point estimate, the interval and the break-even line
(savings 0: the policy costs what was billed); per model, the recorded bill (the baseline) beside the projected
cost; and why requests read nothing, as recorded and as projected. The title names the proposed policy and the
baseline. matplotlib is the ``plot`` extra, imported only here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from promptcache.operator.cli.figures import pct, usd
from promptcache.operator.replay.misses import REASONS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from promptcache.operator.replay.engine import Report

BASELINE_COLOR, PROJECTED_COLOR = "#9aa5b1", "#3c7dc4"


def _tex(text: str) -> str:
    """A dollar sign escaped: two of them would start mathtext."""
    return text.replace("$", r"\$")


def describe_policy(params: Mapping[str, Any]) -> str:
    """The proposal in one line: its keys as given, the tier override and the price overrides."""
    def value(v: Any) -> str:
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(map(value, v)) + "]"
        return str(v)

    parts = [f"{key} {value(v)}" for key, v in sorted(params["policy"].items())] or ["the default policy"]
    parts += [f"tier {a}→{b}" for a, b in sorted(params["tier_override"].items())]
    parts += [f"{model} at {p['inputPerMTok']}/{p['outputPerMTok']} per MTok"
              for model, p in sorted(params["pricing_overrides"].items())]
    return "; ".join(parts)


def figure(report: Report, policy_name: str) -> Figure:
    """The picture of a replay's report; ``policy_name`` says where the policy came from (a file, or defaults)."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    result = report.result
    summary, params = result["summary"], result["params"]
    replicates = np.asarray(report.savings_replicates, dtype=np.float64)
    replicates = replicates[np.isfinite(replicates)]
    fig = Figure(figsize=(11, 8.5), dpi=110)
    grid = fig.add_gridspec(2, 2, height_ratios=(1.15, 1), hspace=0.45, wspace=0.35)
    fig.suptitle(f"Projected savings of {policy_name} against the recorded bills (the baseline)\n"
                 f"{_tex(describe_policy(params))}", fontsize=10.5)

    ax = fig.add_subplot(grid[0, :])
    ax.hist(replicates, bins=min(60, max(10, replicates.size // 25)), color="#8fb3d9", edgecolor="#4a6f96",
            linewidth=0.5, label=f"{replicates.size:,} bootstrap resamples by {params['unit']}", zorder=2)
    lo, hi = result["intervals"]["savings"]
    level = f"{params['confidence'] * 100:g}%"
    if "NaN" not in (lo, hi):
        ax.axvspan(float(lo), float(hi), color="#f2c14e", alpha=0.3, zorder=1,
                   label=f"{level} interval [{_tex(usd(lo))}, {_tex(usd(hi))}]")
    ax.axvline(float(summary["savings"]), color="#b22222", linewidth=2,
               label=f"point estimate {_tex(usd(summary['savings']))} ({pct(summary['savings_pct'])} of the baseline)")
    ax.axvline(0, color="black", linewidth=1.2, linestyle=":", label="break-even: the policy costs what was billed")
    ax.set_title(f"Savings over {summary['requests']:,} requests: baseline {_tex(usd(summary['baseline_cost']))} "
                 f"billed, {_tex(usd(summary['projected_cost']))} projected (seed {params['seed']})", fontsize=9.5)
    ax.set_xlabel("savings, USD (baseline - projected; left of break-even the policy costs more)")
    ax.set_ylabel("resamples")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)

    models = result["per_model"]
    ax = fig.add_subplot(grid[1, 0])
    rows = np.arange(len(models))
    ax.barh(rows - 0.2, [float(m["baseline_cost"]) for m in models], 0.4, color=BASELINE_COLOR,
            label="baseline (billed)")
    ax.barh(rows + 0.2, [float(m["projected_cost"]) for m in models], 0.4, color=PROJECTED_COLOR,
            label="projected")
    ax.set_yticks(rows, [f"{m['model']}\n{pct(m['savings_pct'])} saved" for m in models], fontsize=8)
    ax.invert_yaxis()
    ax.set_title("Per model", fontsize=9.5)
    ax.set_xlabel("cost, USD")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)

    ax = fig.add_subplot(grid[1, 1])
    rows = np.arange(len(REASONS))
    misses = summary["misses"]
    ax.barh(rows - 0.2, [misses["recorded"][r] for r in REASONS], 0.4, color=BASELINE_COLOR,
            label="recorded (as billed)")
    ax.barh(rows + 0.2, [misses["projected"][r] for r in REASONS], 0.4, color=PROJECTED_COLOR,
            label="projected")
    ax.set_yticks(rows, [r.replace("_", " ") for r in REASONS], fontsize=8)
    ax.invert_yaxis()
    ax.set_title("Why requests read nothing", fontsize=9.5)
    ax.set_xlabel("requests")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def save(report: Report, policy_name: str, path: str) -> None:
    """The picture as a PNG at ``path``; OSError when it cannot be written."""
    figure(report, policy_name).savefig(path, format="png")
