"""Stage `evaluate final`: the run's last network on the held-out labelled split, side by side with the
same network at random init (epoch 0) and with raw pixels: linear probes on every conv layer and on fc,
weighted kNN, k-means with k = classes (NMI, ARI, Hungarian accuracy), and the paper's pictures. Writes
data/eval/: metrics.json (every figure, flat keys such as probe.trained.conv3), headline.json (the few
`dvc metrics show` and `dvc exp show` list), scores/*.json (one row per feature source), epochs.csv (the
per-epoch curves), report.md and pictures/*.png; the `publish` stage logs them into the run's MLflow run.
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.core import pictures
from stages.core.assignments import read_assignments
from stages.core.checkpoints import check_input_size, init_checkpoint, load_checkpoint, model_from_checkpoint
from stages.core.data import ImageSet, center_crop, iterate_batches, load_split
from stages.core.errors import StageError, cli_errors
from stages.core.io import atomic_path, read_json, write_json
from stages.core.layout import (ASSIGNMENTS, CHECKPOINTS, DATASET, EPOCHS_ROOT, EVAL, EVAL_CLUSTER_SIZES, EVAL_CURVES,
                                EVAL_HEADLINE, LAST_CHECKPOINT, METRICS, checkpoint_name, epoch_dir, report)
from stages.core.params import apply_overrides, load_params
from stages.core.probes import (conv_layer_names, cosine_neighbours, extract_layer_features, kmeans_quality,
                                knn_accuracy, knn_leave_one_out_accuracy, linear_probe, pixel_features)
from stages.core.runtime import Phases, Timer, pick_device, seed_for, seeded_subset
from stages.core.schema import Evaluate, Params


def collect_epoch_metrics(epochs_root: str | Path) -> pd.DataFrame:
    files = sorted(Path(epochs_root).glob(f"[0-9][0-9][0-9][0-9]/{METRICS}"))
    if not files:
        raise StageError(f"no finished epoch under {epochs_root}: run the DeepCluster flow first")
    return pd.DataFrame([read_json(f) for f in files]).sort_values("epoch").reset_index(drop=True)


NETWORKS = ("trained", "random")
TITLES = {"trained": "trained network", "random": "random init"}  # in the progress lines
# The figures `dvc metrics show` and `dvc exp show` list (data/eval/headline.json): the paper's claim in
# one screen, trained vs random init vs raw pixels. Every figure stays in metrics.json.
HEADLINE = ("probe.trained.best", "probe.random.best", "probe.pixels", "probe.random_inits.best",
            "probe.random_inits.best_std",
            "knn_conv.trained", "knn_conv.random", "knn_conv.random_inits", "knn_conv.random_inits_std",
            "knn.trained", "knn.random", "knn.pixels",
            *(f"cluster.{s}.{m}" for s in ("trained", "random", "pixels") for m in ("acc", "nmi")),
            "knn.random_inits", "knn.random_inits_std", "cluster.random_inits.acc", "cluster.random_inits.nmi",
            "last_nmi_previous")


@dataclass(frozen=True)
class EvaluationData:
    """The train subset the probes learn on and the held-out images they are tested on, with their labels."""
    train: ImageSet
    test: ImageSet
    train_rows: np.ndarray
    test_rows: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    labelled: bool  # every image of both subsets has a class: probes, kNN and k-means can be scored
    n_classes: int
    class_names: list[str] | None


@dataclass(frozen=True)
class ReportInputs:
    """What report.md says besides the metrics."""
    checkpoint: str
    random_source: str
    data: EvaluationData
    settings: Evaluate
    layers: list[str]
    probes: dict[str, dict]  # network (or pixels) -> layer -> its linear probe
    curves: pd.DataFrame
    pictures: list[Path]
    seconds: dict[str, float]


def seeded_init_network(params: Params, dataset: str | Path, trained: dict, seed: int, device: torch.device) -> dict:
    """The checkpoint of the network that the train stage's init builds for run.seed = seed (trained's architecture)."""
    p = apply_overrides(params, {"run.seed": seed, "train.crop_size": trained["image_size"],
                                 **{f"model.{k}": v for k, v in trained["model_params"].items()}})
    with tempfile.TemporaryDirectory() as tmp:
        init_checkpoint(p, dataset, Path(tmp) / checkpoint_name(0))
        return load_checkpoint(Path(tmp) / checkpoint_name(0), device)


def random_init_network(params: Params, checkpoint: str | Path, dataset: str | Path, trained: dict,
                        device: torch.device) -> tuple[torch.nn.Module, str]:
    """The run's epoch-0 network: the same architecture and weights DeepCluster started from.

    Read from epoch_0000.pt beside the checkpoint when it is there; otherwise rebuilt by the train
    stage's own init with the run's seed (seeded, so the same weights).
    """
    path = Path(checkpoint).parent / checkpoint_name(0)
    if path.exists():
        ckpt = load_checkpoint(path, device)
        source = str(path)
    else:
        ckpt = seeded_init_network(params, dataset, trained, params.run.seed, device)
        source = f"rebuilt with run.seed={params.run.seed}"
    if ckpt["model_params"] != trained["model_params"] or ckpt["epoch"] != 0:
        raise StageError(f"{path} is not this run's epoch-0 network (epoch {ckpt['epoch']}, model {ckpt['model_params']} "
                         f"vs {trained['model_params']}): rerun the flow with --fresh")
    return model_from_checkpoint(ckpt, device), source


def load_images(images: ImageSet, rows: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x C pixels of the images at `rows` (decoded for image trees), for pictures."""
    rows = np.asarray(rows).ravel()
    if len(rows) == 0:
        return np.zeros((0, images.image_size, images.image_size, images.channels), dtype=np.uint8)
    return np.concatenate([b.permute(0, 2, 3, 1).numpy() for b in iterate_batches(images, rows, 256)])


