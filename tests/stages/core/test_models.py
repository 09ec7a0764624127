"""stages.core.models: the fixed Sobel input layer, fc features, top-layer reset, raw-pixel ablation."""
from __future__ import annotations

import pytest
import torch

from stages.core.models import Sobel, build_model

SMALL_MODEL = {"arch": "small_alexnet", "sobel": True, "width": 4, "fc_dim": 32, "dropout": 0.5}


def step_image(height: int = 8, width: int = 10, edge: int = 5, channels: int = 1) -> torch.Tensor:
    """0 left of column `edge`, 1 from it on: a vertical edge between columns edge-1 and edge."""
    x = torch.zeros(1, channels, height, width)
    x[..., edge:] = 1.0
    return x


def test_sobel_has_no_trainable_parameters():
    sobel = Sobel(3)
    assert list(sobel.parameters()) == []
    assert {name for name, _ in sobel.named_buffers()} == {"grey", "sobel"}


def test_sobel_is_outside_every_optimizer_of_a_sobel_model():
    model = build_model(SMALL_MODEL, in_channels=3, image_size=28)
    assert model.sobel is not None
    ids = {id(p) for p in model.parameters()}
    assert not any(id(b) in ids for b in model.sobel.buffers())
    assert not any(name.startswith("sobel.") for name, _ in model.named_parameters())
    body = {id(p) for p in model.body_parameters()}
    assert not any(id(b) in body for b in model.sobel.buffers())
    assert not any(id(p) in body for p in model.top_layer.parameters())
    # every other parameter is trained by the body optimizer
    assert body == ids - {id(p) for p in model.top_layer.parameters()}
    # the filters travel with the weights
    assert {"sobel.grey", "sobel.sobel"} <= set(model.state_dict())


def test_sobel_response_to_a_vertical_step_edge():
    # Interior pixel (i, j), cross-correlation with gx = [[1,0,-1],[2,0,-2],[1,0,-1]]:
    #   out = (1+2+1) * x[j-1] - (1+2+1) * x[j+1] = 4 * (x[j-1] - x[j+1]).
    # With the step between columns 4 and 5: column 4 -> 4*(0-1) = -4, column 5 -> 4*(0-1) = -4,
    # every other interior column 0. The vertical filter gx^T sees no change along rows: 0 inside.
    edge = 5
    out = Sobel(1)(step_image(edge=edge))
    assert out.shape == (1, 2, 8, 10)
    gx, gy = out[0, 0, 1:-1, 1:-1], out[0, 1, 1:-1, 1:-1]  # interior: no zero-padding effects
    expected = torch.zeros_like(gx)
    expected[:, edge - 1 - 1] = -4.0  # interior column index = image column - 1
    expected[:, edge - 1] = -4.0
    torch.testing.assert_close(gx.abs(), expected.abs())
    assert (gx[:, edge - 2] * gx[:, edge - 1] > 0).all()  # both edge columns have the same sign
    torch.testing.assert_close(gy, torch.zeros_like(gy))


def test_sobel_response_to_a_horizontal_step_edge_is_the_transpose():
    out = Sobel(1)(step_image(height=10, width=10).transpose(-1, -2))
    vertical_edge = Sobel(1)(step_image(height=10, width=10))
    torch.testing.assert_close(out[0, 1], vertical_edge[0, 0].t())
    torch.testing.assert_close(out[0, 0, 1:-1, 1:-1], torch.zeros(8, 8))


def test_sobel_converts_colour_to_grey_first():
    # A step of height 3 in one of three channels is a grey step of height 1 (equal weights).
    x = torch.zeros(1, 3, 8, 10)
    x[:, 1, :, 5:] = 3.0
    torch.testing.assert_close(Sobel(3)(x), Sobel(1)(step_image()))


@pytest.mark.parametrize("sobel", [True, False])
def test_fc_features_have_fc_dim_and_forward_has_one_output_per_class(sobel):
    model = build_model({**SMALL_MODEL, "sobel": sobel}, in_channels=3, image_size=28).eval()
    x = torch.randn(5, 3, 28, 28)
    feats = model.fc_features(x)
    assert feats.shape == (5, 32) and model.feature_dim == 32
    assert (feats < 0).any()  # pre-ReLU: the clustered features are not rectified
    model.reset_top_layer(7)
    assert model(x).shape == (5, 7)


