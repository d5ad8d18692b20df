"""A user's model module, as `subgrad train --model user_model_fixture:small_cnn` imports it (tests only)."""

import torch.nn as nn


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)
    )


def not_a_model():
    return "a string"
