"""Mask fidelity end to end: a tiny mask-conditioned ADM UNet overfit with `meddiff train` on 8
phantom (image, mask) pairs, sampled with DDIM from the same 8 masks, draws each lesion where its
mask puts it; judged by a segmenter trained on real pairs (Dice of its prediction on the generated
images against the conditioning masks), and the same images fit other masks far worse."""

import numpy as np
import pytest
import torch

from meddiff.data.phantoms import make_phantoms
from meddiff.evaluate.segmentation import SegmenterSettings, evaluate_segmenter, train_segmenter
from meddiff.recipes.build import build_masked_dataset
from meddiff.recipes.centralized import train_centralized
from meddiff.recipes.restore import model_from_checkpoint
from meddiff.recipes.sample import sample_images
from tests.conftest import tiny_config

NUM_PAIRS = 8
OTHER_REAL_PAIRS, JUDGE_STREAM = 24, 1000  # more real pairs for the judge, from another phantom stream
# x0-prediction memorises 8 images in a few hundred steps (eps and v need several times more)
OVERFIT = ["model.cond_channels=4", "model.num_classes=0", f"data.num_samples={NUM_PAIRS}", "data.lesion_fraction=1.0",
           "diffusion.prediction_type=x0", "train.steps=400", "train.lr=0.005", "train.lr_schedule=constant",
           f"train.batch_size={NUM_PAIRS}", "train.ema_decay=0.9", "train.log_every=100", "output.checkpoint_every=400",
           "output.num_samples=2", "sampler.name=ddim", "sampler.eta=0", "sampler.num_inference_steps=20"]


def whole_tumour(scores: dict) -> float:
    return scores["whole_tumour"]["dice"]


def overfit_fidelity(tmp_path, seed: int) -> dict[str, float]:
    """Whole-tumour Dice of the judge on the generated images against their own masks
    (``fidelity``), against the other 7 masks (``other_masks``: the mean over the masks rolled
    by 1 to 7) and on the real images (``real``, the judge's ceiling); plus the brain's fidelity."""
    cfg = tiny_config(tmp_path, OVERFIT + [f"data.seed={seed}", f"train.seed={seed}"])
    run = train_centralized(cfg, progress=False)
    model, cfg, _ = model_from_checkpoint(run / "checkpoints" / "last.pt")  # the EMA weights
    pairs = build_masked_dataset(cfg).dataset  # the 8 training pairs, as the run saw them
    images, masks = pairs.images, pairs.masks.float()
    generated = sample_images(model, cfg, num=NUM_PAIRS, device=torch.device("cpu"), seed=seed, masks=masks,
                              progress=False).clamp(-1.0, 1.0)
    more, _, more_masks = make_phantoms(OTHER_REAL_PAIRS, cfg.data.image_size, seed=seed + JUDGE_STREAM, lesion_fraction=1.0, masks=True)
    judge = train_segmenter(torch.cat([images, torch.from_numpy(more)[:, None] * 2.0 - 1.0]),
                            torch.cat([masks, torch.from_numpy(more_masks).float()]),
                            settings=SegmenterSettings(steps=300, seed=seed))
    own = evaluate_segmenter(judge, generated, masks)
    return {"fidelity": whole_tumour(own), "brain": own["brain"]["dice"],
            "other_masks": float(np.mean([whole_tumour(evaluate_segmenter(judge, generated, masks.roll(k, dims=0)))
                                          for k in range(1, NUM_PAIRS)])),
            "real": whole_tumour(evaluate_segmenter(judge, images, masks))}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small convolutions run several times faster on one thread of a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # a 400-step training run and a 300-step segmenter
def test_overfit_model_draws_each_lesion_where_its_mask_puts_it(tmp_path, one_thread):
    scores = overfit_fidelity(tmp_path, seed=0)
    assert scores["fidelity"] > 0.8 and scores["brain"] > 0.9, scores
    # a model that ignored its mask would fit the other images' masks as well as its own
    assert scores["other_masks"] < 0.4 and scores["other_masks"] < 0.5 * scores["fidelity"], scores
