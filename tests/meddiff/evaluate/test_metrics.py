import numpy as np
import pytest
import torch

from meddiff.evaluate import (
    FeatureStats,
    build_encoder,
    density_coverage,
    federated_fid,
    fid_from_stats,
    frechet_distance,
    kernel_inception_distance,
    memorization,
    membership_inference,
    merge_stats,
    ms_ssim_diversity,
    precision_recall,
    psnr,
    roc_auc,
    ssim,
)


def test_frechet_distance_of_a_set_with_itself_is_about_zero():
    f = np.random.default_rng(0).normal(size=(500, 8))
    s = FeatureStats.of(f)
    assert abs(fid_from_stats(s, s)) < 1e-6


def test_frechet_distance_matches_the_closed_form_for_two_gaussians():
    # N(m1, a^2 I) vs N(m2, b^2 I) in d dims: |m1 - m2|^2 + d (a - b)^2
    d = 4
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    got = frechet_distance(mu1, 4.0 * np.eye(d), mu2, 1.0 * np.eye(d))
    assert got == pytest.approx(d * 0.25 + d * (2.0 - 1.0) ** 2, rel=1e-9)
    # general covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), from eigen-decompositions
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + np.eye(d), b @ b.T + np.eye(d)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    w2, v2 = np.linalg.eigh(r1 @ s2 @ r1)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.sum(np.sqrt(w2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_merged_site_statistics_equal_the_pooled_ones():
    rng = np.random.default_rng(2)
    parts = [rng.normal(loc=i, size=(n, 6)) for i, n in enumerate((40, 75, 13))]
    merged = merge_stats([FeatureStats.of(p) for p in parts])
    pooled = FeatureStats.of(np.concatenate(parts))
    assert merged.count == pooled.count
    np.testing.assert_allclose(merged.mean, pooled.mean, atol=1e-12)
    np.testing.assert_allclose(merged.cov, pooled.cov, atol=1e-6)
    again = FeatureStats.from_dict(merged.to_dict())
    np.testing.assert_allclose(again.cov, merged.cov)
    gen = rng.normal(size=(60, 6))
    fed = federated_fid(gen, {f"site_{i}": FeatureStats.of(p) for i, p in enumerate(parts)})
    assert fed["fid_global"] == pytest.approx(fid_from_stats(FeatureStats.of(gen), pooled), rel=1e-6)
    assert fed["fid_per_site"]["site_0"] < fed["fid_per_site"]["site_2"]  # the generator matches site 0's distribution


def test_precision_recall_density_coverage_on_toy_distributions():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 2))
    same = rng.normal(size=(300, 2))
    far = rng.normal(size=(300, 2)) + 50
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    p, r = precision_recall(real, far)
    assert p == 0.0 and r == 0.0
    d, c = density_coverage(real, same)
    assert 0.7 < d < 1.3 and c > 0.9
    assert density_coverage(real, far) == (0.0, 0.0)
    real16, same16 = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    kid_same, _ = kernel_inception_distance(real16, same16)
    kid_far, _ = kernel_inception_distance(real16, same16 + 1.0)
    assert abs(kid_same) < 0.02 < kid_far


def test_image_metrics_and_diversity():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(8), atol=1e-4)
    assert (psnr(x, (x + 0.1).clamp(-1, 1)) > 20).all()
    diverse = ms_ssim_diversity(x)
    collapsed = ms_ssim_diversity(x[:1].repeat(8, 1, 1, 1))
    assert collapsed == pytest.approx(1.0, abs=1e-4) and diverse < 0.5


def test_memorization_flags_copies_of_training_images():
    torch.manual_seed(0)
    train, heldout = torch.rand(50, 1, 8, 8), torch.rand(50, 1, 8, 8)
    generated = torch.cat([train[:3] + 0.001, torch.rand(7, 1, 8, 8)])
    result = memorization(generated, train, heldout)
    assert result.flagged[:3].all() and not result.flagged[3:].any()
    assert list(result.nearest_train_index[:3]) == [0, 1, 2]


def test_mia_metrics_and_auc_reference():
    rng = np.random.default_rng(4)
    same = membership_inference(rng.normal(size=2000), rng.normal(size=2000))
    assert abs(same["mia_auc"] - 0.5) < 0.03
    leaky = membership_inference(rng.normal(size=500) - 3, rng.normal(size=500))
    assert leaky["mia_auc"] > 0.95 and leaky["mia_tpr_at_1pct_fpr"] > 0.5
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count half


def test_encoder_registry_never_downloads():
    x = torch.rand(4, 1, 16, 16)
    assert build_encoder("pixels").encode(x).shape == (4, 256)
    rp = build_encoder("random_projection")
    np.testing.assert_array_equal(rp.encode(x), build_encoder("random_projection").encode(x))  # fixed seed
    with pytest.raises(ValueError, match="never downloads"):
        build_encoder("inception")
    with pytest.raises(ValueError, match="needs its weights file"):
        build_encoder("domain")
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("clip")


def test_membership_sets_are_matched_per_class():
    from meddiff.recipes.evaluation import matched_indices

    members = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1])
    nonmembers = torch.tensor([0, 0, 0, 1, 0, 1])
    m, n = matched_indices(members, nonmembers, total=8)
    assert sorted(members[m].tolist()) == sorted(nonmembers[n].tolist()) == [0, 0, 1, 1]
