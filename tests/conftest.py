"""Test-wide settings."""

import torch

# The tests use small models, for which a second intra-op thread gains little, and OpenMP threads that
# spin on a busy 2-core machine make tiny ops a hundred times slower. One thread keeps timings stable.
torch.set_num_threads(1)
