"""Evaluation: bits/dim against analytic densities and exactly once across Ray workers, worker-independent
seeded sampling, Tweedie denoising against the analytic posterior mean, clean-fid FID/KID through our wrapper,
and the errors bad input gets. Models with known densities: a TarFlow with zero output heads is the identity
flow, so its density is its prior, N(0, s^2) per dimension with model.prior=learned and log_std = log s."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tarflow_scale.cli.eval as eval_cli
from tarflow_scale.artifacts import read_provenance, save_export
from tarflow_scale.artifacts.checkpoints import write_complete_marker
from tarflow_scale.artifacts.weights import file_sha256
from tarflow_scale.config import ConfigError, DataConfig, Guidance, RunConfig, TarFlowConfig, dump_config
from tarflow_scale.data import make_eval_loader, read_manifest, write_split
from tarflow_scale.data.sources import ArraySource
from tarflow_scale.evaluation import fid as fidlib
from tarflow_scale.evaluation.bpd import batch_bits_per_dim, summarize
from tarflow_scale.evaluation.generate import NonFiniteSamplesError, generate, redraw_seed
from tarflow_scale.evaluation.resolve import default_out_dir, resolve_config
from tarflow_scale.models.tarflow import TarFlow
from tarflow_scale.sampling import per_sample_noise, score, tweedie_denoise

SIZE, CLASSES = 8, 3  # tiny 8x8 RGB images, 3 classes
NUM_VAL, NUM_TRAIN, PER_SHARD = 37, 40, 8  # 37: not a multiple of the shard size, the workers or the parts
DATA_STD = 0.3  # pixels in [-1, 1] drawn from N(0, DATA_STD^2) before quantisation
TRAIN_NOISE = 0.05  # the Gaussian noise the "trained" models claim in their embedded run config


def tiny_config(**overrides) -> TarFlowConfig:
    fields = dict(image_size=SIZE, patch_size=2, channels=32, num_blocks=2, layers_per_block=1, head_dim=16)
    return TarFlowConfig(**{**fields, **overrides})


def gaussian_model(std: float, **overrides) -> TarFlow:
    """The identity flow (zero heads) with prior N(0, std^2): p(x) = N(x; 0, std^2 I) exactly."""
    model = TarFlow(tiny_config(prior="learned", **overrides))
    with torch.no_grad():
        model.prior.log_std.fill_(math.log(std))
    return model.eval()


def random_model(seed: int = 0, model_class: type[TarFlow] = TarFlow, **overrides) -> TarFlow:
    """Non-zero heads, so sampling, guidance and the score do real work."""
    torch.manual_seed(seed)
    model = model_class(tiny_config(**overrides))
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)
    return model.eval()


def export(model: TarFlow, path: Path, data_path: str = "bundled", noise: str = "gaussian") -> Path:
    run = RunConfig(model=model.config, data=DataConfig(path=data_path, noise=noise, noise_std=TRAIN_NOISE))
    return save_export(model.state_dict(), run, path, source="test", tag="test", ema=False)


def gaussian_pixels(n: int, seed: int) -> np.ndarray:
    """(n, H, W, 3) uint8: N(0, DATA_STD^2) in [-1, 1], quantised to 8 bits."""
    x = np.random.default_rng(seed).normal(0.0, DATA_STD, size=(n, SIZE, SIZE, 3))
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """train (40) and val (37) splits of Gaussian 8x8 images with 3 classes, in shards of 8."""
    root = str(tmp_path_factory.mktemp("gauss_data"))
    for split, n, seed in (("val", NUM_VAL, 1), ("train", NUM_TRAIN, 2)):
        source = ArraySource(
            images=gaussian_pixels(n, seed),
            labels=np.arange(n) % CLASSES,
            keys=[f"{split}{i:04d}" for i in range(n)],
            num_classes=CLASSES,
            class_names=[f"c{k}" for k in range(CLASSES)],
            description={"test": split},
        )
        write_split(root, source, name="gauss", split=split, samples_per_shard=PER_SHARD, progress=False)
    return root


@pytest.fixture(scope="module")
def ray_session():
    """One embedded 2-CPU Ray cluster for the whole file (evaluate() joins it instead of starting its own)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def load_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    cfg = DataConfig(path=root, num_workers=0)
    images, labels, keys = zip(*make_eval_loader(cfg, 64, 0, 1, split=split))
    return torch.cat(images), torch.cat(labels), [k for ks in keys for k in ks]


# ----------------------------------------------------------------------------------------------------------
# Bits/dim


