"""Plots people would rather look at than read: factor spectra, SDI trajectories, curvature-edit sweeps."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from lit_attrib.io import atomic_path  # noqa: E402

__all__ = [
    "attention_comparison_figure", "attention_figure", "default_inspect_modules", "edit_sweep_figure", "factor_figures",
    "inspect_selection", "noise_robustness_figure", "sdi_trajectory_figure", "write_factor_plots",
]

_MAX_HEATMAP_SIDE = 256


def default_inspect_modules(names: list[str]) -> list[str]:
    """A late layer's MLP ``down_proj`` (GPT-2: ``mlp.c_proj``), else the last tracked layer."""
    for suffix in ("down_proj", "mlp.c_proj"):
        matches = [name for name in names if name.endswith(suffix)]
        if matches:
            return [matches[-1]]
    return names[-1:]


def inspect_selection(names: list[str], patterns: list[str] | None) -> list[str]:
    """The layers of ``names`` that ``patterns`` (fnmatch) select, or :func:`default_inspect_modules`.

    Raises:
        ValueError: the patterns match none of the names.
    """
    if not patterns:
        return default_inspect_modules(names)
    selected = [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    if not selected:
        raise ValueError(f"inspect patterns {patterns} match none of the saved layers {names[:8]}")
    return selected


def _block_mean(matrix: torch.Tensor, side: int = _MAX_HEATMAP_SIDE) -> torch.Tensor:
    """Shrink a large matrix for display by averaging blocks (keeps the overall pattern)."""
    rows, cols = matrix.shape
    row_step, col_step = max(1, -(-rows // side)), max(1, -(-cols // side))
    if row_step == col_step == 1:
        return matrix
    pooled = torch.nn.functional.avg_pool2d(matrix[None, None].double(), (row_step, col_step), ceil_mode=True)
    return pooled[0, 0]


def factor_figures(factors: dict[str, torch.Tensor], name: str) -> dict[str, plt.Figure]:
    """Four figures of one layer's factors: ``spectrum``, ``variance``, ``lambda_heatmap``, ``lambda_sorted``."""
    activation = factors["activation_eigenvalues"].double().flip(0).clamp(min=0)
    gradient = factors["gradient_eigenvalues"].double().flip(0).clamp(min=0)
    lambda_matrix = factors["lambda"].double()
    figures = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    for values, label in ((activation, "A (activations)"), (gradient, "G (output gradients)")):
        positive = values[values > 0]
        ax.plot(range(1, len(positive) + 1), positive.numpy(), label=label)
    ax.set(xlabel="rank", ylabel="eigenvalue", yscale="log", xscale="log", title=f"Eigenvalue spectrum\n{name}")
    ax.legend()
    figures["spectrum"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    for values, label in ((activation, "A"), (gradient, "G")):
        explained = values.cumsum(0) / values.sum().clamp(min=1e-300)
        ax.plot(range(1, len(values) + 1), explained.numpy(), label=label)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="number of eigenvectors", ylabel="cumulative variance explained", ylim=(0, 1.02),
           title=f"Cumulative variance explained\n{name}")
    ax.legend()
    figures["variance"] = fig

    fig, ax = plt.subplots(figsize=(6, 5))
    shown = _block_mean(lambda_matrix).clamp(min=1e-30)
    image = ax.imshow(shown.numpy(), aspect="auto", cmap="viridis",
                      norm=LogNorm(vmin=float(shown.min()), vmax=float(shown.max()) if shown.max() > shown.min() else None))
    fig.colorbar(image, ax=ax, label="Λ")
    pooled = " (block means)" if shown.shape != lambda_matrix.shape else ""
    ax.set(xlabel="activation eigenvector (ascending)", ylabel="gradient eigenvector (ascending)",
           title=f"EKFAC Λ {tuple(lambda_matrix.shape)}{pooled}\n{name}")
    figures["lambda_heatmap"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    ordered = lambda_matrix.flatten().sort(descending=True).values
    ax.plot(range(1, len(ordered) + 1), ordered.numpy())
    ax.set(xlabel="rank", ylabel="Λ", xscale="log", title=f"Sorted Λ values\n{name}")
    positive = ordered[ordered > 0]
    linthresh = float(positive.min()) if len(positive) else 1e-30
    ax.set_yscale("symlog", linthresh=linthresh)
    if float(ordered.min()) >= 0:  # Λ is a mean of squares: no negative half-axis to show
        ax.set_ylim(0, float(ordered.max()) * 2)
    figures["lambda_sorted"] = fig
    for figure in figures.values():
        figure.tight_layout()
    return figures


def write_factor_plots(factors: Any, folder: str | Path, modules: list[str] | None = None, *, logger: Any = None,
                       tag: str = "factors", step: int = 0) -> list[Path]:
    """PNG files in ``folder/plots`` and, given a TensorBoard logger, images and histograms.

    Args:
        factors: a :class:`lit_attrib.artifacts.Factors`.
        folder: the artifact folder.
        modules: fnmatch patterns of the layers to plot (default :func:`default_inspect_modules`).
        logger: a Lightning ``TensorBoardLogger`` or a ``SummaryWriter`` (optional).
        tag: TensorBoard tag prefix.
        step: TensorBoard global step.

    Returns:
        The PNG files written.
    """
    selected = inspect_selection(list(factors.modules), modules)
    writer = getattr(logger, "experiment", logger)
    if not hasattr(writer, "add_figure"):
        writer = None
    written = []
    for name in selected:
        layer = factors[name]
        for kind, figure in factor_figures(layer, name).items():
            path = Path(folder) / "plots" / f"{name}.{kind}.png"
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png", dpi=110)
            written.append(path)
            if writer is not None:
                writer.add_figure(f"{tag}/{name}/{kind}", figure, global_step=step, close=False)
            plt.close(figure)
        if writer is not None:
            for key in ("activation_eigenvalues", "gradient_eigenvalues", "lambda"):
                writer.add_histogram(f"{tag}/{name}/{key}", layer[key].double().flatten(), global_step=step)
            writer.flush()
    return written


def sdi_trajectory_figure(sdi: torch.Tensor, train_indices: torch.Tensor, steps: list[str], top_k: int = 8) -> plt.Figure:
    """Seed 001's per-step influence trajectories: left, the ``top_k`` training examples with the largest
    total |influence| (averaged over the queries), their influence at each step; right, each step's share
    of all |influence|. ``sdi (N_train, N_query, S)``."""
    mean = sdi.double().mean(1)  # (N_train, S)
    order = torch.argsort(mean.sum(1).abs(), descending=True)[:top_k]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(steps))
    for position in order.tolist():
        left.plot(x, mean[position].numpy(), marker="o", label=f"train {int(train_indices[position])}")
    left.axhline(0, color="grey", lw=0.8)
    left.set_xticks(list(x), steps, rotation=30 if len(steps) > 6 else 0)
    left.set(xlabel="step", ylabel="influence (mean over queries)",
             title=f"Per-step influence of the top {len(order)} training examples")
    left.legend(fontsize="small", ncol=2)
    share = sdi.double().abs().sum((0, 1))
    share = share / share.sum().clamp(min=1e-300)
    right.bar(list(x), share.numpy(), color="tab:blue")
    right.set_xticks(list(x), steps, rotation=30 if len(steps) > 6 else 0)
    right.set(xlabel="step", ylabel="share of |influence|", title="Where influence enters")
    fig.tight_layout()
    return fig


def edit_sweep_figure(rows: list[dict]) -> plt.Figure:
    """Seed 003's trade-off: memorization (strict and loose accuracy, left axis) and perplexity (right
    axis) of the edited models against ρ, with the baseline's as dashed lines. ``rows`` are
    ``results.jsonl`` rows."""
    edited = sorted((row for row in rows if row["model"] == "edited" and row["rho"] is not None),
                    key=lambda row: row["rho"])
    baseline = next((row for row in rows if row["model"] == "baseline"), None)
    rhos = [row["rho"] for row in edited]
    fig, left = plt.subplots(figsize=(7, 4))
    right = left.twinx()
    for key, label, color in (("strict_accuracy", "strict memorization", "tab:red"),
                              ("loose_accuracy", "loose memorization", "tab:orange")):
        if all(row.get(key) is not None for row in edited):
            left.plot(rhos, [100 * row[key] for row in edited], marker="o", color=color, label=label)
            if baseline is not None and baseline.get(key) is not None:
                left.axhline(100 * baseline[key], color=color, ls="--", lw=0.8)
    if all(row.get("perplexity") is not None for row in edited):
        perplexities = [row["perplexity"] for row in edited]
        right.plot(rhos, perplexities, marker="s", color="tab:blue", label="held-out perplexity")
        if baseline is not None and baseline.get("perplexity") is not None:
            right.axhline(baseline["perplexity"], color="tab:blue", ls="--", lw=0.8)
            perplexities.append(baseline["perplexity"])
        # an axis from 0.95x the lowest to at least 1.3x the highest: a rise of 1 % must not look like 100 %
        right.set_ylim(0.95 * min(perplexities), max(1.3 * min(perplexities), 1.05 * max(perplexities)))
    left.set(xlabel="ρ (fraction of curvature mass kept)", ylabel="memorized (%)", ylim=(-3, 103),
             title="Curvature edit: memorization and perplexity against ρ (dashed: unedited)")
    right.set_ylabel("perplexity", color="tab:blue")
    handles = [h for axis in (left, right) for h in axis.get_legend_handles_labels()[0]]
    left.legend(handles, [h.get_label() for h in handles], loc="center left", fontsize="small")
    fig.tight_layout()
    return fig


def _attention_panel(axis, maps: torch.Tensor, queries: list[int], tokens: list[str] | None, differential: bool,
                     title: str, limit: float | None = None):
    """One head-mean map ``(queries, keys)`` with the tokens on the axes (when they fit)."""
    image = maps.double().mean(0)
    if differential:
        limit = limit or float(image.abs().max().clamp(min=1e-12))
        shown = axis.imshow(image.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="none")
    else:
        shown = axis.imshow(image.numpy(), cmap="Blues", vmin=0, aspect="auto", interpolation="none")
    if tokens is not None and len(tokens) <= 96:
        axis.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=6)
        if len(queries) <= 64:
            axis.set_yticks(range(len(queries)), [repr(tokens[q])[1:-1] for q in queries], fontsize=6)
    axis.set(xlabel="key token", ylabel="query token", title=title)
    return shown


def attention_figure(example: dict, tokens: list[str] | None = None, title: str = "", differential: bool = False,
                     lambdas: dict | None = None) -> plt.Figure:
    """Heatmaps of one captured example: one panel per layer, the mean over the captured heads of the
    ``(queries, keys)`` map, tokens on the axes. Differential maps use a diverging scale centred at 0
    (blue: negative mass)."""
    layers = sorted(example["maps"])
    queries = [int(q) for q in example["queries"]]
    width = min(4 + 0.12 * (len(tokens) if tokens else example["maps"][layers[0]].shape[-1]), 18)
    fig, axes = plt.subplots(len(layers), 1, figsize=(width, 1.5 + 0.9 * len(layers) + 0.1 * len(queries) * len(layers)),
                             squeeze=False)
    for axis, layer in zip(axes[:, 0], layers):
        label = f"layer {layer}" + (f" (λ = {lambdas[layer]:.3f})" if lambdas and layer in lambdas else "")
        shown = _attention_panel(axis, example["maps"][layer], queries, tokens, differential, label)
        fig.colorbar(shown, ax=axis, fraction=0.03)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def attention_comparison_figure(captures: dict[str, tuple[dict, dict[str, torch.Tensor]]], index: int, layer: int,
                                tokenizer: Any = None) -> plt.Figure:
    """Side by side: each model's head-mean map of example ``index`` at ``layer`` (e.g. Llama vs DiffLlama),
    and a bar chart of each model's attention allocation (signed mass, pooled over layers and heads).

    Args:
        captures: label → ``(allocation.json, tensors)`` of an :class:`AttentionCaptureCallback` folder
            (:func:`lit_attrib.artifacts.attention.load_attention`).
        index: dataset index of an example both captures kept.
        layer: the layer to show.
        tokenizer: decodes the token ids for the axes.
    """
    labels = list(captures)
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(6 * len(labels) + 4, 5),
                             gridspec_kw={"width_ratios": [3] * len(labels) + [2]})
    for axis, label in zip(axes, labels):
        meta, tensors = captures[label]
        key = f"{index}/layer{layer}"
        if key not in tensors:
            raise KeyError(f"capture '{label}' holds no map of example {index} at layer {layer}; it kept examples "
                           f"{meta['examples']} and layers {meta['layers']}")
        ids = tensors[f"{index}/input_ids"].tolist()
        tokens = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else None
        lam = meta.get("lambda", {}).get(str(layer))
        title = f"{label} ({meta['model_type']}), layer {layer}" + (f", λ = {lam:.3f}" if lam is not None else "")
        shown = _attention_panel(axis, tensors[key], tensors[f"{index}/queries"].tolist(), tokens, meta["differential"],
                                 title)
        fig.colorbar(shown, ax=axis, fraction=0.03)
    bars = axes[-1]
    classes = captures[labels[0]][0]["classes"]
    width = 0.8 / len(labels)
    for m, label in enumerate(labels):
        mass = captures[label][1]["mass"][0].double().sum((0, 1))  # signed, over layers and heads
        total = mass.sum()  # (1 − λ) per query for differential maps: negative when λ > 1
        share = (mass / total if total != 0 else torch.zeros_like(mass)).numpy()
        bars.bar([c + m * width for c in range(len(classes))], 100 * share, width, label=label)
    bars.set_xticks([c + width * (len(labels) - 1) / 2 for c in range(len(classes))], classes)
    bars.set(ylabel="share of attention mass (%)", title="Allocation of the answer's attention")
    bars.legend(fontsize="small")
    fig.tight_layout()
    return fig


def noise_robustness_figure(rows: list[dict]) -> plt.Figure:
    """Seed 004's grouped bars: Pass@1 per dataset (clean, inf, rcs, sd), one bar per model and setting
    (zero-shot, after SFT). ``rows`` have ``model``, ``setting``, ``dataset`` and ``pass@1``."""
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    groups = list(dict.fromkeys((row["model"], row["setting"]) for row in rows))
    width = 0.8 / len(groups)
    fig, axis = plt.subplots(figsize=(max(6, 1.6 * len(datasets) * max(1, len(groups) / 2)), 4))
    for g, (model, setting) in enumerate(groups):
        values = {row["dataset"]: row["pass@1"] for row in rows if (row["model"], row["setting"]) == (model, setting)}
        x = [d + g * width for d, name in enumerate(datasets) if name in values]
        heights = [100 * values[name] for name in datasets if name in values]
        bars = axis.bar(x, heights, width, label=f"{model} ({setting})", hatch="//" if setting != "zero-shot" else None)
        axis.bar_label(bars, fmt="%.0f", fontsize=7)
    axis.set_xticks([d + width * (len(groups) - 1) / 2 for d in range(len(datasets))], datasets)
    axis.set(xlabel="dataset (noise type)", ylabel="Pass@1 (%)", ylim=(0, 105),
             title="Noise robustness: Pass@1 on GSM8K with injected noise")
    axis.legend(fontsize="small")
    fig.tight_layout()
    return fig
