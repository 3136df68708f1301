"""A site of a latent mask-conditioned study, through the real ClientApp: the autoencoder phase
trains and evaluates on the images alone, the scale statistics never see a mask, and the latent
UNet trains under DP-SGD (record unit) on latents packed with the masks pooled to the latent grid."""

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

import client.state
from client.client_app import evaluate, query, train
from meddiff.diffusion import condition_on_grid
from meddiff.latent import LatentCodec, latent_stats
from meddiff.recipes.build import build_autoencoder, build_unet
from meddiff.recipes.phases import AUTOENCODER, MASK_DIFFUSION
from meddiff.recipes.sites import phantom_site
from protocol import InstallAutoencoder, RoundConfig
from tests.conftest import tiny_config
from tests.flower_helpers import as_node, server_message

LDM = ["autoencoder.enabled=true", "autoencoder.mode=not_private", "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4",
       "autoencoder.latent_channels=2", "model.in_channels=2", "model.out_channels=2", "model.attention_resolutions=[4]",
       "autoencoder.batch_size=8", "autoencoder.local_steps=2", "federation.local_steps=2", "data.num_samples=40"]
LATENT_MASKS = LDM + ["model.cond_channels=4", "model.num_classes=2", "privacy.enabled=true", "privacy.unit=record",
                      "privacy.max_physical_batch_size=4", "train.lesion_weight=3"]
NODE = {"partition-id": 0, "num-partitions": 2}


def _send(handler, msg, state):
    as_node(11)
    return handler(msg, Context(run_id=1, node_id=11, node_config=NODE, state=state, run_config={})).content


@pytest.mark.slow  # two phases through the ClientApp, the second under DP-SGD
def test_a_latent_mask_site_trains_its_autoencoder_on_images_and_its_unet_privately_on_pooled_masks(tmp_path):
    cfg = tiny_config(extra=LATENT_MASKS)
    state, root = RecordDict(), str(tmp_path)
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)

    # phase 1: the site's examples are packed with their masks, the autoencoder sees the image channel alone
    content = _send(train, server_message(cfg, ae.state_dict(), dst=11, phase=AUTOENCODER, site_state_root=root), state)
    assert content["metrics"]["steps"] == 2 and set(content["arrays"].keys()) == set(ae.state_dict())
    ev = _send(evaluate, server_message(cfg, ae.state_dict(), dst=11, message_type=MessageType.EVALUATE, phase=AUTOENCODER),
               state)
    assert 0 < ev["metrics"]["eval_loss"] < 2

    # the install query's latent statistics are those of the images alone
    codec = LatentCodec(ae, 2.0)
    as_node(0)
    setup = RoundConfig(cfg, site_state_root=root, autoencoder_digest=codec.digest, latent_scale=2.0)
    msg = Message(content=InstallAutoencoder(setup, ae.state_dict(), want_stats=True).to_record(), dst_node_id=11,
                  message_type=MessageType.QUERY)
    stats = _send(query, msg, state)["metrics"]
    images = phantom_site(0, 2, tiny_config(extra=LDM))  # the same site's images, without masks
    own = latent_stats(ae, images)
    assert stats["count"] == own.count == len(images) * 2 * 8 * 8 and abs(stats["total"] - own.total) < 1e-6 * own.count

    # phase 2 under DP: the UNet trains on latents packed with the masks pooled to the 8x8 latent grid
    client.state._LATENTS.clear()
    unet = build_unet(cfg).state_dict()
    fields = dict(phase=MASK_DIFFUSION, autoencoder_digest=codec.digest, latent_scale=2.0, site_state_root=root)
    content = _send(train, server_message(cfg, unet, dst=11, **fields), state)
    m = content["metrics"]
    assert m["steps"] == 2 and 0 < m["epsilon"] < float("inf") and set(content["arrays"].keys()) == set(unet)
    (latents,) = client.state._LATENTS.values()
    packed = torch.stack([x for x, _ in phantom_site(0, 2, cfg)])  # [n, 1 + 4, 16, 16]
    assert latents.latents.shape == (len(packed), 2 + 4, 8, 8)
    torch.testing.assert_close(latents.latents[:, 2:], condition_on_grid(packed[:, 1:], (8, 8)))
    torch.testing.assert_close(latents.latents[:, :2], codec.encode(packed[:, :1]), rtol=1e-4, atol=1e-5)
    ev = _send(evaluate, server_message(cfg, unet, dst=11, message_type=MessageType.EVALUATE, **fields), state)
    assert ev["metrics"]["eval_loss"] > 0
