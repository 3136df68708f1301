"""Every message of the protocol survives encoding, Flower's wire format and decoding, and the
server tells the replies apart."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from meddiff.evaluate.metrics import FeatureStats
from protocol import (EVALUATE_METRIC_KEYS, FEATURE_COUNT, QUERY_METRIC_KEYS, TRAIN_METRIC_KEYS, EvaluateRes, Failure,
                      InstallAutoencoder, MissingAutoencoder, ProtocolError, QueryRes, Refusal, RoundConfig, RoundIns,
                      SEGMENTATION_COLUMNS, SEGMENTATION_METRIC_KEYS, SegmentationQuery, SegmentationRes, SetLatentScale,
                      TRANSLATION_METRIC_KEYS, TrainRes, arrays_to_state, central_dp_mode, decode_query, decode_reply,
                      evaluate_metrics,
                      non_private_metrics, reply_kind, reply_ledger, reply_metrics, state_to_arrays, train_metrics)
from tests.conftest import tiny_config
from tests.flower_helpers import as_node

WEIGHTS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "steps": torch.tensor([3])}
METRICS = train_metrics(num_examples=18, train_loss=0.25, steps=2, site_index=1, seconds=0.5, privacy=non_private_metrics())


def _wire(msg: Message) -> Message:
    """``msg`` after Flower's serialisation, as the other side receives it."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))


def _sent(content: RecordDict, message_type=MessageType.TRAIN) -> Message:
    as_node(0)
    return _wire(Message(content=content, dst_node_id=11, message_type=message_type))


def _answered(content: RecordDict, message_type=MessageType.TRAIN) -> Message:
    request = _sent(RoundIns(ArrayRecord(WEIGHTS), RoundConfig(tiny_config(), server_round=1)).to_record(), message_type)
    as_node(11)
    reply = Message(content=content, reply_to=request)
    as_node(0)
    return _wire(reply)


def _round_config(**changes) -> RoundConfig:
    fields = dict(experiment=tiny_config(extra=["federation.num_rounds=7"]), phase="autoencoder", num_rounds=7,
                  manifest_path="/m.json", study_id="run-1", site_state_root="/s", progress_dir="/p",
                  known_ledgers={"site_0": {"history": [[1.0, 0.1, 5]]}}, central_dp="fixed", autoencoder_digest="ab" * 8,
                  latent_scale=2.5, want_feature_stats=True, server_round=3, proximal_mu=0.1, clipping_norm=0.5)
    return RoundConfig(**{**fields, **changes})


def test_round_config_round_trips_and_decodes_the_experiment_config():
    config = _round_config()
    assert RoundConfig.from_record(config.to_record()) == config
    sent = _sent(RoundIns(ArrayRecord(WEIGHTS), config).to_record())
    back = RoundIns.from_record(sent.content)
    assert back.config == config and back.config.experiment == tiny_config(extra=["federation.num_rounds=7"])
    assert all(torch.equal(back.weights()[k], v) for k, v in WEIGHTS.items())
    minimal = RoundConfig(tiny_config())  # the defaults are what a record without the optional keys means
    assert RoundConfig.from_record(minimal.to_record()) == minimal and minimal.server_round is None
    ledgers = {"site_0": {"epsilon": 1.0}}
    snapshot = RoundConfig(tiny_config(), known_ledgers=ledgers)
    ledgers["site_1"] = {"epsilon": 2.0}  # the server's ledgers change after the message was configured
    assert json.loads(snapshot.to_record()["known-ledgers"]) == {"site_0": {"epsilon": 1.0}}


def test_round_config_keeps_the_key_strings_of_the_wire():
    record = _round_config().to_record()
    assert {"experiment-config", "phase", "num-rounds", "manifest-path", "study-id", "site-state-root", "progress-dir",
            "known-ledgers", "central-dp", "autoencoder-digest", "latent-scale", "fid-stats", "server-round",
            "proximal-mu", "clipping_norm"} == set(record.keys())
    assert json.loads(record["known-ledgers"]) == {"site_0": {"history": [[1.0, 0.1, 5]]}}
    plain = RoundConfig(tiny_config()).to_record()
    assert not {"autoencoder-digest", "latent-scale", "fid-stats", "server-round", "proximal-mu"} & set(plain.keys())


