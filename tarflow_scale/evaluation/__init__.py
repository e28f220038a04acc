"""Evaluation of trained TarFlows: exact bits/dim, seeded sampling, Tweedie denoising, clean-fid FID/KID.

The maths modules (`bpd`, `generate`, `denoise`, `fid`) take plain arguments and never import Ray; `jobs`
spreads them over Ray workers; `resolve` reads checkpoints and configs; `report` writes the metrics JSON.
This package imports nothing eagerly, so `import tarflow_scale.evaluation.bpd` does not pull in Ray.
"""
