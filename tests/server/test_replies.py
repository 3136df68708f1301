"""Decoding a site's reply for the server: the expected kind, a site failure, an error reply, or
a reply of another kind, each with a one-line problem."""

import torch
from flwr.app import Error, Message, MessageType

from protocol import EvaluateRes, Failure, SegmentationRes, evaluate_metrics
from server.replies import expect_reply
from tests.conftest import tiny_config
from tests.flower_helpers import as_node, reply, server_message


def _evaluate_message():
    state = {"w": torch.zeros(2)}
    return server_message(tiny_config(), state, dst=5, message_type=MessageType.EVALUATE), state


def test_a_site_failure_is_returned_with_its_reason_and_other_kinds_are_named():
    msg, _ = _evaluate_message()
    failure = Failure.for_message(MessageType.EVALUATE, site_index=1, reason="disk full", traceback="Traceback ...")
    result, problem = expect_reply(reply(msg, failure.to_record()), EvaluateRes, "an evaluate message")
    assert isinstance(result, Failure) and problem == "disk full" and result.traceback == "Traceback ..."
    evaluated = reply(msg, EvaluateRes(evaluate_metrics(num_examples=3, eval_loss=0.5, site_index=1)).to_record())
    result, problem = expect_reply(evaluated, EvaluateRes, "an evaluate message")
    assert isinstance(result, EvaluateRes) and problem == ""
    result, problem = expect_reply(evaluated, SegmentationRes, "a segmentation query")
    assert result is None and problem == "a EvaluateRes reply does not answer a segmentation query"


def test_an_error_reply_gives_its_last_line():
    msg, _ = _evaluate_message()
    as_node(5)
    err = Message(error=Error(code=1, reason="Traceback\n  ...\nValueError: bad shape"), reply_to=msg)
    as_node(0)
    assert expect_reply(err, EvaluateRes, "an evaluate message") == (None, "ValueError: bad shape")
