"""Human-readable results: a markdown report and PNG plots from an evaluation's metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from alro_ray.rank.metrics import METRIC_ORDER

Column = tuple[str, Callable[[dict], str]]


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def column(header: str, key: str, fmt: str) -> Column:
    """A table column showing `key` of each row's metrics with `fmt` ("-" where it is absent)."""
    return header, lambda m: "-" if m.get(key) is None else format(m[key], fmt)


LISTS = column("lists", "lists", "d")
TPQ = column("TPQ s", "tpq_seconds", ".3f")
FIRST_SHOWN = column("first-shown rank", "first_shown_mean_rank", ".2f")
STABILITY = (column("τ across reorders", "stability_tau", ".3f"), column("NDCG@10 spread", "ndcg@10_spread", ".4f"))


def shown_metrics(rows) -> list[str]:
    """The metrics any row holds, in METRIC_ORDER (the protocol decides which: rank/metrics.py)."""
    return [k for k in METRIC_ORDER if any(k in m for m in rows)]


def _title(key: str) -> str:
    return key.replace("ndcg", "NDCG").replace("recall", "Recall").replace("hr@", "HR@").replace("mrr", "MRR")


def ndcg_table(rows: dict[str, dict], extra: Sequence[Column] = (LISTS,)) -> str:
    """The one metrics table: a row per method, its NDCG@k (and the top-N protocol's metrics),
    then `extra` columns."""
    keys = shown_metrics(rows.values())
    head = ["method", *(_title(k) for k in keys), *(h for h, _ in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in rows.items():
        cells = [name, *(_cell(m.get(k)) for k in keys), *(f(m) for _, f in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(metrics: dict) -> str:
    """An evaluation's baselines and ranker modes on the same lists."""
    rows = dict(metrics.get("baselines", {}))
    rows.update({f"ranker: {mode}": {**m, "bias": m["position_bias"]["spearman"]}
                 for mode, m in metrics["modes"].items()})
    return ndcg_table(rows, [LISTS, TPQ, column("repair rate", "repair_rate", ".1%"),
                             column("position bias (Spearman)", "bias", "+.3f"),
                             *bias_columns(metrics["modes"].values())])


def reorders_of(rows) -> list[int]:
    """The numbers of reorders the rows were ranked under (evaluate/stability.py; [] without --reorders)."""
    return sorted({m["reorders"] for m in rows if m.get("reorders")})


def bias_columns(rows) -> list[Column]:
    """The first-shown rank, and the stability columns where some row was ranked under reorders."""
    return [FIRST_SHOWN, *(STABILITY if reorders_of(rows) else ())]


def stability_note(rows) -> str:
    """The stability columns' definitions, where some row has them ("" otherwise)."""
    ps = reorders_of(rows)
    return "" if not ps else (
        f" τ across reorders: each list ranked again under p = {' or '.join(map(str, ps))} seeded reorders of its "
        f"candidates (prompt re-rendered, identifiers reassigned), the mean Kendall τ over all pairs of the p + 1 "
        f"rankings (1: the order shown does not matter). NDCG@10 spread: max - min of the list's NDCG@10 over them.")


def write_report(metrics: dict, out: Path, history_path: Path | None = None) -> None:
    plots = plot_ndcg(metrics, out / "ndcg.png") + plot_position_bias(metrics, out / "position_bias.png")
    if history_path is not None and history_path.exists():
        plots += plot_history(json.loads(history_path.read_text()), out / "training.png")
    n = next(iter(metrics["modes"].values()))["lists"] if metrics["modes"] else 0
    text = [
        "# Evaluation report", "",
        f"- checkpoint: `{metrics['checkpoint']}`",
        f"- data: `{metrics['data']}` ({metrics['split']} split, {n} users)", "",
        metrics_table(metrics), "",
        "NDCG: gain 2^r - 1, discount log2(1 + n), normalised per list. TPQ: seconds per query on this "
        "machine. Repair rate: share of free generations that needed the spec's repair. Position bias: "
        "Spearman correlation between prompt position and mean predicted rank (+1: earlier shown, ranked "
        "higher; 0: no bias). First-shown rank: the mean predicted rank of the candidate shown first "
        f"(no bias: (C + 1) / 2).{stability_note(metrics['modes'].values())}", "",
    ]
    text += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(text) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, title: str, path: Path) -> list[Path]:
    plt = _plt()
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_ndcg(metrics: dict, path: Path) -> list[Path]:
    plt = _plt()
    names = list(metrics.get("baselines", {})) + [f"ranker: {m}" for m in metrics["modes"]]
    values = [metrics["baselines"][n] for n in metrics.get("baselines", {})] + list(metrics["modes"].values())
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    ks = [k for k in shown_metrics(values) if k.startswith("ndcg@")]
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        ax.bar([i + j * width for i in range(len(names))], [v.get(k) or 0 for v in values], width, label=_title(k))
    ax.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    return _save(fig, ax, "NDCG by method", path)


def plot_position_bias(metrics: dict, path: Path) -> list[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, m in metrics["modes"].items():
        ranks = m["position_bias"]["mean_rank_by_position"]
        ax.plot(range(1, len(ranks) + 1), ranks, marker="o", label=mode)
    if metrics["modes"]:
        c = len(next(iter(metrics["modes"].values()))["position_bias"]["mean_rank_by_position"])
        ax.axhline((c + 1) / 2, color="grey", linestyle="--", label="no bias")
    ax.set_xlabel("position in the prompt")
    ax.set_ylabel("mean predicted rank (1 = top)")
    return _save(fig, ax, "Position bias", path)


def plot_history(history: list[dict], path: Path) -> list[Path]:
    if not history:
        return []
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "train_sft", "train_rank", "train_perm"):
        left.plot(epochs, [h.get(key) for h in history], marker="o", label=key)
    left.set_xlabel("epoch")
    left.set_title("training losses")
    left.legend()
    for k in (k for k in METRIC_ORDER if k.startswith("ndcg@")):
        key = f"valid_{k}"
        if any(key in h for h in history):
            right.plot(epochs, [h.get(key) for h in history], marker="o", label=key)
    right.set_xlabel("epoch")
    return _save(fig, right, "validation NDCG", path)