def test_bpd_equals_analytic_value_for_a_gaussian_density(dataset):
    """p = N(0, s^2): E_v[-log p(x)] is analytic given the 8-bit pixels u, for x = (u + v)/128 - 1 (dequantized)
    and for x = u/127.5 - 1 + sigma eps (noisy data); both carry the -D log(2/256) discretisation term."""
    s = 0.5
    model = gaussian_model(s, num_classes=CLASSES)
    images, labels, keys = load_split(dataset, "val")
    D = 3 * SIZE * SIZE
    u = images.double().flatten(1)
    const = D * (math.log(s) + 0.5 * math.log(2 * math.pi)) - D * math.log(2 / 256)

    a, w = u / 128 - 1, 1 / 128  # x = a + w v with v ~ U[0, 1): E[x^2] = a^2 + a w + w^2 / 3
    analytic = ((a**2 + a * w + w**2 / 3).sum(1) / (2 * s**2) + const) / (D * math.log(2))
    got = batch_bits_per_dim(model, images, labels, keys, kind="uniform", num_draws=16, seed=3)
    assert got.dtype == torch.float64 and got.shape == (NUM_VAL,)
    torch.testing.assert_close(got, analytic, atol=2e-3, rtol=0)  # per image: 16 draws of noise
    assert abs(got.mean() - analytic.mean()) < 3e-4  # 37 x 16 draws; a wrong bin width or offset is off by >1e-2

    b = u / 127.5 - 1  # E[(b + sigma eps)^2] = b^2 + sigma^2
    analytic_noisy = (((b**2).sum(1) + D * TRAIN_NOISE**2) / (2 * s**2) + const) / (D * math.log(2))
    noisy = batch_bits_per_dim(model, images, labels, keys, kind="gaussian", noise_std=TRAIN_NOISE, num_draws=16)
    assert abs(noisy.mean() - analytic_noisy.mean()) < 1e-3

    # The noise belongs to the image key, not the batch: any split into batches gives the same numbers.
    halves = [batch_bits_per_dim(model, images[i::2], labels[i::2], keys[i::2], num_draws=16, seed=3) for i in (0, 1)]
    torch.testing.assert_close(torch.stack([halves[i % 2][i // 2] for i in range(NUM_VAL)]), got)

    stats = summarize(got.numpy())
    assert stats["num_images"] == NUM_VAL
    assert stats["stderr"] == pytest.approx(got.numpy().std(ddof=1) / math.sqrt(NUM_VAL))


# ----------------------------------------------------------------------------------------------------------
# Sampling


def test_guidance_zero_is_plain_conditional_sampling_and_guidance_changes_samples():
    model = random_model(num_classes=CLASSES)
    indices = [5, 0, 7, 3]
    eps = per_sample_noise(indices, (3, SIZE, SIZE), seed=11)
    labels = torch.tensor(indices) % CLASSES
    plain = model.sample(eps, y=labels)
    # attn_temp only shapes the guiding pass: with w = 0 it must not matter.
    for guidance in (Guidance(), Guidance(0.0, annealed=True, attn_temp=0.3)):
        images, got_labels, redrawn = generate(model, indices, guidance, seed=11)
        torch.testing.assert_close(images, plain, rtol=0, atol=1e-6)
        assert got_labels.tolist() == labels.tolist() and redrawn == 0
    guided, _, _ = generate(model, indices, Guidance(2.0), seed=11)
    assert (guided - plain).abs().max() > 1e-3
    # Batch-size independence: sample k is the same alone or in a batch.
    alone, _, _ = generate(model, [7], Guidance(2.0), seed=11)
    torch.testing.assert_close(alone[0], guided[2], rtol=0, atol=1e-5)


def test_unconditional_guidance_by_attention_temperature():
    model = random_model(num_classes=0)
    plain, labels, _ = generate(model, [0, 1, 2], seed=1)
    assert labels is None
    same, _, _ = generate(model, [0, 1, 2], Guidance(1.0, attn_temp=1.0), seed=1)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)  # guiding pass identical to the conditional one
    hot, _, _ = generate(model, [0, 1, 2], Guidance(1.0, attn_temp=3.0), seed=1)
    assert (hot - plain).abs().max() > 1e-4


def test_nonfinite_samples_are_redrawn_with_derived_seeds_and_counted():
    model = random_model(num_classes=0)
    real_sample = model.sample

    def poisoned(eps, **kwargs):  # a NaN image whenever the noise's first value is large (depends on k alone)
        images = real_sample(eps, **kwargs)
        images[eps[:, 0, 0, 0] > 0.5] = float("nan")
        return images

    model.sample = poisoned
    indices = list(range(12))
    seed = 4
    images, _, redrawn = generate(model, indices, seed=seed, max_redraws=50)
    assert torch.isfinite(images).all()

    # Expected: replay the per-index seeds attempt by attempt.
    expected, final_seed = 0, {}
    for k in indices:
        attempt = 0
        while per_sample_noise([k], (3, SIZE, SIZE), redraw_seed(seed, attempt))[0, 0, 0, 0] > 0.5:
            attempt += 1
        expected += attempt
        final_seed[k] = redraw_seed(seed, attempt)
    assert redrawn == expected > 0
    for k in indices:  # every sample equals the plain sample of its final seed
        want = real_sample(per_sample_noise([k], (3, SIZE, SIZE), final_seed[k]))
        torch.testing.assert_close(images[k : k + 1], want, rtol=0, atol=1e-5)
    with pytest.raises(NonFiniteSamplesError, match="max_redraws"):
        generate(model, indices, seed=seed, max_redraws=0)


# ----------------------------------------------------------------------------------------------------------
# Denoising


def test_tweedie_step_gives_the_analytic_posterior_mean():
    """x = x0 + sigma eps with x0 ~ N(0, s0^2): the noisy marginal is N(0, s0^2 + sigma^2); a model with that
    density moves x to E[x0 | x] = x s0^2 / (s0^2 + sigma^2)."""
    s0, sigma = 0.4, 0.1
    model = gaussian_model(math.sqrt(s0**2 + sigma**2))
    g = torch.Generator().manual_seed(0)
    x0 = s0 * torch.randn(64, 3, SIZE, SIZE, generator=g)
    x = x0 + sigma * torch.randn(x0.shape, generator=g)
    denoised = tweedie_denoise(model, x, sigma)
    torch.testing.assert_close(denoised, x * s0**2 / (s0**2 + sigma**2), rtol=1e-5, atol=1e-6)
    # The posterior mean is the MMSE estimate: its error is the posterior variance, below the noise's.
    mse = (denoised - x0).pow(2).mean().item()
    assert mse == pytest.approx(s0**2 * sigma**2 / (s0**2 + sigma**2), rel=0.05)
    assert mse < (x - x0).pow(2).mean().item()
    torch.testing.assert_close(tweedie_denoise(model, x, sigma, step=0.0), x)
    torch.testing.assert_close(tweedie_denoise(model, x, sigma, step=2.0) - x, 2 * (denoised - x), rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # the score works inside no_grad (sampling code runs there)
        torch.testing.assert_close(tweedie_denoise(model, x, sigma), denoised)


def test_tweedie_micro_batches_give_the_unbatched_result():
    """eval.denoise_batch_size bounds the backward pass's memory; the result must not depend on it."""
    model = random_model(seed=3, num_classes=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, SIZE, SIZE, generator=g)
    y = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0, 1])  # including null labels
    whole = tweedie_denoise(model, x, 0.1, y)
    assert (whole - x).abs().max() > 1e-4  # the step did real work
    for batch_size in (1, 3, 4, 10, 64):  # uneven last parts, and one larger than the batch
        parts = tweedie_denoise(model, x, 0.1, y, batch_size=batch_size)
        assert torch.equal(parts, whole), batch_size  # bitwise on CPU: each image's score is its own
    uncond = random_model(seed=4)
    torch.testing.assert_close(tweedie_denoise(uncond, x, 0.1, batch_size=3), tweedie_denoise(uncond, x, 0.1))
    with pytest.raises(ValueError, match="batch_size must be >= 0"):
        tweedie_denoise(model, x, 0.1, y, batch_size=-1)


def test_score_matches_finite_differences_of_log_prob():
    model = random_model(num_classes=CLASSES).double()
    x = 0.5 * torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    y = torch.tensor([1, 2])
    grad = score(model, x, y)
    h = 1e-5
    for b, c, i, j in ((0, 0, 0, 0), (1, 2, 5, 3), (0, 1, 7, 7)):
        e = torch.zeros_like(x)
        e[b, c, i, j] = h
        with torch.no_grad():
            fd = (model.log_prob(x + e, y)[b] - model.log_prob(x - e, y)[b]) / (2 * h)
        assert grad[b, c, i, j].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------------------------------------
# FID


def _closed_form_fid(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^(1/2) S2 S1^(1/2))^(1/2)), via symmetric eigendecompositions."""

    def sqrtm_psd(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r = sqrtm_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm_psd(r @ s2 @ r)))


def test_frechet_distance_matches_closed_form_and_streamed_stats_are_exact():
    rng = np.random.default_rng(0)
    d = 5
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert fidlib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), rel=1e-6)
    assert fidlib.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)

    # Streaming: uneven batches merged in any order give np.mean / np.cov of everything.
    feats = rng.multivariate_normal(mu1, s1, size=20_000)
    cuts = [0, 1, 7, 300, 5000, 12_345, 20_000]
    parts = [fidlib.FeatureStats().add(feats[i:j]) for i, j in zip(cuts, cuts[1:])]
    merged = fidlib.FeatureStats()
    for p in reversed(parts):
        merged = merged.merge(p)
    np.testing.assert_allclose(merged.mean, feats.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.covariance, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)
    # And samples of the two Gaussians: the empirical FID approaches the closed form.
    other = fidlib.FeatureStats().add(rng.multivariate_normal(mu2, s2, size=20_000))
    empirical = fidlib.frechet_distance(merged.mean, merged.covariance, other.mean, other.covariance)
    assert empirical == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), rel=0.05)


class TinyExtractor(torch.nn.Module):
    """A small deterministic feature network for clean-fid's custom-extractor hook: (B, 3, 299, 299) in
    [0, 255] -> 4x4 average pooling -> fixed random projection to 8 features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 8)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x / 255, 4).flatten(1))


