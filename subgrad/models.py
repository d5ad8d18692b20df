"""CIFAR-10 models and a small registry so the CLI and export can rebuild a model from name + config.

* ``lenet``: the seed network, exactly: conv 3->6 5x5, maxpool 2, conv 6->16 5x5, maxpool 2,
  fc 400->120->84->10, ReLU (62,006 parameters).
* ``resnet20``: the CIFAR ResNet-20 of He et al. (2016), 3 stages x 3 basic blocks, 16/32/64 channels,
  option-A (zero-padded identity) shortcuts, global average pool, fc 64->10 (about 0.27 M parameters).
* ``localnet``: a plain convolutional net built for forward-only training with local losses: three
  blocks of conv 3x3 (padding 1), ReLU, 2x2 max-pool (32/64/128 channels: 16x16, 8x8, 4x4 maps), flatten,
  fc 2048->10 (113,738 parameters).  Every block is one layer whose output reaches the next block through
  per-unit operations only, so each of its units moves one patch-and-channel-group local loss
  (:mod:`subgrad.optim.activity_blocks`), and channel counts divide into groups of 2 to 32.

Each model's ``local_blocks()`` is its cut for ``ActivityZO`` (``subgrad.optim.activity_blocks.BlockCut``):
LeNet five blocks, one site each (conv1 -> ReLU -> pool, conv2 -> ReLU -> pool -> flatten, fc1 -> ReLU,
fc2 -> ReLU, fc3); LocalNet one block per conv (conv -> ReLU -> pool; the last one flattens) and the fc;
ResNet-20 the stem (conv, BN, ReLU), each basic block (sites conv1 and conv2) and the pooled fc.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model_names import MODEL_CLASSES, TORCHVISION, model_source


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def local_blocks(self):
        from .optim.activity_blocks import PlainBlock

        kinds = [(self.conv1, "conv"), (self.conv2, "conv-flatten"), (self.fc1, "relu"), (self.fc2, "relu")]
        return [PlainBlock(layer, kind) for layer, kind in kinds] + [PlainBlock(self.fc3, "logits")]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes  # option A: subsample + zero-pad channels, no parameters
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: the input, subsampled and zero-padded to the block's channels where they change."""
        if self.stride != 1 or self.pad:
            return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)

    def local_blocks(self):
        from .optim.activity_blocks import ClassifierBlock, ResidualBlock, StemBlock

        return [StemBlock(self.conv, self.bn)] + [ResidualBlock(b) for b in self.layers] + [ClassifierBlock(self.fc)]


class LocalNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        channels = (3, *widths)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(channels, channels[1:]))
        side = 32 >> len(widths)
        self.fc = nn.Linear(widths[-1] * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.fc(torch.flatten(x, 1))

    def local_blocks(self):
        from .optim.activity_blocks import PlainBlock

        kinds = ["conv"] * (len(self.convs) - 1) + ["conv-flatten"]
        return [PlainBlock(c, k) for c, k in zip(self.convs, kinds)] + [PlainBlock(self.fc, "logits")]


MODELS = {name: globals()[cls] for name, cls in MODEL_CLASSES.items()}


def build_model(name: str, *, code_named: str | None = None, **config) -> nn.Module:
    """A model from its name (:mod:`subgrad.model_names`) and constructor config.  A user's constructor
    (``package.module:callable``) is imported only when ``code_named`` is that same name: the user named it
    on the command line that runs, not a file that was read."""
    source = model_source(name)
    if source == "builtin":
        return MODELS[name](**config)
    if source == "torchvision":
        return torchvision_model(name[len(TORCHVISION) :], **config)
    if code_named != name:
        raise ValueError(
            f"model {name!r} is your code, which subgrad imports only when you name it on the command line: "
            f"add --model {name} (subgrad train --resume) or --code {name} (export, validate, bench)"
        )
    module, _, attr = name.partition(":")
    model = getattr(importlib.import_module(module), attr)(**config)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {name}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def torchvision_model(name: str, num_classes: int = 10) -> nn.Module:
    """A torchvision classification model, untrained, for 32 x 32 images: ResNets take a 3x3 stride-1 stem
    without max-pooling and MobileNetV2 a stride-1 first conv (the CIFAR-10 versions of both; the ImageNet
    stems shrink 32 x 32 to 8 x 8 and 16 x 16 before the first block); other models as torchvision builds
    them."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"--model torchvision:{name}: not a torchvision classification model; see "
            "torchvision.models.list_models(module=torchvision.models)"
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if isinstance(model, torchvision.models.ResNet):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif isinstance(model, torchvision.models.MobileNetV2):
        model.features[0][0].stride = (1, 1)
    return model
