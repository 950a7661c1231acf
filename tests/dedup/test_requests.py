"""FilterBatch request parsing (no server, no model)."""

from __future__ import annotations

import pytest

from autodidact.dedup.service import parse_filter_batch
from autodidact.v1 import dedup_pb2


def test_the_default_threshold_is_the_one_calibrated_against_rouge_l():
    request = dedup_pb2.FilterBatchRequest(namespace="ns", items=[dedup_pb2.DedupItem(id="a", text="x")])
    assert parse_filter_batch(request) == (["a"], ["x"], pytest.approx(0.9))


def test_zero_is_a_threshold_not_a_default():
    request = dedup_pb2.FilterBatchRequest(namespace="ns", items=[dedup_pb2.DedupItem(id="a", text="x")], threshold=0.0)
    assert parse_filter_batch(request)[2] == 0.0