def _features(images: torch.Tensor, extractor) -> fidlib.FeatureStats:
    return fidlib.FeatureStats().add(fidlib.extract_features(images, extractor, "cpu"))


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 8, 8) uint8 images with large-scale structure the pooled features see."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 2, 2, generator=g) * 200 + 25
    return torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear").round().to(torch.uint8)


def test_fid_with_a_custom_extractor_is_zero_on_itself_grows_with_noise_and_matches_clean_fid_files(tmp_path):
    from cleanfid import fid as cleanfid_fid

    extractor = TinyExtractor().eval()
    images = _smooth_images(48, seed=0)
    ref = _features(images, extractor)
    ref_stats = fidlib.ReferenceStats(ref.mean, ref.covariance, np.zeros((0, 8)), {})
    assert fidlib.fid_and_kid(ref, ref_stats, seed=0)["fid"] == pytest.approx(0.0, abs=1e-6)

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=g)
    noisy = {s: (images.float() + s * noise).clamp(0, 255).round().to(torch.uint8) for s in (8, 32, 96)}
    fids = [fidlib.fid_and_kid(_features(noisy[s], extractor), ref_stats, 0)["fid"] for s in (8, 32, 96)]
    assert 0 < fids[0] < fids[1] < fids[2]

    # The in-memory path equals clean-fid's own folder path (PNG files -> clean resize -> the same hook).
    for name, batch in (("a", images), ("b", noisy[32])):
        (tmp_path / name).mkdir()
        for i, image in enumerate(batch):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i:03d}.png")
    files = cleanfid_fid.compute_fid(
        str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", custom_feat_extractor=extractor,
        num_workers=0, batch_size=16, device=torch.device("cpu"), verbose=False,
    )  # fmt: skip
    assert fids[1] == pytest.approx(files, rel=1e-6)