def probe_layers(cfg: Evaluate, model: torch.nn.Module) -> list[str]:
    """The layers to probe: evaluate.probe_layers, where `all` = every conv block and fc."""
    return conv_layer_names(model) + ["fc"] if cfg.probe_layers == "all" else list(cfg.probe_layers)


def probe_options(cfg: Evaluate) -> dict:
    return {"weight_decays": tuple(cfg.probe_weight_decays), "max_iter": cfg.probe_iters,
            "val_fraction": cfg.probe_val_fraction}


def extraction_options(params: Params, device: torch.device) -> dict:
    """How evaluate reads a network's features: extract's centre view, batch and precision, pooled to probe_dim."""
    ex = params.extract
    return dict(crop_size=ex.crop_size, batch_size=ex.batch_size, device=device, max_dim=params.evaluate.probe_dim,
                amp=ex.amp)


def fc_scores(fc_train: np.ndarray, fc_test: np.ndarray, data: EvaluationData, params: Params, seed: int,
              kmeans_runs: int, whiten: bool = True) -> tuple[float, dict]:
    """Weighted kNN accuracy and k-means (k = classes, PCA-whitened as in training) quality of fc features;
    whiten=False: k-means on the features as they are (the usual raw-pixel baseline)."""
    cfg = params.evaluate
    knn = knn_accuracy(fc_train, data.y_train, fc_test, data.y_test, k=cfg.knn_k, temperature=cfg.knn_temperature,
                       n_classes=data.n_classes)
    q = kmeans_quality(fc_test, data.y_test, k=data.n_classes, niter=params.cluster.niter, seed=seed,
                       runs=kmeans_runs, pca_dim=params.pca.dim if whiten else None, eps=params.pca.eps)
    return knn, q


def choose_knn_layer(features: dict[str, np.ndarray], labels: np.ndarray, cfg: Evaluate,
                     n_classes: int) -> tuple[str, dict[str, float]]:
    """The layer whose weighted kNN best classifies the probe-train images, each left out of its own
    neighbours, and each layer's accuracy there. The test split plays no part, so the chosen layer's test kNN
    is not picked by the images it is scored on. Ties keep the earlier layer.

    Leave-one-out, not a held-out fifth: a network's best layers are often within a point of each other, and a
    fifth of 4,000 images has a sampling error near a point, so the fifth picked a layer a point or two below
    the best on the test split (docs/results.md, "The best conv layer, chosen on every probe-train image").
    """
    k = cfg.knn_k
    scores = {layer: knn_leave_one_out_accuracy(x, labels, k=k, temperature=cfg.knn_temperature, n_classes=n_classes)
              for layer, x in features.items()}
    return max(scores, key=scores.get), scores  # max keeps the first of equals: the earlier layer


def conv_knn(train: dict[str, np.ndarray], test: dict[str, np.ndarray], data: EvaluationData,
             cfg: Evaluate) -> tuple[float | None, str | None]:
    """Weighted kNN on the network's best conv layer (choose_knn_layer), or (None, None) when no conv layer
    was extracted. The paper judges a network by its conv features; fc is trained to predict the last
    clustering's pseudo-labels, so its neighbourhoods follow those clusters more than the images."""
    convs = {layer: x for layer, x in train.items() if layer.startswith("conv")}
    if not convs:
        return None, None
    layer = choose_knn_layer(convs, data.y_train, cfg, data.n_classes)[0] if len(convs) > 1 else next(iter(convs))
    return knn_accuracy(train[layer], data.y_train, test[layer], data.y_test, k=cfg.knn_k,
                        temperature=cfg.knn_temperature, n_classes=data.n_classes), layer


def feature_scores(train: dict[str, np.ndarray], test: dict[str, np.ndarray], data: EvaluationData, params: Params,
                   seed: int, kmeans_runs: int) -> dict:
    """A network's scores besides its probes: weighted kNN on fc and on its best conv layer, k-means on fc."""
    knn, q = fc_scores(train["fc"], test["fc"], data, params, seed, kmeans_runs)
    knn_conv, layer = conv_knn(train, test, data, params.evaluate)
    return {"knn": knn, "knn_conv": knn_conv, "knn_conv_layer": layer, **q}


def network_features(model: torch.nn.Module, data: EvaluationData, params: Params,
                     device: torch.device) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One network's pooled features (probe layers and fc) of the probe-train and of the held-out images."""
    layers = probe_layers(params.evaluate, model)
    needed = layers if "fc" in layers else layers + ["fc"]
    kw = extraction_options(params, device)
    return (extract_layer_features(model, data.train, data.train_rows, needed, **kw).pooled,
            extract_layer_features(model, data.test, data.test_rows, needed, **kw).pooled)


