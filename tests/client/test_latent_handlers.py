"""Latent diffusion at a site, through the real ClientApp: phase-1 rounds, the autoencoder sent once
by QUERY, latent statistics for the scale factor, and a site that lost the autoencoder."""

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from client.client_app import evaluate, query, train
from meddiff.recipes.build import build_autoencoder, build_unet
from meddiff.recipes.sites import phantom_site
from meddiff.latent import LatentCodec, latent_stats
from protocol import TRAIN_METRIC_KEYS, InstallAutoencoder, RoundConfig, SetLatentScale
from tests.conftest import tiny_config
from tests.flower_helpers import as_node, server_message

LDM = ["autoencoder.enabled=true", "autoencoder.mode=not_private", "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4",
       "autoencoder.latent_channels=2", "model.in_channels=2", "model.out_channels=2", "model.attention_resolutions=[4]",
       "autoencoder.batch_size=8", "autoencoder.local_steps=2", "federation.local_steps=2", "data.num_samples=40"]
NODE = {"partition-id": 0, "num-partitions": 2}


def _ctx(state):
    return Context(run_id=1, node_id=11, node_config=NODE, state=state, run_config={})


def _query(cfg, codec, kind, tmp_path, *, want_stats=False, digest=None):
    as_node(0)
    setup = RoundConfig(cfg, site_state_root=str(tmp_path), autoencoder_digest=digest or codec.digest,
                        latent_scale=codec.scale_factor)
    request = (InstallAutoencoder(setup, codec.autoencoder.state_dict(), want_stats=want_stats)
               if kind is InstallAutoencoder else SetLatentScale(setup))
    msg = Message(content=request.to_record(), dst_node_id=11, message_type=MessageType.QUERY)
    as_node(11)
    return query(msg, _ctx(_query.state)).content["metrics"]


def test_phase1_round_trains_the_autoencoder(tmp_path):
    cfg = tiny_config(extra=LDM)
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    msg = server_message(cfg, ae.state_dict(), dst=11, phase="autoencoder", site_state_root=str(tmp_path))
    as_node(11)
    content = train(msg, _ctx(RecordDict())).content
    m = content["metrics"]
    assert set(m.keys()) == set(TRAIN_METRIC_KEYS) and m["steps"] == 2 and m["epsilon"] == float("inf")
    new = content["arrays"].to_torch_state_dict()
    assert set(new) == set(ae.state_dict()) and any(not torch.equal(new[k], v) for k, v in ae.state_dict().items())
    ev = server_message(cfg, new, dst=11, message_type=MessageType.EVALUATE, phase="autoencoder")
    as_node(11)
    assert 0 < evaluate(ev, _ctx(RecordDict())).content["metrics"]["eval_loss"] < 2  # reconstruction L1 in [-1, 1] units


def test_autoencoder_is_installed_once_and_a_site_that_lost_it_says_so(tmp_path):
    cfg = tiny_config(extra=LDM)
    torch.manual_seed(0)
    codec = LatentCodec(build_autoencoder(cfg), 2.5)
    unet = build_unet(cfg).state_dict()
    extra = {"phase": "diffusion", "autoencoder_digest": codec.digest, "latent_scale": 2.5, "site_state_root": str(tmp_path)}
    _query.state = state = RecordDict()

    # phase 2 before the install: the site says which autoencoder it lacks, and sends no weights
    as_node(11)
    content = train(server_message(cfg, unet, dst=11, **extra), _ctx(state)).content
    assert "arrays" not in content and str(content["missing-autoencoder"]["digest"]) == codec.digest
    assert set(content["metrics"].keys()) == set(TRAIN_METRIC_KEYS)

    # install, with the latent statistics the server turns into the scale factor (no images leave the site)
    m = _query(cfg, codec, InstallAutoencoder, tmp_path, want_stats=True)
    site_train = phantom_site(0, 2, cfg)
    own = latent_stats(codec.autoencoder, site_train)
    assert m["installed"] == 1 and m["count"] == own.count == len(site_train) * 2 * 8 * 8
    assert m["total"] == pytest.approx(own.total) and m["total-sq"] == pytest.approx(own.total_sq)
    assert (tmp_path / "site_0" / "autoencoders" / f"{codec.digest}.pt").is_file()  # kept on the site's disk

    # phase 2 now trains the UNet on latents, and the held-out loss is computed on latents too
    as_node(11)
    content = train(server_message(cfg, unet, dst=11, **extra), _ctx(state)).content
    assert content["metrics"]["steps"] == 2 and set(content["arrays"].keys()) == set(unet)
    as_node(11)
    ev = evaluate(server_message(cfg, unet, dst=11, message_type=MessageType.EVALUATE, **extra), _ctx(state))
    assert ev.content["metrics"]["eval_loss"] > 0

    # a restarted daemon (a new process: empty context.state, no cached latents) finds its disk copy
    import client.state

    client.state._LATENTS.clear()
    as_node(11)
    restarted = train(server_message(cfg, unet, dst=11, **extra), _ctx(RecordDict())).content
    assert "arrays" in restarted

    # the scale-only message applies to the held autoencoder; one the site does not hold is reported
    assert _query(cfg, codec, SetLatentScale, tmp_path)["installed"] == 1
    assert _query(cfg, codec, SetLatentScale, tmp_path, digest="f" * 16)["installed"] == 0


def test_tampered_autoencoder_is_refused(tmp_path):
    cfg = tiny_config(extra=LDM)
    torch.manual_seed(0)
    codec = LatentCodec(build_autoencoder(cfg), 1.0)
    _query.state = RecordDict()
    as_node(0)
    setup = RoundConfig(cfg, site_state_root=str(tmp_path), autoencoder_digest="0" * 16, latent_scale=1.0)
    msg = Message(content=InstallAutoencoder(setup, codec.autoencoder.state_dict()).to_record(),
                  dst_node_id=11, message_type=MessageType.QUERY)
    as_node(11)
    reply = query(msg, _ctx(_query.state))  # refused: a failure reply naming the mismatch, nothing installed
    assert "does not match its digest" in reply.content["failure"]["reason"]
    assert "autoencoder" not in _query.state