def test_kid_is_seeded_and_separates_sets():
    rng = np.random.default_rng(0)
    # 100 subsets of 100 rows; b is larger, so which of its rows are drawn depends on the seed.
    a, b = rng.normal(size=(100, 8)), rng.normal(size=(250, 8))
    far = rng.normal(size=(100, 8)) + 1.0
    state = np.random.get_state()
    assert fidlib.kernel_distance(a, b, seed=5) == fidlib.kernel_distance(a, b, seed=5)
    assert fidlib.kernel_distance(a, b, seed=5) != fidlib.kernel_distance(a, b, seed=6)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG is left as it was
    assert abs(fidlib.kernel_distance(a, b, seed=5)) < 0.1 * fidlib.kernel_distance(a, far, seed=5)
    assert fidlib.kernel_distance(a[:1], b, seed=0) is None


def test_reference_stats_round_trip_and_errors(tmp_path):
    feats = np.random.default_rng(0).normal(size=(20, 4))
    stats = fidlib.FeatureStats().add(feats, ids=list(range(20)), keep=[True] * 20)
    path = fidlib.save_reference(tmp_path / "ref.npz", stats, {"extractor": "x", "image_size": 8})
    ref = fidlib.load_reference(path, {"extractor": "x", "image_size": 8})
    np.testing.assert_allclose(ref.sigma, stats.covariance)
    assert ref.kid_features.shape == (20, 4) and ref.meta["num"] == 20
    with pytest.raises(fidlib.FidError, match="image_size: file 8, now 16"):
        fidlib.load_reference(path, {"image_size": 16})
    with pytest.raises(fidlib.FidError, match="fid_stats"):
        fidlib.load_reference(tmp_path / "missing.npz", {})
    with pytest.raises(fidlib.FidError, match="eval.fid_reference"):
        fidlib.default_reference_path("pipe:curl -s https://host/{file}", "train", "inception", 64)


