"""Shared fixtures: the real MNI152 demo data, built once per test session."""
from __future__ import annotations

import pytest

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
