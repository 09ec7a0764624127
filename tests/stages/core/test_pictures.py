"""stages.core.pictures: every picture is written as a valid, non-empty PNG; the filter maths is right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages.core import pictures
from stages.core.models import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 100 and im.height > 100
        assert np.asarray(im.convert("L")).std() > 1.0  # not a blank canvas


def small_net(sobel: bool, channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return build_model({"arch": "small_alexnet", "sobel": sobel, "width": 4, "fc_dim": 16}, channels, 28).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Real images: sklearn's 8x8 digits scaled up to 28x28 uint8, N x H x W x 1."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:200].astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=28, mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- conv1 filters
def test_sobel_conv1_filters_compose_to_the_pixel_space_filter(images):
    """grey -> Sobel -> conv1 equals one convolution of the grey image with first_layer_filters."""
    model = small_net(sobel=True)
    filters = pictures.first_layer_filters(model)  # O x 7 x 7 x 1
    conv1 = model.features[0]
    assert filters.shape == (conv1.out_channels, 7, 7, 1)
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        through_net = conv1(model.sobel(x)) - conv1.bias.view(1, -1, 1, 1)
        composed = F.conv2d(x, torch.from_numpy(filters).permute(0, 3, 1, 2).float())
    # the network pads Sobel and conv1 separately; away from the border both are the same linear map
    torch.testing.assert_close(through_net[..., 3:-3, 3:-3], composed, atol=1e-4, rtol=1e-4)


def test_raw_input_conv1_filters_are_the_weights_themselves():
    model = small_net(sobel=False, channels=3)
    filters = pictures.first_layer_filters(model)
    w = model.features[0].weight.detach().numpy()
    assert filters.shape == (w.shape[0], 5, 5, 3)
    np.testing.assert_array_equal(filters, w.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("sobel,channels", [(True, 1), (False, 1), (False, 3)])
def test_conv1_filter_picture_for_sobel_and_raw_networks(tmp_path, sobel, channels):
    path = pictures.plot_conv1_filters({"random init": small_net(sobel, channels, 0),
                                        "trained": small_net(sobel, channels, 1)}, tmp_path / "conv1.png")
    assert_png(path)


# ---------------------------------------------------------------- filters: top images, gradient ascent
def test_pick_filters_prefers_selective_live_filters_that_respond_to_different_things():
    rng = np.random.default_rng(0)
    cmax = rng.uniform(0.0, 1.0, size=(300, 6)).astype(np.float32)
    cmax[:, 0] = 0.0  # dead filter
    cmax[:9, 1] = 50.0  # very selective
    cmax[:, 2] = cmax[:, 1] * 0.99 + rng.uniform(0.0, 0.01, 300)  # a near copy of filter 1
    cmax[100:109, 3] = 20.0  # selective, for other images
    picked = pictures.pick_filters(cmax, 3)
    assert len(set(picked.tolist())) == 3 and 0 not in picked
    # filter 2 is more selective than 4 and 5 but repeats filter 1: it only fills up at the end
    assert picked[0] == 1 and picked[1] == 3 and picked[2] in (4, 5)
    assert pictures.pick_filters(cmax, 5).tolist()[-1] == 2
    top = pictures.top_images(cmax, picked, 9)
    assert top.shape == (3, 9) and set(top[0]) == set(range(9))


def test_gradient_ascent_raises_the_target_filters_share(images):
    model = small_net(sobel=True)
    filters = np.array([0, 3, 5])
    kw = dict(size=28, channels=1, mean=[0.5], std=[0.25])
    start = pictures.gradient_ascent(model, "conv3", filters, steps=0, **kw)
    synth = pictures.gradient_ascent(model, "conv3", filters, steps=60, lr=0.1, seed=0, **kw)
    assert synth.shape == (3, 28, 28, 1) and synth.min() >= 0.0 and synth.max() <= 1.0

    def share(img):
        x = (torch.from_numpy(img).permute(0, 3, 1, 2) - 0.5) / 0.25
        with torch.no_grad():
            probs = model.conv_activations(x)[2].mean(dim=(2, 3)).softmax(1)
        return probs[torch.arange(3), torch.from_numpy(filters)]

    assert (share(synth) > share(start)).all()
    assert all(p.requires_grad for p in model.parameters())  # the network is left trainable as it was


def test_filter_panel_picture(tmp_path, images):
    top = images[:27].reshape(3, 9, 28, 28, 1)
    synth = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    assert_png(pictures.plot_filter_panel(synth, top, np.array([4, 7, 9]), "conv3", tmp_path / "f.png"))
    assert_png(pictures.plot_filter_panel(None, top, np.array([4, 7, 9]), "conv5", tmp_path / "g.png"))


# ---------------------------------------------------------------- neighbours, clusters, curves
def test_neighbours_picture(tmp_path, images):
    labels = np.arange(len(images)) % 10
    neigh = images[10:58].reshape(6, 8, 28, 28, 1)
    panels = {"random init": (neigh, labels[10:58].reshape(6, 8)), "trained": (neigh[::-1], None)}
    path = pictures.plot_neighbours(images[:6], labels[:6], panels, tmp_path / "nn.png", [str(i) for i in range(10)])
    assert_png(path)


def test_cluster_size_picture(tmp_path):
    sizes = np.random.default_rng(0).integers(0, 400, size=100)
    sizes[:3] = 0
    assert_png(pictures.plot_cluster_sizes(sizes, tmp_path / "sizes.png", epoch=12))


def test_epoch_curves_picture_with_missing_first_nmi(tmp_path):
    curves = pd.DataFrame({"epoch": [1, 2, 3, 4], "nmi_previous": [None, 0.4, 0.55, 0.6],
                           "nmi_labels": [0.3, 0.35, 0.4, 0.42], "train_loss": [4.5, 4.0, 3.6, 3.3],
                           "pseudo_label_accuracy": [0.02, 0.05, 0.1, 0.15]})
    assert_png(pictures.plot_epoch_curves(curves, tmp_path / "curves.png"))


def test_cluster_samples_are_members_and_the_picture_is_written(tmp_path, images):
    clusters = np.arange(len(images)) % 13
    labels = np.arange(len(images)) % 10
    rows = pictures.sample_clusters(clusters, n_clusters=5, per_cluster=6, seed=0, labels=labels,
                                    class_names=[f"class {i}" for i in range(10)])
    assert len(rows) == 5
    for title, members in rows:
        cluster_id = int(title.split()[1])
        assert (clusters[members] == cluster_id).all() and len(set(members)) == len(members) == 6
        assert "n=" in title and "class" in title
    assert_png(pictures.plot_cluster_samples([(t, images[m]) for t, m in rows], tmp_path / "samples.png"))


def test_epoch_curves_picture_of_a_single_unlabelled_epoch(tmp_path):
    curves = pd.DataFrame({"epoch": [1], "nmi_previous": [None], "nmi_labels": [None], "train_loss": [4.6]})
    assert_png(pictures.plot_epoch_curves(curves, tmp_path / "curves.png"))