def test_missing_inception_weights_say_what_to_do(tmp_path):
    with pytest.raises(fidlib.FidError, match=r"(?s)not found at .*inception-2015-12-05.pt.*eval.inception_path"):
        fidlib.build_extractor("inception", "cpu", str(tmp_path))


INCEPTION = fidlib.resolve_inception_path("")


@pytest.mark.skipif(
    not INCEPTION.is_file(), reason=f"Inception weights {INCEPTION} absent (offline machine; no downloads in tests)"
)
def test_real_inception_features():
    extractor = fidlib.build_extractor("inception", "cpu")
    images = _smooth_images(4, seed=0)
    feats = fidlib.extract_features(images, extractor, "cpu")
    assert feats.shape == (4, 2048) and np.isfinite(feats).all()
    again = fidlib.extract_features(images, extractor, "cpu")
    np.testing.assert_allclose(feats, again, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Configs and bad input (no Ray needed: every check runs before workers start)


def test_config_model_section_must_match_the_checkpoint(tmp_path, dataset):
    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", data_path=dataset)
    info = read_provenance(path)
    config = resolve_config(info, None, ["eval.jobs=[sample]", "cluster.num_workers=3"])
    assert config.model == info.model_config and config.data.path == dataset  # from the checkpoint's run config
    assert config.cluster.num_workers == 3  # no training batch-divisibility check for evaluation
    with pytest.raises(ConfigError, match=r"(?s)model.channels: config 64, checkpoint 32.*model.num_classes"):
        resolve_config(info, None, ["model.channels=64"])
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps({"model": {**tiny_config(num_classes=CLASSES).__dict__}, "eval": {"num_samples": 4}}))
    assert resolve_config(info, good, []).eval.num_samples == 4
    with pytest.raises(ConfigError, match="unknown config key eval.num_sample"):
        resolve_config(info, None, ["eval.num_sample=3"])

    # A training checkpoint folder (or its run directory) carries config.yaml: the same resolution applies.
    folder = tmp_path / "run" / "checkpoint_000003"
    folder.mkdir(parents=True)
    dump_config(
        RunConfig(model=tiny_config(num_classes=CLASSES), data=DataConfig(path=dataset)), folder / "config.yaml"
    )
    (folder / "latest").write_text("global_step30")
    write_complete_marker(folder, step=3, world_size=2)  # as the trainer seals every checkpoint it finishes
    for given in (folder, folder.parent):
        info = read_provenance(given)
        assert (info.kind, info.resolved, info.metadata["tag"]) == ("training_checkpoint", folder, "global_step30")
        assert resolve_config(info, None, []).model == tiny_config(num_classes=CLASSES)
    assert default_out_dir(read_provenance(folder)) == folder.parent.resolve() / "eval"


def test_a_partial_model_section_lists_only_the_keys_that_differ(tmp_path):
    """A model section is filled in with the defaults a training run gets: a checkpoint of the default model and
    `model.channels=64` differ in model.channels only (no spurious model.mixer line)."""
    default_model = RunConfig().model  # what a run config without a model section trains
    path = export(TarFlow(default_model), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError) as info:
        resolve_config(read_provenance(path), None, ["model.channels=64"])
    listed = [line.strip() for line in str(info.value).splitlines() if line.strip().startswith("model.")]
    assert listed == [f"model.channels: config 64, checkpoint {default_model.channels}"]
    assert resolve_config(read_provenance(path), None, [f"model.channels={default_model.channels}"])