def test_flower_strategy_keys_pass_through(tmp_path):
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedProx

    class _Grid:
        def get_node_ids(self):
            return [11]

    as_node(0)
    strategy = DifferentialPrivacyClientSideFixedClipping(FedProx(proximal_mu=0.3, min_available_nodes=1,
                                                                  min_train_nodes=1), 0.5, 0.7, 1)
    messages = list(strategy.configure_train(4, ArrayRecord(WEIGHTS), RoundConfig(tiny_config()).to_record(), _Grid()))
    config = RoundIns.from_record(_wire(messages[0]).content).config
    assert (config.server_round, config.proximal_mu, config.clipping_norm) == (4, 0.3, 0.7)
    assert config.round_number() == 4 and central_dp_mode(messages[0].content) == "off"
    assert central_dp_mode(RoundIns(ArrayRecord(WEIGHTS), RoundConfig(tiny_config())).to_record()) is None


def test_queries_round_trip():
    setup = _round_config(autoencoder_digest="cd" * 8, latent_scale=1.5, want_feature_stats=False, server_round=None)
    install = decode_query(_sent(InstallAutoencoder(setup, WEIGHTS, want_stats=True).to_record(), MessageType.QUERY).content)
    assert isinstance(install, InstallAutoencoder) and install.setup == setup and install.want_stats
    assert all(torch.equal(install.weights[k], v) for k, v in WEIGHTS.items())
    scale = decode_query(_sent(SetLatentScale(setup).to_record(), MessageType.QUERY).content)
    assert scale == SetLatentScale(setup) and "arrays" not in SetLatentScale(setup).to_record()
    res = QueryRes(site_index=2, installed=True, count=128, total=3.5, total_sq=40.25)
    assert decode_reply(_answered(res.to_record(), MessageType.QUERY)) == res
    assert set(res.to_record()["metrics"].keys()) == set(QUERY_METRIC_KEYS)


def test_the_segmentation_query_and_its_reply_round_trip_and_are_told_apart():
    setup = RoundConfig(tiny_config(extra=["model.cond_channels=4"]), phase="mask_diffusion", num_rounds=2, server_round=2)
    query = decode_query(_sent(SegmentationQuery(setup, WEIGHTS).to_record(), MessageType.QUERY).content)
    assert isinstance(query, SegmentationQuery) and query.setup == setup and query.setup.round_number() == 2
    assert all(torch.equal(query.weights[k], v) for k, v in WEIGHTS.items())
    scores = {c: {"brain": {"dice": 0.5 + i / 10, "cases": 12}, "whole_tumour": {"dice": None, "cases": 0}}
              for i, c in enumerate(SEGMENTATION_COLUMNS)}
    res = SegmentationRes(site_index=1, scores=scores, num_real_train=30, num_synthetic=8, num_real_test=12, seconds=2.5)
    back = decode_reply(_answered(res.to_record(), MessageType.QUERY))
    assert back == res and back.regions == ["brain", "whole_tumour"] and back.dice("mask_fidelity", "brain") == 0.8
    keys = set(res.to_record()["metrics"].keys())
    assert set(SEGMENTATION_METRIC_KEYS) < keys and {"dice/real_only/brain", "cases/mask_fidelity/whole_tumour"} < keys
    assert math.isnan(res.to_record()["metrics"]["dice/synthetic_only/whole_tumour"])  # no image holds the region
    report = {"arms": {c: scores[c] for c in SEGMENTATION_COLUMNS[:3]}, "mask_fidelity": scores["mask_fidelity"],
              "num_real_train": 30, "num_synthetic": 8, "num_real_test": 12, "seconds": 2.5, "settings": {"steps": 5}}
    assert SegmentationRes.from_report(1, report) == res
    failure = Failure.for_message(MessageType.QUERY, site_index=1, reason="ValueError: x", traceback="")
    assert isinstance(decode_reply(_answered(failure.to_record(), MessageType.QUERY)), Failure)
    content = res.to_record()
    del content["metrics"]["cases/real_only/brain"]
    with pytest.raises(ProtocolError, match=r"lacks the key\(s\) \['cases/real_only/brain'\]"):
        SegmentationRes.from_record(content)