def network_scores(model: torch.nn.Module, data: EvaluationData, params: Params, device: torch.device, seed: int,
                   kmeans_runs: int) -> dict:
    """feature_scores of one network, from its features of the probe-train and held-out images."""
    return feature_scores(*network_features(model, data, params, device), data, params, seed, kmeans_runs)


def best_conv_probe(train: dict[str, np.ndarray], test: dict[str, np.ndarray], data: EvaluationData, cfg: Evaluate,
                    seed: int) -> tuple[float | None, str | None]:
    """The best conv layer's linear probe and the layer, picked as evaluate_network picks a network's best conv
    probe (the highest held-out accuracy over its conv layers); (None, None) when no conv layer was extracted."""
    scores = {layer: linear_probe(x, data.y_train, test[layer], data.y_test, n_classes=data.n_classes, seed=seed,
                                  **probe_options(cfg))["accuracy"]
              for layer, x in train.items() if layer.startswith("conv")}
    if not scores:
        return None, None
    layer = max(scores, key=scores.get)
    return scores[layer], layer


def evaluate_network(name: str, model: torch.nn.Module, data: EvaluationData, params: Params, device: torch.device,
                     seed: int, phases: Phases, channel_max_layers: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Probes on every layer, kNN and k-means on fc for one network: three phases (features, probes with a
    line per layer, kNN and k-means); without labels, the features' phase only.

    Returns the flat metrics and what the pictures need (fc features, filter maxima on the test split).
    """
    cfg, title = params.evaluate, TITLES[name]
    layers = probe_layers(cfg, model)
    needed = layers if "fc" in layers else layers + ["fc"]  # kNN and clustering use fc
    kw = extraction_options(params, device)
    with phases.phase(f"{title}: features of {len(data.train_rows):,} probe-train + {len(data.test_rows):,} "
                      "held-out images"):
        ftr = extract_layer_features(model, data.train, data.train_rows, needed, **kw)
        fte = extract_layer_features(model, data.test, data.test_rows, needed, channel_max_layers=channel_max_layers,
                                     **kw)
    metrics, details = {}, {}
    if data.labelled:
        span = layers[0] + (f"..{layers[-1]}" if len(layers) > 1 else "")
        with phases.phase(f"{title}: linear probes {span}") as phase:
            for layer in phases.progress(layers, len(layers), "probe", name=str):
                r = linear_probe(ftr.pooled[layer], data.y_train, fte.pooled[layer], data.y_test,
                                 n_classes=data.n_classes, seed=seed, **probe_options(cfg))
                metrics[f"probe.{name}.{layer}"] = r["accuracy"]
                details[layer] = r
            phase.note = ", ".join(f"{layer} {r['accuracy']:.1%}" for layer, r in details.items())
        conv = {k: v for k, v in metrics.items() if k.split(".")[-1].startswith("conv")}
        if conv:
            metrics[f"probe.{name}.best"] = max(conv.values())
        with phases.phase(f"{title}: weighted kNN, k-means x{cfg.kmeans_runs}") as phase:
            scores = feature_scores(ftr.pooled, fte.pooled, data, params, seed, cfg.kmeans_runs)
            knn, knn_conv, conv_layer = scores.pop("knn"), scores.pop("knn_conv"), scores.pop("knn_conv_layer")
            phase.note = (f"kNN {knn:.1%}" + (f" (fc), {knn_conv:.1%} ({conv_layer})" if conv_layer else "")
                          + f", k-means NMI {scores['nmi']:.3f}")
        metrics[f"knn.{name}"] = knn
        if conv_layer:
            metrics.update({f"knn_conv.{name}": knn_conv, f"knn_conv.{name}_layer": conv_layer})
        metrics.update({f"cluster.{name}.{k}": v for k, v in scores.items()})
    extras = {"fc_train": ftr.pooled["fc"], "fc_test": fte.pooled["fc"], "channel_max": fte.channel_max, "probes": details}
    return metrics, extras


def evaluate_random_inits(params: Params, dataset: str | Path, trained: dict, data: EvaluationData, first: dict,
                          device: torch.device, seed: int, phases: Phases) -> dict:
    """Best conv probe, kNN (fc and best conv layer) and k-means of `random_inits` random networks: mean and
    standard deviation over the networks.

    The first is the run's epoch 0 (its scores `first`, already computed); the others are the networks runs
    of seed run.seed + 1, + 2, ... start from, scored on the same images with the same probe and k-means seeds.
    Each network's conv kNN and conv probe are on its own best conv layer. The probes are here too because one
    random network's best conv probe moves by tenths of a point: a probe margin needs the same spread as kNN's.
    """
    scores = [{"knn": first["knn.random"], "knn_conv": first.get("knn_conv.random"),
               "knn_conv_layer": first.get("knn_conv.random_layer"), "acc": first["cluster.random.acc"],
               "nmi": first["cluster.random.nmi"], "probe": first.get("probe.random.best"),
               "probe_layer": best_conv_layer(first, [k.split(".")[2] for k in first if k.startswith("probe.random.")],
                                              "random")}]
    more = params.evaluate.random_inits - 1
    for i in phases.progress(range(1, more + 1), more, "random network", name=lambda i: f"run.seed + {i}"):
        ckpt = seeded_init_network(params, dataset, trained, params.run.seed + i, device)
        model = model_from_checkpoint(ckpt, device).to(memory_format=torch.channels_last)
        train, test = network_features(model, data, params, device)
        s = feature_scores(train, test, data, params, seed, params.evaluate.kmeans_runs)
        s["probe"], s["probe_layer"] = best_conv_probe(train, test, data, params.evaluate, seed)
        scores.append(s)
    out = {"random_inits": params.evaluate.random_inits}
    for key, prefix in (("knn", "knn.random_inits"), ("knn_conv", "knn_conv.random_inits"),
                        ("acc", "cluster.random_inits.acc"), ("nmi", "cluster.random_inits.nmi"),
                        ("probe", "probe.random_inits.best")):
        values = [s[key] for s in scores]
        if None not in values:
            out.update({prefix: float(np.mean(values)), f"{prefix}_std": float(np.std(values))})
    # the layers as one string each, as the other layer names: metrics.json stays flat
    for key, name in (("knn_conv_layer", "knn_conv.random_inits_layers"),
                      ("probe_layer", "probe.random_inits.best_layers")):
        if None not in (layers := [s[key] for s in scores]):
            out[name] = ", ".join(layers)
    return out


def evaluate_pixels(data: EvaluationData, params: Params, seed: int) -> tuple[dict, dict]:
    cfg, crop = params.evaluate, params.extract.crop_size
    xtr = pixel_features(data.train, data.train_rows, crop_size=crop, max_dim=cfg.probe_dim)
    xte = pixel_features(data.test, data.test_rows, crop_size=crop, max_dim=cfg.probe_dim)
    r = linear_probe(xtr, data.y_train, xte, data.y_test, n_classes=data.n_classes, seed=seed, **probe_options(cfg))
    knn, q = fc_scores(xtr, xte, data, params, seed, cfg.kmeans_runs, whiten=False)
    metrics = {"probe.pixels": r["accuracy"], "knn.pixels": knn, **{f"cluster.pixels.{k}": v for k, v in q.items()}}
    return metrics, {"pixels": r}  # as the networks' probes: layer -> probe


def evaluation_data(cfg: Evaluate, dataset: str | Path, seed: int) -> EvaluationData:
    """The train subset the probes learn on and the held-out images they are tested on.

    Without a test split the held-out images are the train images outside the subset, so the pictures
    still work on unlabelled image folders.
    """
    train = load_split(dataset, "train")
    try:
        test = load_split(dataset, "test")
    except StageError:  # the dataset has no test split (an unlabelled folder has only train)
        test = None
    train_rows = seeded_subset(len(train), cfg.train_images, seed)
    if test is None:
        rest = np.setdiff1d(np.arange(len(train)), train_rows)
        if len(rest) == 0:  # all train images are in the subset: hold out a seeded fifth of them
            rest = np.sort(np.random.default_rng(seed).choice(len(train), size=max(len(train) // 5, 1), replace=False))
            train_rows = np.setdiff1d(train_rows, rest)
        test, test_rows = train, rest
    else:
        test_rows = np.arange(len(test))
    test_rows = test_rows[seeded_subset(len(test_rows), cfg.test_images, seed + 1)]
    y_train, y_test = train.labels[train_rows], test.labels[test_rows]
    labelled = bool(len(y_train) and len(y_test) and (y_train >= 0).all() and (y_test >= 0).all())
    n_classes = int(max(y_train.max(), y_test.max()) + 1) if labelled else 0
    if labelled and len(train.meta.get("classes") or []) > n_classes:
        n_classes = len(train.meta["classes"])
    return EvaluationData(train, test, train_rows, test_rows, y_train, y_test, labelled, n_classes,
                          train.meta.get("classes"))


def draw_pictures(out: Path, params: Params, data: EvaluationData, nets: dict, extras: dict, curves: pd.DataFrame,
                  epochs_root: str | Path, seed: int, phases: Phases) -> list[Path]:
    """Every picture of the evaluation into out/ (PNG), with a progress line each: the filter panels' gradient
    ascent takes minutes at 224 px."""
    cfg = params.evaluate
    last_epoch = int(curves["epoch"].iloc[-1])
    drawings = {
        "conv1_filters": lambda: pictures.plot_conv1_filters({"random init": nets["random"], "trained": nets["trained"]},
                                                             out / "conv1_filters.png"),
        **{f"filters_{layer}": partial(filter_panel, out, params, data, nets["trained"],
                                       extras["trained"]["channel_max"][layer], layer, seed)
           for layer in cfg.picture_layers},
        "neighbours": lambda: neighbours_picture(out, cfg, data, extras, seed),
        "cluster_sizes": lambda: pictures.plot_cluster_sizes(cluster_sizes(epochs_root, last_epoch),
                                                             out / "cluster_sizes.png", epoch=last_epoch),
        "epoch_curves": lambda: pictures.plot_epoch_curves(curves, out / "epoch_curves.png"),
        "cluster_samples": lambda: cluster_samples_picture(out, cfg, data, epochs_root, last_epoch, seed)}
    written = [draw() for _, draw in phases.progress(drawings.items(), len(drawings), "picture", name=lambda d: d[0])]
    return [p for p in written if p is not None]


def filter_panel(out: Path, params: Params, data: EvaluationData, net: torch.nn.Module, cmax: np.ndarray, layer: str,
                 seed: int) -> Path:
    """filters_<layer>.png: a few of the layer's filters, the held-out images that excite each most and (with
    ascent_steps) the input gradient ascent makes for it."""
    cfg, crop, test = params.evaluate, params.extract.crop_size, data.test
    filters = pictures.pick_filters(cmax, cfg.picture_filters)
    top = pictures.top_images(cmax, filters, min(9, len(cmax)))
    top_imgs = load_images(test, data.test_rows[top.ravel()])
    top_imgs = center_crop(torch.from_numpy(top_imgs).permute(0, 3, 1, 2), crop).permute(0, 2, 3, 1).numpy()
    top_imgs = top_imgs.reshape(*top.shape, *top_imgs.shape[1:])
    synthetic = None
    if cfg.ascent_steps > 0:
        synthetic = pictures.gradient_ascent(net, layer, filters, size=crop, channels=test.channels,
                                             mean=test.meta["mean"], std=test.meta["std"], steps=cfg.ascent_steps,
                                             lr=cfg.ascent_lr, seed=seed)
    return pictures.plot_filter_panel(synthetic, top_imgs, filters, layer, out / f"filters_{layer}.png")


def neighbours_picture(out: Path, cfg: Evaluate, data: EvaluationData, extras: dict, seed: int) -> Path | None:
    """neighbours.png: held-out queries and their nearest probe-train images by fc features, random init vs trained."""
    n_q = min(cfg.picture_queries, len(data.test_rows))
    if n_q == 0:
        return None
    q = np.sort(np.random.default_rng(seed).choice(len(data.test_rows), size=n_q, replace=False))
    panels = {}
    for name, title in (("random", "random init"), ("trained", "trained")):
        _, idx = cosine_neighbours(extras[name]["fc_train"], extras[name]["fc_test"][q], cfg.picture_neighbours)
        imgs = load_images(data.train, data.train_rows[idx].ravel())
        panels[title] = (imgs.reshape(*idx.shape, *imgs.shape[1:]), data.y_train[idx] if data.labelled else None)
    queries = load_images(data.test, data.test_rows[q])
    qlabels = data.y_test[q] if data.labelled else None
    return pictures.plot_neighbours(queries, qlabels, panels, out / "neighbours.png", data.class_names)


def cluster_samples_picture(out: Path, cfg: Evaluate, data: EvaluationData, epochs_root: str | Path, epoch: int,
                            seed: int) -> Path | None:
    """cluster_samples.png: images of a few of the last epoch's clusters (none if it clustered another dataset)."""
    assign_file = epoch_dir(epochs_root, epoch) / ASSIGNMENTS
    if not assign_file.exists():
        return None
    clusters = read_assignments(assign_file)["cluster"].to_numpy()  # row i = train image i
    if len(clusters) != len(data.train):
        return None
    chosen = pictures.sample_clusters(clusters, n_clusters=cfg.picture_clusters, per_cluster=cfg.picture_cluster_images,
                                      seed=seed, labels=data.train.labels, class_names=data.class_names)
    return pictures.plot_cluster_samples([(t, load_images(data.train, m)) for t, m in chosen], out / "cluster_samples.png")


