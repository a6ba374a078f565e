"""A tiny MONAI UNet shared by the attribution tests (class count and seed as parameters)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

#: Spatial size of the test volumes: small, and not a multiple of the windows used.
SHAPE = (12, 10, 8)


def tiny_unet(out_channels: int = 4, seed: int = 0) -> torch.nn.Module:
    """A two-level UNet with residual units, seeded, in eval mode."""
    torch.manual_seed(seed)
    return UNet(
        spatial_dims=3, in_channels=1, out_channels=out_channels, channels=(4, 8), strides=(2,), num_res_units=1
    ).eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_unet()