def test_train_replies_round_trip_and_are_told_apart():
    update = TrainRes.from_weights(WEIGHTS, METRICS, transport_dtype="fp16", ledger='{"site": "site_1"}')
    back = decode_reply(_answered(update.to_record()))
    assert isinstance(back, TrainRes) and back.metrics == METRICS and back.ledger == update.ledger
    assert back.arrays["w"].dtype == "float16" and torch.equal(back.weights()["w"], WEIGHTS["w"])
    assert back.site_index == 1 and set(update.to_record()["metrics"].keys()) == set(TRAIN_METRIC_KEYS)

    refusal = Refusal.for_site(site_index=1, num_examples=18, reason="budget spent", epsilon=7.5, exhausted=True, delta=1e-3,
                               ledger="{}")
    back = decode_reply(_answered(refusal.to_record()))
    assert isinstance(back, Refusal) and back.reason == "budget spent" and back.ledger == "{}"
    assert back.metrics["budget_exhausted"] == 1 and back.metrics["epsilon"] == 7.5 and back.metrics["delta"] == 1e-3
    assert math.isnan(back.metrics["train_loss"]) and set(back.metrics) == set(TRAIN_METRIC_KEYS)

    missing = MissingAutoencoder.for_site(site_index=0, num_examples=9, digest="ef" * 8)
    back = decode_reply(_answered(missing.to_record()))
    assert isinstance(back, MissingAutoencoder) and back.digest == "ef" * 8 and back.site_index == 0
    assert set(back.metrics) == set(TRAIN_METRIC_KEYS) and "arrays" not in missing.to_record()


@pytest.mark.parametrize("message_type, keys", [(MessageType.TRAIN, TRAIN_METRIC_KEYS),
                                                (MessageType.EVALUATE, EVALUATE_METRIC_KEYS),
                                                (MessageType.QUERY, QUERY_METRIC_KEYS)])
def test_a_failure_carries_every_metric_key_of_its_reply_kind(message_type, keys):
    failure = Failure.for_message(message_type, site_index=4, reason="ValueError: x", traceback="Traceback ...")
    back = decode_reply(_answered(failure.to_record(), message_type))
    assert isinstance(back, Failure) and (back.reason, back.traceback, back.site_index) == ("ValueError: x", "Traceback ...", 4)
    assert set(back.metrics) == set(keys) and reply_kind(failure.to_record()) is Failure


def test_evaluate_replies_round_trip_with_and_without_feature_statistics():
    scores = dict(zip(TRANSLATION_METRIC_KEYS, (0.9, 31.5, 0.02)))
    plain = EvaluateRes(evaluate_metrics(num_examples=2, eval_loss=0.75, site_index=1, translation=scores))
    record = plain.to_record()
    assert set(record["metrics"].keys()) == set(EVALUATE_METRIC_KEYS) and FEATURE_COUNT not in record["metrics"]
    assert decode_reply(_answered(record, MessageType.EVALUATE)) == plain
    rng = np.random.default_rng(0)
    stats = FeatureStats.of(rng.normal(size=(5, 3)))
    back = decode_reply(_answered(EvaluateRes(plain.metrics, stats).to_record(), MessageType.EVALUATE))
    assert back.metrics == plain.metrics and back.feature_stats.count == 5
    np.testing.assert_allclose(back.feature_stats.mean, stats.mean)
    np.testing.assert_allclose(back.feature_stats.cov, stats.cov)


