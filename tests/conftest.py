"""Shared fixtures. CUDA parameters are skipped without a GPU; nothing queries the GPU at import."""

from __future__ import annotations

import pytest
import torch


def _cuda_param():
    return pytest.param("cuda", marks=pytest.mark.cuda)


DEVICES = ["cpu", _cuda_param()]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
