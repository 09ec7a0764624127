"""Networks: the paper's AlexNet (BatchNorm, no LRN), VGG-16-BN, and a small AlexNet for 28-96 px.

Every network is a `DeepClusterNet`: optional fixed Sobel input -> conv blocks -> classifier whose
last Linear gives the pre-ReLU fc features that DeepCluster clusters -> a separate top layer that
`train` replaces every epoch.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class Sobel(nn.Module):
    """Fixed grey conversion + horizontal/vertical Sobel filters -> 2 channels (paper Sec. 3.2).

    Weights are buffers, not parameters: no optimizer can ever move them, and they travel in the
    state dict.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("grey", torch.full((1, in_channels, 1, 1), 1.0 / in_channels))
        self.register_buffer("sobel", torch.stack([gx, gx.t()]).unsqueeze(1))  # 2 x 1 x 3 x 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.conv2d(x, self.grey.to(x.dtype))
        return nn.functional.conv2d(x, self.sobel.to(x.dtype), padding=1)


class DeepClusterNet(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, feature_dim: int,
                 in_channels: int, sobel: bool, num_classes: int = 1):
        super().__init__()
        self.sobel = Sobel(in_channels) if sobel else None
        self.features = features
        self.classifier = classifier  # ends with Linear: its output is the pre-ReLU fc feature
        self.feature_dim = feature_dim
        self.top_layer = nn.Linear(feature_dim, num_classes)
        init_weights(self)

    def fc_features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation DeepCluster clusters: last fc layer, before its ReLU."""
        if self.sobel is not None:
            x = self.sobel(x)
        return self.classifier(torch.flatten(self.features(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top_layer(torch.relu(self.fc_features(x)))

    def conv_activations(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Output of every conv block (after BN + ReLU), for layer-wise linear probes.

        upto: stop after that many blocks (the layers above cost time and play no part).
        """
        if self.sobel is not None:
            x = self.sobel(x)
        outs = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                outs.append(x)
                if upto is not None and len(outs) >= upto:
                    break
        return outs

    def reset_top_layer(self, num_classes: int) -> nn.Linear:
        """A fresh head for this epoch's clusters: N(0, 0.01) weights, zero bias."""
        device = next(self.classifier.parameters()).device
        self.top_layer = nn.Linear(self.feature_dim, num_classes).to(device)
        self.top_layer.weight.data.normal_(0, 0.01)
        self.top_layer.bias.data.zero_()
        return self.top_layer

    def body_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("top_layer.")]


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, pad), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


# Each architecture: its conv blocks on `cin` input channels (2 behind Sobel), and the width of its fc layers.
def alexnet(cin: int, **_) -> tuple[nn.Sequential, int]:
    return nn.Sequential(
        *_conv_bn(cin, 96, 11, 4, 2), nn.MaxPool2d(3, 2),
        *_conv_bn(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2),
        *_conv_bn(256, 384, 3, 1, 1), *_conv_bn(384, 384, 3, 1, 1), *_conv_bn(384, 256, 3, 1, 1),
        nn.MaxPool2d(3, 2),
    ), 4096


def vgg16(cin: int, **_) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):  # M: max-pool
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += _conv_bn(cin, v, 3, 1, 1)
            cin = v
    return nn.Sequential(*layers), 4096


def small_alexnet(cin: int, width: int = 32, fc_dim: int = 256, **_) -> tuple[nn.Sequential, int]:
    """AlexNet's five conv blocks and two fc layers, without the stride-4 stem, for 28-96 px images."""
    w = width
    return nn.Sequential(
        *_conv_bn(cin, 2 * w, 5, 1, 2), nn.MaxPool2d(2, 2),
        *_conv_bn(2 * w, 4 * w, 3, 1, 1), nn.MaxPool2d(2, 2),
        *_conv_bn(4 * w, 6 * w, 3, 1, 1), *_conv_bn(6 * w, 6 * w, 3, 1, 1), *_conv_bn(6 * w, 4 * w, 3, 1, 1),
        nn.MaxPool2d(2, 2),
    ), fc_dim


ARCHITECTURES = {"alexnet": alexnet, "vgg16": vgg16, "small_alexnet": small_alexnet}


def build_model(model_params: dict, in_channels: int, image_size: int) -> DeepClusterNet:
    arch = model_params["arch"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}: choose one of {sorted(ARCHITECTURES)}")
    sobel, dropout = model_params.get("sobel", True), model_params.get("dropout", 0.5)
    cin = 2 if sobel else in_channels
    features, fc_dim = ARCHITECTURES[arch](cin, **{k: v for k, v in model_params.items() if k != "arch"})
    # The flattened conv output's size from a forward pass on the meta device: no compute, and the
    # BatchNorm running statistics of the real network are never touched by a dummy batch.
    try:
        with torch.no_grad():
            probe = copy.deepcopy(features).to("meta")
            d = int(probe(torch.zeros(1, cin, image_size, image_size, device="meta")).numel())
    except RuntimeError as e:  # too small an input for the architecture's strides
        raise ValueError(f"model.arch {arch!r} cannot take {image_size}px images ({e}); use small_alexnet "
                         "for 28-96 px or raise the crop size") from e
    # The official AlexNet drops out the conv features before the first fc layer; its VGG-16 does not.
    first = [] if arch == "vgg16" else [nn.Dropout(dropout)]
    classifier = nn.Sequential(*first, nn.Linear(d, fc_dim), nn.ReLU(inplace=True),
                               nn.Dropout(dropout), nn.Linear(fc_dim, fc_dim))
    return DeepClusterNet(features, classifier, fc_dim, in_channels, sobel)