def test_an_evaluate_reply_without_translation_carries_nan_scores():
    metrics = decode_reply(_answered(EvaluateRes(evaluate_metrics(num_examples=2, eval_loss=0.5, site_index=0)).to_record(),
                                     MessageType.EVALUATE)).metrics
    assert all(np.isnan(metrics[k]) for k in TRANSLATION_METRIC_KEYS) and metrics["eval_loss"] == 0.5


def test_bare_contents_are_classified_by_their_metrics():
    assert reply_kind(TrainRes.from_weights(WEIGHTS, METRICS).to_record()) is TrainRes
    assert reply_kind(EvaluateRes(evaluate_metrics(num_examples=1, eval_loss=0.1, site_index=0)).to_record()) is EvaluateRes
    assert reply_kind(QueryRes(site_index=0, installed=False).to_record()) is QueryRes
    content = Refusal.for_site(site_index=1, num_examples=3, reason="r", epsilon=1.0, exhausted=False).to_record()
    assert reply_kind(content) is Refusal and reply_ledger(content) is None and reply_metrics(RecordDict()) == {}


def test_a_record_without_the_experiment_config_names_the_key():
    with pytest.raises(ProtocolError, match="'experiment-config'"):
        RoundConfig.from_record(ConfigRecord({"server-round": 1}))
    with pytest.raises(ProtocolError, match="no ConfigRecord 'config'"):
        RoundIns.from_record(RecordDict({"arrays": ArrayRecord(WEIGHTS)}))
    with pytest.raises(ProtocolError, match="no ArrayRecord 'arrays'"):
        RoundIns.from_record(RecordDict({"config": RoundConfig(tiny_config()).to_record()}))
    with pytest.raises(ProtocolError, match="'server-round'"):
        RoundConfig(tiny_config()).round_number()
    named = RoundConfig(tiny_config()).to_record()
    named["autoencoder-digest"] = "ab" * 8
    with pytest.raises(ProtocolError, match="'latent-scale'"):
        RoundConfig.from_record(named)


def test_an_unknown_or_missing_query_kind_is_named():
    content = SetLatentScale(RoundConfig(tiny_config())).to_record()
    content["config"]["query"] = "format-disk"
    with pytest.raises(ProtocolError, match="unknown query 'format-disk'; expected one of install-autoencoder, latent-scale, "
                       "segmentation-utility"):
        decode_query(content)
    del content["config"]["query"]
    with pytest.raises(ProtocolError, match="lacks the key 'query'"):
        decode_query(content)


def test_malformed_replies_name_what_they_lack():
    two_arrays = RecordDict({"arrays": ArrayRecord(WEIGHTS), "extra": ArrayRecord(WEIGHTS), "metrics": MetricRecord(METRICS)})
    with pytest.raises(ProtocolError, match="exactly one ArrayRecord 'arrays' and one MetricRecord"):
        decode_reply(two_arrays)
    with pytest.raises(ProtocolError, match="no MetricRecord 'metrics'"):
        EvaluateRes.from_record(RecordDict())
    with pytest.raises(ProtocolError, match="no ConfigRecord 'refusal'"):
        Refusal.from_record(RecordDict({"metrics": MetricRecord(METRICS)}))
    with pytest.raises(ProtocolError, match=r"lacks the key\(s\) \['total-sq'\]"):
        QueryRes.from_record(RecordDict({"metrics": MetricRecord({"site-index": 0, "installed": 1, "count": 0, "total": 0.0})}))
    with pytest.raises(KeyError, match="missing from the reply"):
        TrainRes.from_weights(WEIGHTS, {"num-examples": 1}).to_record()


def test_weights_travel_in_the_transport_dtype():
    record = state_to_arrays({"w": WEIGHTS["w"].double(), "steps": WEIGHTS["steps"]}, "fp16")
    assert set(record.keys()) == {"w", "steps"} and record["w"].dtype == "float16"
    state = arrays_to_state(record)
    assert state["w"].dtype == torch.float32 and state["steps"].dtype == torch.int64
    with pytest.raises(ValueError, match="transport dtype"):
        state_to_arrays(WEIGHTS, "bf16")