def margin(metrics: dict, a: str, b: str, spreads: tuple[str, ...] = ()) -> str:
    """a - b (accuracies in points, NMI as it is) +- the named spreads combined (as independent); a margin no
    larger than its spread is reported as no difference, not as a gain or a loss."""
    if metrics.get(a) is None or metrics.get(b) is None:
        return "n/a"
    scale, digits = (1, 3) if a.endswith(".nmi") else (100, 1)
    diff = scale * (metrics[a] - metrics[b])
    text = f"{diff:+.{digits}f}"
    if spreads:
        spread = scale * float(np.hypot.reduce([metrics.get(k) or 0.0 for k in spreads]))
        text += f" +- {spread:.{digits}f}" + (" (no difference)" if abs(diff) <= spread else "")
    return text


def write_report(path: Path, metrics: dict, info: ReportInputs) -> None:
    """data/eval/report.md: the probe table, kNN, clustering, the curves and the pictures."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
    n_inits = metrics.get("random_inits", 1)
    f3 = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"

    def probe_cell(name: str, layer: str) -> str:
        r = info.probes.get(name, {}).get(layer)
        return "n/a" if r is None else f"{pct(r['accuracy'])} ({r['weight_decay']:g})"

    data, cfg = info.data, info.settings
    held_out = "the test split" if data.test is not data.train else "train images outside the subset"
    lines = ["# DeepCluster evaluation", "",
             f"Network: `{info.checkpoint}` (epoch {metrics.get('checkpoint_epoch')}); random init: {info.random_source}.",
             f"Probes and kNN train on {len(data.train_rows)} images of the train split and are tested on "
             f"{len(data.test_rows)} held-out images ({held_out}).", ""]
    if data.labelled:
        lines += ["## Linear probes (test accuracy, %)", "",
                  f"Frozen features, conv blocks average-pooled to at most {cfg.probe_dim} dims; multinomial "
                  "logistic regression on standardised features, its weight decay (in brackets) chosen on "
                  "held-out training images.", "",
                  "| layer | dims | trained | random init |", "|---|---:|---:|---:|"]
        for layer in info.layers:
            r = info.probes.get("trained", {}).get(layer) or {}
            lines.append(f"| {layer} | {r.get('dim', '')} | {probe_cell('trained', layer)} | {probe_cell('random', layer)} |")
        px = info.probes.get("pixels", {}).get("pixels") or {}
        lines.append(f"| raw pixels | {px.get('dim', '')} | {probe_cell('pixels', 'pixels')} | |")
        best_t, best_r = (best_conv_layer(metrics, info.layers, network) for network in NETWORKS)
        inits = ""
        if metrics.get("probe.random_inits.best") is not None:
            inits = (f"{n_inits} random inits {pct(metrics['probe.random_inits.best'])} +- "
                     f"{pct(metrics.get('probe.random_inits.best_std'))} % "
                     f"({metrics.get('probe.random_inits.best_layers')}), ")
        lines += ["", f"Best conv layer: trained {pct(metrics.get('probe.trained.best'))} % ({best_t}), "
                  f"random init {pct(metrics.get('probe.random.best'))} % ({best_r}), {inits}raw pixels "
                  f"{pct(metrics.get('probe.pixels'))} %.", "",
                  f"## Weighted kNN (k = {cfg.knn_k}, T = {cfg.knn_temperature}, cosine), %", "",
                  "Each network's best conv layer leads, chosen by leave-one-out kNN over the probe-train images "
                  "(each classified by its neighbours among the others; never on the test split): the paper judges a "
                  "network by its conv features, and fc, the layer DeepCluster clusters, is trained to predict the "
                  "last clustering's pseudo-labels, so its neighbourhoods follow those clusters.", "",
                  f"| features | trained | random init | {n_inits} random inits (mean +- sd) | raw pixels |",
                  "|---|---:|---:|---:|---:|"]
        if metrics.get("knn_conv.trained") is not None:
            layer = lambda key: f" ({metrics[key]})" if metrics.get(key) else ""
            lines.append(f"| best conv layer | {pct(metrics.get('knn_conv.trained'))}{layer('knn_conv.trained_layer')} | "
                         f"{pct(metrics.get('knn_conv.random'))}{layer('knn_conv.random_layer')} | "
                         f"{pct(metrics.get('knn_conv.random_inits'))} +- "
                         f"{pct(metrics.get('knn_conv.random_inits_std'))}{layer('knn_conv.random_inits_layers')} | "
                         f"{pct(metrics.get('knn.pixels'))} |")
        lines += [f"| fc | {pct(metrics.get('knn.trained'))} | {pct(metrics.get('knn.random'))} | "
                  f"{pct(metrics.get('knn.random_inits'))} +- {pct(metrics.get('knn.random_inits_std'))} | "
                  f"{pct(metrics.get('knn.pixels'))} |",
                  "", f"## Clustering the held-out images (k-means, k = {data.n_classes})", "",
                  "fc features PCA-whitened and L2-normalised as in training; raw pixels clustered as they are. "
                  f"Means over {cfg.kmeans_runs} k-means seeds (NMI: +- its standard deviation).", "",
                  "| features | NMI | ARI | ACC (Hungarian) |", "|---|---:|---:|---:|"]
        for name, title in (("trained", "trained fc"), ("random", "random init fc"),
                            ("random_inits", f"{n_inits} random inits fc (+- over the networks)"), ("pixels", "raw pixels")):
            lines.append(f"| {title} | {f3(metrics.get(f'cluster.{name}.nmi'))} +- {f3(metrics.get(f'cluster.{name}.nmi_std'))} | "
                         f"{f3(metrics.get(f'cluster.{name}.ari'))} | {f3(metrics.get(f'cluster.{name}.acc'))} +- "
                         f"{f3(metrics.get(f'cluster.{name}.acc_std'))} |")
        lines += ["", "## Margins: trained minus random init, and minus raw pixels", "",
                  "| measure | vs random init | vs raw pixels |", "|---|---:|---:|"]
        seeds = lambda a, b, q: (f"cluster.{a}.{q}_std", f"cluster.{b}.{q}_std")  # k-means: over its seeds
        for title, t, r, p, spread in (
                ("best conv probe, points", "probe.trained.best", "probe.random.best", "probe.pixels", None),
                ("weighted kNN, best conv layer, points", "knn_conv.trained", "knn_conv.random", "knn.pixels", None),
                ("weighted kNN, fc, points", "knn.trained", "knn.random", "knn.pixels", None),
                ("k-means ACC, points", "cluster.trained.acc", "cluster.random.acc", "cluster.pixels.acc", "acc"),
                ("k-means NMI", "cluster.trained.nmi", "cluster.random.nmi", "cluster.pixels.nmi", "nmi")):
            lines.append(f"| {title} | {margin(metrics, t, r, seeds('trained', 'random', spread) if spread else ())} | "
                         f"{margin(metrics, t, p, seeds('trained', 'pixels', spread) if spread else ())} |")
        for title, t, r, spreads in (
                (f"best conv probe vs the {n_inits} random inits, points", "probe.trained.best",
                 "probe.random_inits.best", ("probe.random_inits.best_std",)),
                (f"weighted kNN, best conv layer, vs the {n_inits} random inits, points", "knn_conv.trained",
                 "knn_conv.random_inits", ("knn_conv.random_inits_std",)),
                (f"weighted kNN, fc, vs the {n_inits} random inits, points", "knn.trained", "knn.random_inits",
                 ("knn.random_inits_std",)),
                (f"k-means ACC vs the {n_inits} random inits, points", "cluster.trained.acc", "cluster.random_inits.acc",
                 seeds("trained", "random_inits", "acc")),
                (f"k-means NMI vs the {n_inits} random inits", "cluster.trained.nmi", "cluster.random_inits.nmi",
                 seeds("trained", "random_inits", "nmi"))):
            lines.append(f"| {title} | {margin(metrics, t, r, spreads)} | |")
        lines += ["", "Margins +- their spread: k-means, the seed spreads of both sides combined; against the "
                  f"{n_inits} random inits (the run's epoch 0 and the networks of run.seed + 1, ...), the spread over "
                  f"those networks (kNN +- {pct(metrics.get('knn.random_inits_std'))}: one random network moves kNN by "
                  "points) combined with the trained side's. A margin within its spread is \"no difference\". "
                  "Margins without a spread (probes and kNN against random init) come from one network per side: "
                  "read them against the spread over random networks."]
    else:
        lines += ["No labelled held-out split: probes, kNN and clustering scores need labels; pictures only."]
    lines += ["", "## Training, epoch by epoch", "",
              "| epoch | NMI(t-1, t) | NMI(labels, t) | training loss | empty clusters |", "|---:|---:|---:|---:|---:|"]
    for _, row in info.curves.iterrows():
        lines.append(f"| {int(row['epoch'])} | {f3(row.get('nmi_previous'))} | {f3(row.get('nmi_labels'))} | "
                     f"{f3(row.get('train_loss'))} | {int(row.get('empty_clusters', 0))} |")
    if info.pictures:
        lines += ["", "## Pictures", ""]
        lines += [f"![{p.stem}](pictures/{p.name})" for p in info.pictures]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in info.seconds.items())
    lines += ["", f"Evaluation took {metrics['seconds']:.0f} s ({timing}).", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def score_tables(summary: dict) -> dict[str, dict]:
    """One small JSON per feature source (trained, random, pixels) for `dvc metrics show data/eval/scores/*.json`.

    DVC prints one row per metrics file and one column per key, so these three files make the
    probe table itself: rows trained / random init / raw pixels, columns acc, ari, knn, nmi, nmi_std,
    probe_best, probe_conv1.. probe_fc, probe_input (the raw-pixel probe). The complete flat record is
    metrics.json.
    """
    tables = {}
    for name in (*NETWORKS, "pixels"):
        row = {}
        for key, value in summary.items():
            parts = key.split(".")
            if value is None or len(parts) < 2 or parts[1] != name:
                continue
            if parts[0] == "probe":
                row["probe_input" if name == "pixels" else f"probe_{parts[2]}"] = value
            elif parts[0] in ("knn", "knn_conv"):
                row[parts[0]] = value
            elif parts[0] == "cluster":
                row[parts[2]] = value
        tables[name] = row
    return tables


def best_conv_layer(summary: dict, layers: list[str], network: str) -> str | None:
    conv = {layer: summary[f"probe.{network}.{layer}"] for layer in layers
            if layer.startswith("conv") and summary.get(f"probe.{network}.{layer}") is not None}
    return max(conv, key=conv.get) if conv else None


def cluster_sizes(epochs_root: str | Path, epoch: int) -> np.ndarray:
    """Images per cluster of an epoch (labels report, or counted from its assignments)."""
    labels_json = epoch_dir(epochs_root, epoch) / report("labels")
    if labels_json.exists() and "sizes" in read_json(labels_json):
        return np.asarray(read_json(labels_json)["sizes"])
    return np.bincount(read_assignments(epoch_dir(epochs_root, epoch) / ASSIGNMENTS)["cluster"].to_numpy())


def planned_phases(cfg: Evaluate, labelled: bool) -> int:
    """How many phases run_final_evaluation announces: loading; per network its features and, with labels, its
    probes and its kNN and k-means; with labels the more random networks and raw pixels; pictures; writing."""
    return 1 + len(NETWORKS) * (3 if labelled else 1) + 2 * labelled + cfg.pictures + 1


def run_final_evaluation(params: Params, dataset: str | Path, epochs_root: str | Path, checkpoint: str | Path,
                         out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    cfg = params.evaluate
    seconds = {}
    with Timer() as t:
        curves = collect_epoch_metrics(epochs_root)
        with atomic_path(out_dir / EVAL_CURVES) as tmp:
            curves.to_csv(tmp, index=False)
        last = curves.iloc[-1]
        nmi_prev = curves["nmi_previous"].dropna()
        summary = {"epochs": int(last["epoch"]), "last_nmi_previous": last["nmi_previous"],
                   "first_nmi_previous": float(nmi_prev.iloc[0]) if len(nmi_prev) else None,
                   "last_nmi_labels": last["nmi_labels"], "last_train_loss": last["train_loss"]}
        # Not the epoch: runs of any length (and their random-init and pixel baselines) are then judged on the
        # same images with the same k-means seeds, so experiments compare without the seeds' noise.
        seed = seed_for(params.run.seed, 0, "evaluate")
        # before the first line: whether the images have labels decides which phases run (it reads the manifest)
        data = evaluation_data(cfg, dataset, seed)
        phases = Phases("evaluate", total=planned_phases(cfg, data.labelled))

        with phases.phase(f"loading {checkpoint} and its random init") as phase:
            device = pick_device(params.extract.device)
            trained = load_checkpoint(checkpoint, device)
            check_input_size(trained, params.extract.crop_size, "extract.crop_size")
            nets = {"trained": model_from_checkpoint(trained, device)}
            nets["random"], random_source = random_init_network(params, checkpoint, dataset, trained, device)
            nets = {k: v.to(memory_format=torch.channels_last) for k, v in nets.items()}  # as extract: faster on CPU too
            phase.note = f"epoch {trained['epoch']} on {device}, random init: {random_source}"
        summary.update(checkpoint_epoch=trained["epoch"], n_probe_train=len(data.train_rows), n_test=len(data.test_rows))

        picture_layers = tuple(cfg.picture_layers) if cfg.pictures else ()
        extras, probes = {}, {}
        for name in NETWORKS:
            with Timer() as tn:
                m, extras[name] = evaluate_network(name, nets[name], data, params, device, seed, phases,
                                                   channel_max_layers=picture_layers if name == "trained" else ())
            summary.update(m)
            probes[name] = extras[name]["probes"]
            seconds[f"{name} network"] = tn.seconds
        if data.labelled:
            with phases.phase(f"conv probes, weighted kNN, k-means of {cfg.random_inits - 1} more random "
                              "networks") as tr:
                summary.update(evaluate_random_inits(params, dataset, trained, data, summary, device, seed, phases))
            seconds["more random networks"] = tr.seconds
            with phases.phase("raw pixels: linear probe, weighted kNN, k-means") as tp:
                m, probes["pixels"] = evaluate_pixels(data, params, seed)
                tp.note = f"probe {m['probe.pixels']:.1%}, kNN {m['knn.pixels']:.1%}"
            summary.update(m)
            summary["test_nmi_k_classes"] = summary["cluster.trained.nmi"]
            seconds["raw pixels"] = tp.seconds

        written = []
        (out_dir / "pictures").mkdir(parents=True, exist_ok=True)  # a declared DVC output, even when empty
        if cfg.pictures:
            with phases.phase(f"pictures into {out_dir / 'pictures'}") as tpic:
                written = draw_pictures(out_dir / "pictures", params, data, nets, extras, curves, epochs_root, seed,
                                        phases)
            seconds["pictures"] = tpic.seconds
    summary["seconds"] = t.seconds
    summary = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.items()}
    with phases.phase(f"writing the metrics and report.md into {out_dir}"):
        write_json(out_dir / METRICS, summary)
        write_json(out_dir / EVAL_HEADLINE, {k: summary[k] for k in HEADLINE if summary.get(k) is not None})
        # comparisons of runs (k-means vs PIC: pipeline.tools.studies) read the last clustering's sizes from here
        sizes = cluster_sizes(epochs_root, summary["epochs"])
        write_json(out_dir / EVAL_CLUSTER_SIZES, {"epoch": summary["epochs"], "method": params.cluster.method,
                                                  "sizes": sorted((int(v) for v in sizes if v > 0), reverse=True)})
        for name, row in score_tables(summary).items():
            write_json(out_dir / "scores" / f"{name}.json", row)
        info = ReportInputs(str(checkpoint), random_source, data, cfg, probe_layers(cfg, nets["trained"]), probes,
                            curves, written, seconds)
        write_report(out_dir / "report.md", summary, info)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    fin = sub.add_parser("final", help="evaluate the run's last network and write the per-epoch curves")
    fin.add_argument("--params", default="params.yaml", help="params file (reads evaluate, extract, pca, cluster, run)")
    fin.add_argument("--dataset", default=DATASET)
    fin.add_argument("--epochs-root", default=EPOCHS_ROOT)
    fin.add_argument("--checkpoint", default=f"{CHECKPOINTS}/{LAST_CHECKPOINT}")
    fin.add_argument("--out", default=EVAL)
    args = parser.parse_args(argv)
    with cli_errors("evaluate"):
        m = run_final_evaluation(load_params(args.params), args.dataset, args.epochs_root, args.checkpoint, args.out)
    print("evaluate: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))


if __name__ == "__main__":
    main()