def test_cli_errors_and_dry_run(tmp_path, dataset, capsys):
    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", data_path=dataset, noise="uniform")
    assert eval_cli.main([str(path), "--dry-run", "eval.num_samples=5"]) == 0
    assert "num_samples: 5" in capsys.readouterr().out
    assert eval_cli.main([str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_cli.main([str(path), "model.patch_size=4"]) == 2
    assert "model.patch_size: config 4, checkpoint 2" in capsys.readouterr().err
    # Trained with uniform noise: nothing for the Tweedie step to remove.
    assert eval_cli.main([str(path), "eval.jobs=[denoise]"]) == 2
    assert "eval.denoise_noise_std" in capsys.readouterr().err
    assert eval_cli.main([str(path), "eval.jobs=[fid]", f"eval.inception_path={tmp_path}"]) == 2
    assert "Inception weights not found" in capsys.readouterr().err
    missing = tmp_path / "stats.npz"
    args = [str(path), "eval.jobs=[fid]", "eval.fid_feature_extractor=pooled_pixels", f"eval.fid_reference={missing}"]
    assert eval_cli.main(args) == 2
    assert "eval.jobs=[fid_stats,fid]" in capsys.readouterr().err
    wrong = export(random_model(num_classes=0, image_size=16), tmp_path / "w.safetensors", data_path=dataset)
    assert eval_cli.main([str(wrong), "eval.jobs=[bpd]"]) == 2
    assert "3x16x16" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The whole evaluation on Ray workers


def _run(path: Path, out: Path, *overrides: str) -> dict:
    assert eval_cli.main([str(path), "--out", str(out), *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_full_evaluation_is_exact_once_and_independent_of_the_worker_count(ray_session, tmp_path, dataset):
    model = random_model(seed=3, num_classes=CLASSES)
    path = export(model, tmp_path / "model.safetensors", data_path=dataset)
    common = [
        "data.num_workers=0", "eval.batch_size=4", "eval.num_samples=10", "eval.guidance.weight=1.5",
        "eval.guidance.annealed=true", "eval.fid_num_samples=24", "eval.kid_max_features=16",
        "eval.fid_feature_extractor=pooled_pixels", "eval.bpd_draws=2", "eval.progress_every_s=0.01",
    ]  # fmt: skip
    two = _run(path, tmp_path / "two", *common, "eval.jobs=[bpd,sample,denoise,fid]", "cluster.num_workers=2")

    # Report: settings, checksum, versions.
    assert two["checkpoint"]["sha256"] == file_sha256(path)
    assert all(two["versions"][p] for p in ("torch", "deepspeed", "ray", "webdataset", "clean-fid", "tarflow-scale"))
    assert two["config"]["eval"]["guidance"]["weight"] == 1.5 and two["cluster"]["num_workers"] == 2
    assert two["results"]["sample"]["settings"]["guidance"] == {"weight": 1.5, "annealed": True, "attn_temp": 1.0}
    assert two["results"]["fid"]["settings"]["decoding"]["mode"] == "sequential"
    assert (two["training_noise"]["noise"], two["training_noise"]["noise_std"]) == ("gaussian", TRAIN_NOISE)
    assert {job: result["precision"] for job, result in two["results"].items()} == {
        "bpd": {"likelihood": "fp32"}, "sample": {"sampling": "fp32"},
        "denoise": {"sampling": "fp32", "tweedie_score": "fp32"}, "fid_stats": {"features": "fp32"},
        "fid": {"sampling": "fp32", "tweedie_score": "fp32", "features": "fp32"},
    }  # fmt: skip

    # BPD: every held-out key exactly once, and the same numbers as one process computing everything.
    bpd = two["results"]["bpd"]
    lines = (tmp_path / "two" / "bpd_per_image.csv").read_text().split()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    manifest = read_manifest(dataset, "val")
    assert sorted(r[0] for r in rows) == [f"val{i:04d}" for i in range(manifest.num_samples)]
    images, labels, keys = load_split(dataset, "val")
    single = batch_bits_per_dim(model, images, labels, keys, kind="uniform", num_draws=2, seed=0)
    by_key = dict(zip(keys, single.tolist()))
    column = header.index("dequantized")
    for r in rows:
        assert float(r[column]) == pytest.approx(by_key[r[0]], abs=1e-6)
    assert bpd["dequantized"]["mean"] == pytest.approx(single.mean().item(), abs=1e-6)
    assert bpd["dequantized"]["num_images"] == NUM_VAL and bpd["dequantized"]["stderr"] > 0
    assert "NOT a discrete-data" in bpd["noisy_data_nll"]["description"]  # trained with Gaussian noise

    # FID: the reference was built from all training images, exactly once, and cached next to the data.
    reference = Path(dataset) / "fid_stats" / f"train-clean-pooled_pixels-{SIZE}px.npz"
    assert two["results"]["fid_stats"]["path"] == str(reference) and reference.is_file()
    train_images, _, _ = load_split(dataset, "train")
    direct = _features(train_images, fidlib.pooled_pixels)
    cached = fidlib.load_reference(reference, {})
    assert cached.meta["num"] == NUM_TRAIN
    np.testing.assert_allclose(cached.mu, direct.mean, rtol=1e-10)
    np.testing.assert_allclose(cached.sigma, direct.covariance, rtol=1e-8, atol=1e-12)
    fid = two["results"]["fid"]
    assert fid["fid"] > 0 and fid["num_generated"] == 24 and fid["kid_num_generated"] == 16
    assert fid["denoised"] and "not FID" in fid["warning"]

    # Model passes per block are recorded: the sequential sampler makes T - 1 in every block of every call
    # (10 samples in chunks of 4: 3 calls; 24 FID samples: 6).
    T, num_blocks = model.config.num_tokens, model.config.num_blocks
    for job, calls in (("sample", 3), ("fid", 6)):
        passes = two["results"][job]["decoding_passes"]
        assert passes["mean_passes_per_block"] == [T - 1] * num_blocks and passes["pass_ratio"] == 1.0
        assert passes["sampling_calls"] == calls

    # One worker: the same samples, the same denoised samples, the same FID; the cached reference is reused.
    one = _run(path, tmp_path / "one", *common, "eval.jobs=[sample,denoise,fid]", "cluster.num_workers=1")
    assert "fid_stats" not in one["results"] and one["cluster"]["num_workers"] == 1
    a, b = np.load(tmp_path / "two" / "samples.npz"), np.load(tmp_path / "one" / "samples.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["denoised"], b["denoised"])
    assert np.array_equal(a["labels"], np.arange(10) % CLASSES)
    assert one["results"]["fid"]["fid"] == fid["fid"]  # units assembled in sample order: exactly equal
    assert one["results"]["fid"]["kid"] == fid["kid"]
    # The grids exist, and the workers' samples equal the library's (batch 10 here vs chunks of 4 there).
    assert (tmp_path / "one" / "samples.png").is_file() and (tmp_path / "one" / "samples_denoised.png").is_file()
    local, _, _ = generate(model, list(range(10)), Guidance(1.5, annealed=True), seed=0)
    np.testing.assert_allclose(a["images"], local.numpy(), rtol=0, atol=1e-5)
    expected_denoised = tweedie_denoise(model, local, TRAIN_NOISE, torch.arange(10) % CLASSES)
    np.testing.assert_allclose(a["denoised"], expected_denoised.numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_an_imported_reference_checkpoint_evaluates_without_further_flags(ray_session, tmp_path, dataset):
    """tarflow-import records what tarflow-eval needs (model, training noise, data path): no flags at eval time."""
    from test_interop import reference_model  # the test's independent implementation of ml-tarflow's Model

    from tarflow_scale.interop.ml_tarflow import import_checkpoint

    src = tmp_path / "gauss_model_2_128_3_2_0.07.pth"  # a reference-style name: patch 2, width 128, sigma 0.07
    torch.save(reference_model(True, CLASSES, seed=2).state_dict(), src)
    path = import_checkpoint(src, tmp_path / "imported.safetensors", [f"data.path={dataset}", "data.num_workers=0"])
    report = _run(path, tmp_path / "eval")
    assert report["training_noise"]["noise"] == "gaussian" and report["training_noise"]["noise_std"] == 0.07
    bpd = report["results"]["bpd"]
    assert bpd["dequantized"]["num_images"] == NUM_VAL and bpd["noisy_data_nll"]["noise_std"] == 0.07
    assert report["results"]["sample"]["num_samples"] == 64 and (tmp_path / "eval" / "samples.png").is_file()


@pytest.mark.slow
def test_interrupted_evaluation_resumes_from_its_units_with_identical_metrics(ray_session, tmp_path, dataset):
    """Each finished unit is on disk; a re-run of the same command computes only the missing ones and reports
    exactly (==, not approx) the metrics of the uninterrupted run."""
    path = export(random_model(seed=4, num_classes=CLASSES), tmp_path / "model.safetensors", data_path=dataset)
    common = [
        "data.num_workers=0", "eval.batch_size=4", "eval.num_samples=8", "eval.fid_num_samples=24",
        "eval.kid_max_features=16", "eval.fid_feature_extractor=pooled_pixels", "eval.progress_every_s=60",
        "eval.jobs=[bpd,sample,fid_stats,fid]", "eval.fid_reference=" + str(tmp_path / "ref.npz"),
    ]  # fmt: skip
    out = tmp_path / "out"
    full = _run(path, out, *common)
    assert all(full["results"][j]["units"]["reused"] == 0 for j in ("bpd", "sample", "fid_stats", "fid"))
    samples = np.load(out / "samples.npz")["images"]
    units = {j: next((out / "units").glob(f"{j}-*")) for j in ("bpd", "sample", "fid_stats", "fid")}
    fid_units = sorted(units["fid"].glob("chunk_*.npz"))
    assert len(fid_units) == 6  # 24 samples in chunks of 4
    # The crash: metrics.json never written, half of the FID chunks and a sample chunk lost.
    (out / "metrics.json").unlink()
    for unit in fid_units[::2] + sorted(units["sample"].glob("chunk_*.npz"))[:1]:
        unit.unlink()
    resumed = _run(path, out, *common)
    assert resumed["results"]["fid"]["units"] == {"folder": str(units["fid"]), "reused": 3, "computed": 3}
    assert resumed["results"]["sample"]["units"]["computed"] == 1
    assert resumed["results"]["bpd"]["units"]["computed"] == 0
    for job in ("sample", "fid"):  # the reused units keep their pass counts
        assert resumed["results"][job]["decoding_passes"] == full["results"][job]["decoding_passes"]
    for job, key in (("fid", "fid"), ("fid", "kid"), ("bpd", "dequantized")):
        assert resumed["results"][job][key] == full["results"][job][key], (job, key)
    assert np.array_equal(np.load(out / "samples.npz")["images"], samples)
    # A changed setting never reuses units computed under another one.
    other = _run(path, tmp_path / "out", *common, "eval.seed=1")
    assert (
        other["results"]["fid"]["units"]["reused"] == 0
        and other["results"]["fid"]["fid"] != full["results"]["fid"]["fid"]
    )


def test_decoding_options_are_checked_against_the_checkpoint_before_any_worker(tmp_path, dataset, capsys):
    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", data_path=dataset)
    assert eval_cli.main([str(path), "eval.jobs=[sample]", "eval.decoding.sequential_blocks=[9]"]) == 2
    assert "eval.decoding.sequential_blocks [9] out of range" in capsys.readouterr().err
    assert eval_cli.main([str(path), "eval.jobs=[sample]", "eval.decoding.cuda_graph=true"]) == 2
    assert "eval.decoding.cuda_graph needs a CUDA device; sampling runs on cpu" in capsys.readouterr().err
    mixture = export(random_model(transform="mixture"), tmp_path / "mixture.safetensors", data_path=dataset)
    assert (
        eval_cli.main([str(mixture), "eval.jobs=[sample]", "eval.decoding.cuda_graph=true", "cluster.use_gpu=true"])
        == 2
    )
    assert "model.transform=mixture inverts by iteration" in capsys.readouterr().err
    both = ["eval.decoding.cuda_graph=true", "eval.decoding.compile=true"]
    assert eval_cli.main([str(path), "eval.jobs=[sample]", *both]) == 2
    assert "eval.decoding.compile and eval.decoding.cuda_graph are alternatives" in capsys.readouterr().err
    assert eval_cli.main([str(path), "--dry-run", "eval.decoding.mode=gs_jacobi", "eval.decoding.precision=bf16"]) == 0
    out = capsys.readouterr().out
    assert "mode: gs_jacobi" in out and "precision: bf16" in out


@pytest.mark.slow
def test_a_16_bit_png_inside_the_held_out_split_stops_the_evaluation_naming_shard_and_key(
    ray_session, tmp_path, dataset, capsys
):
    """PIL would read it as all white and publish a wrong bits/dim; the worker refuses it and the driver says where,
    in one line."""
    import io
    import shutil

    import webdataset as wds

    from tarflow_scale.data import write_manifest
    from tarflow_scale.data.manifest import file_sha256 as shard_sha256

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    manifest = read_manifest(str(data), "val")
    shard = data / manifest.shards[1]  # holds val0008 .. val0015: not the split's first sample
    buffer = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16)).save(buffer, format="PNG")
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as writer:
        for sample in samples:
            writer.write({**sample, "png": buffer.getvalue()} if sample["__key__"] == "val0010" else sample)
    manifest.sha256[1], manifest.shard_bytes[1] = shard_sha256(str(shard)), shard.stat().st_size
    write_manifest(str(data), manifest)

    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", data_path=str(data), noise="uniform")
    args = [str(path), "--out", str(tmp_path / "out"), "eval.jobs=[bpd]", "data.num_workers=0", "eval.batch_size=4"]
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{manifest.shards[1]}: sample 'val0010' is a 16-bit grayscale PNG" in err[0]
    assert not (tmp_path / "out" / "metrics.json").exists()
