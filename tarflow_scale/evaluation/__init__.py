"""Evaluation of trained TarFlows: exact bits/dim, seeded sampling, Tweedie denoising, clean-fid FID/KID.

The maths modules (`bpd`, `generate`, `fid`) take plain arguments and never import Ray. `pool` holds the Ray
side (the worker pool and driver progress), `worker` the actor that runs units of work, `jobs` the jobs cut
into resumable units (`units`), `orchestrate` the checks before Ray starts and the whole run, `resolve` the
run config assembled around the checkpoint's, `outputs` what is written (metrics.json, CSV, PNGs, TensorBoard),
`sweep` a FID sweep's files, `sample_sets` the existing images `eval.fid_samples` scores, `precision` the
precision each job runs at, `summary` the training driver's closing bits/dim against PNG. `shard_sampling` (with
its worker, `shard_worker`) draws many samples on the same pool into WebDataset shards (`tarflow-sample --format
shards`).
This package imports nothing eagerly, so `import tarflow_scale.evaluation.bpd` does not pull in Ray.
"""
