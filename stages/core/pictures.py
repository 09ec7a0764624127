"""The paper's pictures, as PNG files: filters, top-activating images, synthetic filter images,
nearest neighbours, cluster sizes, per-epoch curves and sample images per cluster.

Every `plot_*` function takes arrays (or a network) and a path, draws with matplotlib's Agg backend
(no display on a batch machine) and writes the PNG atomically.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy.signal import convolve2d  # noqa: E402

from stages.core.errors import StageError  # noqa: E402
from stages.core.io import atomic_path
from stages.core.models import DeepClusterNet  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid_title(fig: plt.Figure, title: str, wspace: float = 0.08, hspace: float = 0.12) -> None:
    """Title just above a grid of small images. A fixed gap in inches, as the figure height varies;
    matplotlib's constrained layout does this too, but slowly on grids of ~100 axes."""
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.4 / height, wspace=wspace, hspace=hspace)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")


def to_display(images: np.ndarray) -> np.ndarray:
    """N x H x W x C uint8 (or floats in [0, 1]) -> what imshow takes: grey images lose the channel axis."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    return images[..., 0] if images.shape[-1] == 1 else np.clip(images, 0.0, 1.0)


def _show(ax: plt.Axes, image: np.ndarray, frame: str | None = None) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(2.5)


# ---------------------------------------------------------------- conv1 filters
def first_layer_filters(model: DeepClusterNet) -> np.ndarray:
    """conv1's filters as they act on the input image: O x kh x kw x C_in (C_in = 1 behind Sobel).

    Behind the fixed Sobel layer conv1 sees two gradient channels, not pixels. Grey conversion, Sobel
    and conv1 are all linear, so their composition is one larger filter on the grey image: the full
    convolution of each conv1 channel with its Sobel kernel, summed over the two channels. This is
    the pixel-space filter the paper's Fig. 3 compares with the raw-input filters.
    """
    conv1 = next(m for m in model.features if isinstance(m, torch.nn.Conv2d))
    w = conv1.weight.detach().float().cpu().numpy()  # O x C x kh x kw
    if model.sobel is None:
        return w.transpose(0, 2, 3, 1)
    sobel = model.sobel.sobel.detach().float().cpu().numpy()[:, 0]  # 2 x 3 x 3
    # y = sum_c W_c (x) (S_c (x) x), with (x) cross-correlation, equals K (x) x with K = sum_c conv_full(W_c, S_c).
    composed = np.stack([sum(convolve2d(w[o, c], sobel[c], mode="full") for c in range(w.shape[1]))
                         for o in range(w.shape[0])])
    return composed[..., None]


def _normalise_each(filters: np.ndarray) -> np.ndarray:
    """Each filter scaled to [0, 1] around its own zero, so sign and shape are visible whatever the norm."""
    flat = filters.reshape(len(filters), -1)
    scale = np.abs(flat).max(axis=1) + 1e-12
    return 0.5 + 0.5 * filters / scale.reshape(-1, *([1] * (filters.ndim - 1)))


def plot_conv1_filters(models: dict[str, DeepClusterNet], path: str | Path, max_filters: int = 64) -> Path:
    """One panel per network (e.g. random init and trained): every conv1 filter in pixel space."""
    fig, axes_sets = plt.subplots(1, len(models), figsize=(5 * len(models), 5.6), squeeze=False)
    for outer, (name, model) in zip(axes_sets[0], models.items()):
        filters = _normalise_each(first_layer_filters(model)[:max_filters])
        n = len(filters)
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        outer.axis("off")
        sobel = "Sobel input: grey -> Sobel -> conv1, composed" if model.sobel is not None else "raw pixel input"
        outer.set_title(f"{name}\n{sobel}", fontsize=10)
        grid = outer.get_subplotspec().subgridspec(rows, cols, wspace=0.08, hspace=0.08)
        for i in range(rows * cols):
            ax = fig.add_subplot(grid[i // cols, i % cols])
            if i < n:
                _show(ax, to_display(filters[i : i + 1])[0])
            else:
                ax.axis("off")
    return save_figure(fig, path)


# ---------------------------------------------------------------- filters: top images and gradient ascent
def pick_filters(channel_max: np.ndarray, n: int, max_correlation: float = 0.5) -> np.ndarray:
    """n selective filters that respond to different things.

    The paper hand-picks filters. Here filters are ranked by selectivity (their top-9 mean response
    over their mean response: firing on a few specific images rather than on everything, and never
    dead), then taken greedily while their responses over all images correlate at most
    `max_correlation` with every filter already taken, so the panel does not show eight detectors
    of one pattern; the most selective of the rest fill up if needed.
    """
    n_top = min(9, len(channel_max))
    top = -np.sort(-channel_max, axis=0)[:n_top].mean(axis=0)
    selectivity = top / (np.abs(channel_max).mean(axis=0) + 1e-6)
    selectivity[top <= 0] = -np.inf
    ranked = np.argsort(-selectivity, kind="stable")
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(channel_max, rowvar=False), nan=0.0)
    chosen: list[int] = []
    for f in ranked:
        if len(chosen) == n or not np.isfinite(selectivity[f]):
            break
        if all(corr[f, g] <= max_correlation for g in chosen):
            chosen.append(int(f))
    chosen += [int(f) for f in ranked if f not in chosen][: n - len(chosen)]
    return np.asarray(chosen[:n], dtype=np.int64)


def top_images(channel_max: np.ndarray, filters: np.ndarray, n: int = 9) -> np.ndarray:
    """F x n row indices of the images that excite each filter most, strongest first."""
    return np.argsort(-channel_max[:, filters], axis=0, kind="stable")[:n].T


def gradient_ascent(model: DeepClusterNet, layer: str, filters: np.ndarray, *, size: int, channels: int,
                    mean: list[float], std: list[float], steps: int = 200, lr: float = 0.1,
                    weight_decay: float = 1e-3, blur_every: int = 4, seed: int = 0) -> np.ndarray:
    """Synthetic input images that excite each filter (paper Sec. 4.2, after Yosinski et al.).

    Loss = cross-entropy between the layer's spatially averaged filter responses and the target
    filter (the paper's choice: the target must beat the other filters of its layer, not just grow),
    plus L2 decay on the image; a light blur every few steps keeps high-frequency noise down.
    Returns F x size x size x channels in [0, 1].
    """
    conv_index = int(layer.removeprefix("conv")) - 1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    lo, hi = (0 - m) / s, (1 - m) / s
    x = (0.1 * torch.randn(len(filters), channels, size, size, generator=gen)).to(device).requires_grad_(True)
    target = torch.as_tensor(np.asarray(filters), dtype=torch.long, device=device)
    opt = torch.optim.Adam([x], lr=lr)
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=device) / 16.0
    blur = blur.expand(channels, 1, 3, 3)
    try:
        for step in range(steps):
            acts = model.conv_activations(x, upto=conv_index + 1)[conv_index]
            loss = F.cross_entropy(acts.mean(dim=(2, 3)), target) + weight_decay * x.pow(2).sum() / len(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                if blur_every and (step + 1) % blur_every == 0 and step + 1 < steps:
                    x.copy_(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=channels))
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    img = (x.detach() * s + m).clamp(0, 1)
    # stretch each image's contrast: the optimum is often a faint pattern on grey
    lo_i = img.amin(dim=(1, 2, 3), keepdim=True)
    hi_i = img.amax(dim=(1, 2, 3), keepdim=True)
    img = (img - lo_i) / (hi_i - lo_i + 1e-8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def plot_filter_panel(synthetic: np.ndarray | None, top: np.ndarray, filters: np.ndarray, layer: str,
                      path: str | Path) -> Path:
    """One row per filter: its synthetic image (gradient ascent), then the images exciting it most.

    synthetic: F x H x W x C in [0, 1] or None; top: F x n x H x W x C images, strongest first.
    """
    n_rows, n_top = top.shape[:2]
    offset = 0 if synthetic is None else 1
    fig, axes = plt.subplots(n_rows, n_top + offset, figsize=(1.1 * (n_top + offset), 1.15 * n_rows + 0.4),
                             squeeze=False)
    for r in range(n_rows):
        if synthetic is not None:
            _show(axes[r, 0], to_display(synthetic[r : r + 1])[0], frame="tab:orange")
        for c in range(n_top):
            _show(axes[r, c + offset], to_display(top[r, c : c + 1])[0])
        axes[r, 0].set_ylabel(f"#{filters[r]}", fontsize=9)
    title = f"{layer}: " + ("synthetic image (orange frame) and " if synthetic is not None else "") + \
        f"the {n_top} images that activate the filter most"
    _grid_title(fig, title)
    return save_figure(fig, path)


# ---------------------------------------------------------------- nearest neighbours
def plot_neighbours(queries: np.ndarray, query_labels: np.ndarray | None,
                    panels: dict[str, tuple[np.ndarray, np.ndarray | None]], path: str | Path,
                    class_names: list[str] | None = None) -> Path:
    """Rows = queries; for each named panel (e.g. random init, trained) the query's nearest neighbours.

    queries: Q x H x W x C; panels: name -> (Q x k x H x W x C neighbour images, Q x k their labels
    or None). A green frame marks a neighbour of the query's class, red one of another class.
    """
    n_q = len(queries)
    ks = [imgs.shape[1] for imgs, _ in panels.values()]
    n_cols = 1 + sum(k + 1 for k in ks)
    fig, axes = plt.subplots(n_q, n_cols, figsize=(0.95 * n_cols, 1.05 * n_q + 0.5), squeeze=False)
    for r in range(n_q):
        _show(axes[r, 0], to_display(queries[r : r + 1])[0], frame="black")
        known = query_labels is not None and query_labels[r] >= 0
        if known and class_names and query_labels[r] < len(class_names):
            axes[r, 0].set_ylabel(class_names[query_labels[r]], fontsize=7)
        col = 1
        for imgs, labels in panels.values():
            axes[r, col].axis("off")
            col += 1
            for j in range(imgs.shape[1]):
                frame = None
                if known and labels is not None:
                    frame = "tab:green" if labels[r, j] == query_labels[r] else "tab:red"
                _show(axes[r, col], to_display(imgs[r, j : j + 1])[0], frame=frame)
                col += 1
    axes[0, 0].set_title("query", fontsize=9)
    col = 2
    for name, k in zip(panels, ks):
        axes[0, col + k // 2].set_title(name, fontsize=10)
        col += k + 1
    _grid_title(fig, "nearest neighbours (cosine similarity of fc features)")
    return save_figure(fig, path)


# ---------------------------------------------------------------- clusters and curves
def plot_cluster_sizes(sizes: np.ndarray, path: str | Path, epoch: int | None = None) -> Path:
    """Sorted cluster sizes (as the paper's PIC vs k-means figure) and their histogram."""
    sizes = np.asarray(sizes)
    if len(sizes) == 0:
        raise StageError("no clusters to plot")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ordered = np.sort(sizes)[::-1]
    a1.bar(np.arange(len(ordered)), ordered, width=1.0, color="tab:blue")
    a1.axhline(sizes.sum() / max((sizes > 0).sum(), 1), color="tab:red", lw=1, ls="--", label="mean (non-empty)")
    a1.set(xlabel="cluster rank", ylabel="images")
    a1.legend(fontsize=8)
    a2.hist(sizes, bins=min(50, max(len(sizes) // 2, 5)), color="tab:blue")
    a2.set(xlabel="cluster size (images)", ylabel="clusters")
    when = f"epoch {epoch}: " if epoch is not None else ""
    fig.suptitle(f"{when}{len(sizes)} clusters, {int((sizes == 0).sum())} empty, "
                 f"sizes {int(sizes[sizes > 0].min())}..{int(sizes.max())}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_epoch_curves(curves: pd.DataFrame, path: str | Path) -> Path:
    """NMI with the previous epoch and with the labels (paper Fig. 2a/b), and the losses, over epochs."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    e = curves["epoch"]
    plotted = 0
    for column, label in (("nmi_previous", "NMI(t-1, t)"), ("nmi_labels", "NMI(labels, t)")):
        if column in curves and curves[column].notna().any():
            a1.plot(e, curves[column], marker="o", ms=3, label=label)
            plotted += 1
    a1.set(xlabel="epoch", ylabel="NMI", ylim=(0, 1))
    a1.grid(alpha=0.3)
    if plotted:
        a1.legend(fontsize=8)
    else:  # one epoch of unlabelled images: no previous epoch, no labels
        a1.text(0.5, 0.5, "no NMI yet: needs two epochs or labels", ha="center", va="center", transform=a1.transAxes)
    a2.plot(e, curves["train_loss"], marker="o", ms=3, color="tab:red")
    a2.set_xlabel("epoch")
    a2.set_ylabel("training loss (cross-entropy on pseudo-labels)", color="tab:red")
    a2.grid(alpha=0.3)
    if "pseudo_label_accuracy" in curves:
        twin = a2.twinx()
        twin.plot(e, curves["pseudo_label_accuracy"], marker=".", color="tab:gray")
        twin.set_ylabel("pseudo-label accuracy", color="tab:gray")
        twin.set_ylim(0, 1)
    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return save_figure(fig, path)


def sample_clusters(clusters: np.ndarray, *, n_clusters: int, per_cluster: int, seed: int = 0,
                    labels: np.ndarray | None = None, class_names: list[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """Pick n_clusters random non-empty clusters and up to per_cluster random members of each.

    Returns (row title, member indices) per cluster; the title gives the cluster id, its size and,
    with labels, its majority class and purity.
    """
    clusters = np.asarray(clusters)
    rng = np.random.default_rng(seed)
    ids, sizes = np.unique(clusters, return_counts=True)
    if len(ids) == 0:
        raise StageError("no clusters to show")
    rows = []
    for ci in np.sort(rng.choice(len(ids), size=min(n_clusters, len(ids)), replace=False)):
        members = np.flatnonzero(clusters == ids[ci])
        pick = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
        title = f"cluster {ids[ci]}\nn={sizes[ci]}"
        if labels is not None and (labels[members] >= 0).all():
            counts = np.bincount(labels[members])
            top = int(counts.argmax())
            name = class_names[top] if class_names and top < len(class_names) else str(top)
            title += f"\n{name} {counts[top] / len(members):.0%}"
        rows.append((title, pick))
    return rows


def plot_cluster_samples(rows: list[tuple[str, np.ndarray]], path: str | Path) -> Path:
    """One row of images per cluster: rows = (title, n x H x W x C images)."""
    per_cluster = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), per_cluster, figsize=(1.0 * per_cluster + 1.6, 1.05 * len(rows) + 0.4),
                             squeeze=False)
    for r, (title, imgs) in enumerate(rows):
        for c in range(per_cluster):
            if c < len(imgs):
                _show(axes[r, c], to_display(imgs[c : c + 1])[0])
            else:
                axes[r, c].axis("off")
        axes[r, 0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    _grid_title(fig, "random members of random clusters (last epoch)")
    return save_figure(fig, path)
