import pytest
import torch
from flwr.app import Context, MessageType, RecordDict
from opacus import GradSampleModule

from client.client_app import evaluate, train
from client.local import local_train
from meddiff.recipes.build import build_unet_from_section
from meddiff.recipes.sites import phantom_site
from privacy.wrapping import unwrap_state
from protocol import FEATURE_COUNT, TRAIN_METRIC_KEYS, arrays_to_state, state_to_arrays
from tests.conftest import tiny_config
from tests.flower_helpers import as_node, server_message


def _context(pid=0, num=2):
    return Context(run_id=1, node_id=11 + pid, node_config={"partition-id": pid, "num-partitions": num}, state=RecordDict(), run_config={})


@pytest.mark.parametrize("transport", ["fp32", "fp16"])
def test_train_reply_schema_unwrapped_keys_and_transport(transport):
    cfg = tiny_config(extra=["federation.local_steps=2", "data.num_samples=40", f"federation.transport_dtype={transport}",
                             "model.num_classes=2"])
    model = build_unet_from_section(cfg.model, cfg.data.image_size)
    msg = server_message(cfg, model.state_dict(), dst=11)
    as_node(11)
    out = train(msg, _context(0))
    content = out.content
    assert len(content.array_records) == 1 and len(content.metric_records) == 1
    assert set(content["metrics"].keys()) == set(TRAIN_METRIC_KEYS)
    assert content["metrics"]["steps"] == 2 and content["metrics"]["num-examples"] == 18
    state = content["arrays"].to_torch_state_dict()
    assert set(state) == set(model.state_dict())
    assert not any(k.startswith("_module.") for k in state)
    expected = torch.float16 if transport == "fp16" else torch.float32
    assert all(v.dtype == expected for v in state.values() if v.is_floating_point())
    changed = any(not torch.allclose(v.float(), model.state_dict()[k]) for k, v in state.items())
    assert changed


def test_same_metric_keys_from_every_site():
    cfg = tiny_config(extra=["federation.local_steps=1", "data.num_samples=40"])
    model = build_unet_from_section(cfg.model, cfg.data.image_size)
    keys = []
    for pid in (0, 1):
        as_node(11 + pid)
        keys.append(set(train(server_message(cfg, model.state_dict(), dst=11 + pid), _context(pid)).content["metrics"].keys()))
    assert keys[0] == keys[1]


def test_evaluate_reports_held_out_loss_and_feature_statistics_on_request():
    cfg = tiny_config(extra=["data.num_samples=40"])
    model = build_unet_from_section(cfg.model, cfg.data.image_size)
    msg = server_message(cfg, model.state_dict(), dst=11, message_type=MessageType.EVALUATE)
    as_node(11)
    content = evaluate(msg, _context(0)).content
    metrics = content["metrics"]
    assert metrics["num-examples"] == 2 and metrics["eval_loss"] > 0  # 10% of 20 phantoms held out
    assert FEATURE_COUNT not in metrics and "feature-stats" not in content.array_records  # the count travels with the statistics
    msg = server_message(cfg, model.state_dict(), dst=11, message_type=MessageType.EVALUATE, want_feature_stats=True)
    as_node(11)
    content = evaluate(msg, _context(0)).content
    stats = content["feature-stats"].to_torch_state_dict()
    assert content["metrics"]["feature-count"] == 2 and stats["mean"].shape == (128,) and stats["cov"].shape == (128, 128)


def test_state_codec_sends_a_dp_models_weights_with_plain_keys():
    model = build_unet_from_section(tiny_config().model, 16)
    wrapped = GradSampleModule(model)
    record = state_to_arrays(unwrap_state(wrapped.state_dict()), "fp16")
    state = arrays_to_state(record)
    assert set(state) == set(model.state_dict()) and all(v.dtype == torch.float32 for v in state.values())
    with pytest.raises(ValueError, match="transport dtype"):
        state_to_arrays(model.state_dict(), "bf16")
    wrapped._close()


def test_local_training_is_deterministic_per_round_and_site():
    cfg = tiny_config(extra=["federation.local_steps=2", "data.num_samples=40"])
    state = build_unet_from_section(cfg.model, 16).state_dict()
    data = phantom_site(0, 2, cfg)
    a, _ = local_train(cfg, state, data, server_round=3, site_index=0)
    b, _ = local_train(cfg, state, data, server_round=3, site_index=0)
    c, _ = local_train(cfg, state, data, server_round=4, site_index=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_phantom_sites_are_skewed_and_disjoint():
    cfg = tiny_config(extra=["data.num_samples=300"])
    s0, s2 = phantom_site(0, 3, cfg), phantom_site(2, 3, cfg)
    assert s0.labels.float().mean() < s2.labels.float().mean()  # label skew: prevalence rises with site index
    assert not torch.equal(s0.images[0], s2.images[0])


def test_node_config_without_site_is_an_error():
    cfg = tiny_config()
    msg = server_message(cfg, build_unet_from_section(cfg.model, 16).state_dict(), dst=11)
    ctx = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})
    reply = train(msg, ctx)  # the error goes back to the server as a failure reply, with its traceback
    failure = reply.content["failure"]
    assert "ValueError: node config has neither 'data-path'" in failure["reason"]
    assert "Traceback" in failure["traceback"] and "arrays" not in reply.content.array_records
    assert set(reply.content["metrics"]) == set(TRAIN_METRIC_KEYS)


def test_fedprox_term_pulls_towards_the_global_weights():
    from client.local import add_proximal_term

    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    add_proximal_term(opt, [torch.tensor([0.0])], mu=2.0)
    w.grad = torch.tensor([0.0])  # no data gradient: only the proximal term mu * (w - w_global) acts
    opt.step()
    assert float(w) == pytest.approx(1.0 - 0.1 * 2.0 * 1.0)


def test_dp_training_without_a_ledger_is_refused():
    cfg = tiny_config(extra=["privacy.enabled=true"])
    with pytest.raises(ValueError, match="refusing to train without DP"):
        local_train(cfg, build_unet_from_section(cfg.model, 16).state_dict(), phantom_site(0, 2, tiny_config()), server_round=1, site_index=0)
