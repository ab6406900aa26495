"""DiT scaling-law harness: models, diffusion, Gflops, training, FID, sweeps and reports."""

__version__ = "0.1.0"
