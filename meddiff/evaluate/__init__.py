"""Evaluation and audits of synthetic medical images (quality, diversity, memorization,
membership inference), federated FID from per-site feature statistics, and translation metrics."""

from meddiff.evaluate.audits import diffusion_losses, memorization, membership_inference, roc_auc, tpr_at_fpr
from meddiff.evaluate.encoders import ENCODERS, DomainCNN, Encoder, build_encoder, train_domain_encoder
from meddiff.evaluate.federated import federated_fid, site_feature_stats
from meddiff.evaluate.metrics import (
    FeatureStats,
    density_coverage,
    fid_from_stats,
    frechet_distance,
    kernel_inception_distance,
    merge_stats,
    ms_ssim_diversity,
    precision_recall,
    psnr,
    ssim,
)
from meddiff.evaluate.translation import TranslationScores, body_mask, translation_metrics

__all__ = [
    "ENCODERS", "DomainCNN", "Encoder", "FeatureStats", "build_encoder", "density_coverage", "diffusion_losses",
    "federated_fid", "fid_from_stats", "frechet_distance", "kernel_inception_distance", "memorization",
    "membership_inference", "merge_stats", "ms_ssim_diversity", "precision_recall", "psnr", "roc_auc",
    "site_feature_stats", "ssim", "tpr_at_fpr", "train_domain_encoder", "TranslationScores", "body_mask",
    "translation_metrics",
]
