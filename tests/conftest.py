"""Shared fixtures: the real MNI152 demo data, built once per test session."""
from __future__ import annotations

import warnings

import pytest
import torch

from data.demo import build_mni152_demo


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "mni152"
    build_mni152_demo(root)
    return root


@pytest.fixture(scope="session")
def ct_demo_root(tmp_path_factory):
    """The pseudo-CT demo (configs/demo_3d.yaml, configs/demo_ct_2d.yaml), built once."""
    from data.demo import build_mni152_ct_demo

    root = tmp_path_factory.mktemp("data") / "mni152_ct"
    build_mni152_ct_demo(root)
    return root


def save_feature_network(path, channels: int = 1, activation=torch.relu):
    """A tiny 2D TorchScript feature network returning two layers, saved as a user would save a real one."""
    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Conv2d(channels, 4, 3, padding=1)
            self.second = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)

        def forward(self, x):
            h = activation(self.first(x))
            return h, activation(self.second(h))

    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch>=2.9 marks TorchScript deprecated; FeatureExtractor still loads it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Features()), str(path))
    return path


@pytest.fixture(scope="session")
def perceptual_net(tmp_path_factory):
    return save_feature_network(tmp_path_factory.mktemp("nets") / "features.pt")
