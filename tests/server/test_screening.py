import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from configs import load_config
from meddiff.recipes.build import build_unet_from_section
from server.screening import aggregate, check_update, screen, screen_updates
from server.strategy import create_strategy, load_strategy_state, strategy_state
from tests.conftest import tiny_config
from tests.flower_helpers import server_message, train_reply

REF = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def test_check_update_reasons():
    ok = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float16)}
    assert check_update(ok, REF) is None
    assert "NaN or Inf" in check_update({**ok, "w": np.full((2, 3), np.nan, np.float32)}, REF)
    assert "shape (3, 2), expected (2, 3)" in check_update({**ok, "w": np.ones((3, 2), np.float32)}, REF)
    assert "wrong key set" in check_update({"w": ok["w"]}, REF)
    assert "dtype int64" in check_update({**ok, "b": np.ones(3, np.int64)}, REF)


def test_outlying_norm_is_rejected():
    updates = {f"s{i}": {"w": np.full((2, 3), 0.1 * (i + 1), np.float32), "b": np.zeros(3, np.float32)} for i in range(4)}
    updates["big"] = {"w": np.full((2, 3), 100.0, np.float32), "b": np.zeros(3, np.float32)}
    accepted, rejected = screen_updates(updates, REF, norm_factor=10)
    assert sorted(accepted) == ["s0", "s1", "s2", "s3"]
    assert "exceeds 10x the round median" in rejected["big"]


def _replies(cfg, global_state, updates):
    out = []
    for i, (state, n) in enumerate(updates):
        msg = server_message(cfg, global_state, dst=100 + i)
        out.append(train_reply(msg, state, {"num-examples": n, "train_loss": 0.5, "steps": 1, "site-index": i, "seconds": 0.1}))
    return out


def test_nan_and_shape_mismatch_rejected_aggregate_is_mean_of_valid(caplog):
    cfg = tiny_config(extra=["federation.min_train_nodes=2"])
    model = build_unet_from_section(cfg.model, cfg.data.image_size)
    g = {k: v.clone() for k, v in model.state_dict().items()}
    a = {k: v + 1.0 for k, v in g.items()}
    b = {k: v + 3.0 for k, v in g.items()}
    nan = {k: v.clone() for k, v in g.items()}
    first = next(iter(nan))
    nan[first][...] = float("nan")
    shape = dict(g)
    shape[first] = torch.zeros(3, 3)
    strategy = create_strategy(cfg.federation)
    with caplog.at_level("WARNING", logger="meddiff.server"):
        screened = screen(1, _replies(cfg, g, [(a, 10), (nan, 10), (shape, 10), (b, 10)]), {k: v.numpy() for k, v in g.items()},
                          norm_factor=10)
        arrays = aggregate(strategy, 1, screened, min_valid=cfg.federation.min_train_nodes)
    assert arrays is not None
    agg = arrays.to_torch_state_dict()
    for k in g:
        torch.testing.assert_close(agg[k].float(), g[k] + 2.0)
    report = {r["site"]: r for r in screened.report}
    assert report[1]["accepted"] is False and "NaN" in report[1]["reason"]
    assert report[2]["accepted"] is False and "shape" in report[2]["reason"]
    assert "site 1" in caplog.text and "site 2" in caplog.text


def test_too_few_valid_updates_keep_the_previous_model(caplog):
    cfg = tiny_config(extra=["federation.min_train_nodes=2"])
    g = build_unet_from_section(cfg.model, cfg.data.image_size).state_dict()
    bad = {k: v * float("nan") for k, v in g.items()}
    strategy = create_strategy(cfg.federation)
    with caplog.at_level("WARNING", logger="meddiff.server"):
        screened = screen(1, _replies(cfg, g, [(g, 5), (bad, 5)]), {k: v.numpy() for k, v in g.items()}, norm_factor=10)
        arrays = aggregate(strategy, 1, screened, min_valid=cfg.federation.min_train_nodes)
    assert arrays is None
    assert "keeping the previous global model" in caplog.text


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_registry_builds_every_strategy(name):
    cfg = load_config(None, [f"federation.strategy={name}"])
    strategy = create_strategy(cfg.federation)
    assert strategy.min_train_nodes == cfg.federation.min_train_nodes


def test_fedadam_state_round_trips():
    cfg = tiny_config(extra=["federation.strategy=fedadam", "federation.min_train_nodes=1"])
    g = build_unet_from_section(cfg.model, cfg.data.image_size).state_dict()
    strategy = create_strategy(cfg.federation)
    strategy.reference = {k: v.numpy() for k, v in g.items()}
    strategy.configure_train(1, ArrayRecord(g), __import__("flwr.app", fromlist=["ConfigRecord"]).ConfigRecord(), _FakeGrid())
    strategy.aggregate_train(1, _replies(cfg, g, [({k: v + 0.5 for k, v in g.items()}, 4)]))
    state = strategy_state(strategy)
    assert set(state) == {"m_t", "v_t"}
    fresh = create_strategy(cfg.federation)
    load_strategy_state(fresh, state)
    assert all(np.array_equal(fresh.v_t[k], strategy.v_t[k]) for k in strategy.v_t)


class _FakeGrid:
    """Only what FedAdam.configure_train asks of a Grid: the connected node ids."""

    def get_node_ids(self):
        return [100]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return server_message(tiny_config(), {}, dst=dst_node_id)