def test_raw_pixel_ablation_takes_the_raw_channels():
    model = build_model({**SMALL_MODEL, "sobel": False}, in_channels=3, image_size=28)
    assert model.sobel is None
    assert model.features[0].in_channels == 3
    sobel_model = build_model(SMALL_MODEL, in_channels=3, image_size=28)
    assert sobel_model.features[0].in_channels == 2  # the two Sobel channels
    grey = build_model({**SMALL_MODEL, "sobel": False}, in_channels=1, image_size=28)
    assert grey.features[0].in_channels == 1


def test_reset_top_layer_is_small_gaussian_with_zero_bias():
    torch.manual_seed(0)
    model = build_model(SMALL_MODEL, in_channels=1, image_size=28)
    old = model.top_layer
    head = model.reset_top_layer(100)
    assert head is model.top_layer and head is not old
    assert head.weight.shape == (100, 32) and head.bias.shape == (100,)
    w = head.weight.detach()
    # 3200 draws: the standard error of the std estimate is 0.01/sqrt(6400) = 1.25e-4, of the mean 1.8e-4
    assert w.std().item() == pytest.approx(0.01, abs=1e-3)
    assert abs(w.mean().item()) < 1e-3
    assert torch.equal(head.bias.detach(), torch.zeros(100))
    assert head.weight.requires_grad


def test_unknown_arch_and_too_small_images_are_refused():
    with pytest.raises(ValueError, match="unknown model.arch"):
        build_model({**SMALL_MODEL, "arch": "resnet"}, 1, 28)
    with pytest.raises(ValueError, match="cannot take 28px images"):
        build_model({"arch": "alexnet", "sobel": True, "dropout": 0.5}, 3, 28)


@pytest.mark.parametrize("arch", ["small_alexnet", "alexnet"])
def test_building_a_network_leaves_batchnorm_statistics_at_their_initial_values(arch):
    """The flat-size probe used to run a zero batch in train mode, moving every running mean/var."""
    size = 28 if arch == "small_alexnet" else 64
    model = build_model({**SMALL_MODEL, "arch": arch}, 1, size)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for bn in norms:
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert int(bn.num_batches_tracked) == 0
    assert model.training  # and the network is returned in train mode, as built


# The official facebookresearch/deepcluster classifiers (models/alexnet.py, models/vgg16.py), written out
# by hand; the top layer is separate in both. Ours stop before the last ReLU (fc_features is pre-ReLU),
# which forward applies: layer_list appends it.
OFFICIAL_CLASSIFIERS = {
    "alexnet": [("Dropout", 0.5), ("Linear", 9216, 4096), ("ReLU",), ("Dropout", 0.5), ("Linear", 4096, 4096),
                ("ReLU",)],
    "vgg16": [("Linear", 25088, 4096), ("ReLU",), ("Dropout", 0.5), ("Linear", 4096, 4096), ("ReLU",)],
}


def layer_list(classifier: torch.nn.Sequential) -> list[tuple]:
    def describe(m):
        if isinstance(m, torch.nn.Linear):
            return ("Linear", m.in_features, m.out_features)
        return ("Dropout", m.p) if isinstance(m, torch.nn.Dropout) else (type(m).__name__,)
    return [describe(m) for m in classifier] + [("ReLU",)]


@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
def test_classifier_layers_are_the_official_ones(arch):
    with torch.device("meta"):  # the shapes at 224 px without allocating VGG-16's 120M weights
        model = build_model({"arch": arch, "sobel": True, "dropout": 0.5}, 3, 224)
    assert layer_list(model.classifier) == OFFICIAL_CLASSIFIERS[arch]


def test_small_alexnet_classifier_is_alexnets_at_its_own_widths():
    model = build_model(SMALL_MODEL, 1, 28)
    d = model.classifier[1].in_features
    assert layer_list(model.classifier) == [("Dropout", 0.5), ("Linear", d, 32), ("ReLU",), ("Dropout", 0.5),
                                            ("Linear", 32, 32), ("ReLU",)]
