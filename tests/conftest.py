"""Suite-wide settings."""

from __future__ import annotations

import torch

# One intra-op thread per process: the suite runs next to Ray workers on small machines, where
# oversubscribed OpenMP threads make tiny 3D convolutions many times slower, not faster.
torch.set_num_threads(1)
