"""Topic names and the CRC-32 partitioner; no broker needed."""

from __future__ import annotations

import zlib
from pathlib import Path

from pipeline.settings import Settings
from pipeline.topics import crc32_partitioner, fixed_topics, lane_topics


def _settings(tmp_path: Path) -> Settings:
    return Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="ut", model_dir=tmp_path)


def test_fixed_topic_names(tmp_path: Path) -> None:
    assert fixed_topics(_settings(tmp_path)) == [
        "ut.requests", "ut.responses", "ut.dlq", "ut.metrics", "ut.control", "ut.telemetry",
    ]


def test_lane_topic_names_cover_every_model_and_priority(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert lane_topics(settings, ["digits", "minilm"]) == [
        "ut.lane.digits.high", "ut.lane.digits.normal", "ut.lane.digits.batch",
        "ut.lane.minilm.high", "ut.lane.minilm.normal", "ut.lane.minilm.batch",
    ]
    assert lane_topics(settings, iter(["digits"]), priorities=("batch",)) == [
        "ut.lane.digits.batch"
    ]
    assert lane_topics(settings, []) == []


def test_partitioner_is_stable_and_in_range() -> None:
    for count in (1, 2, 3, 4, 7, 64):
        partitions = list(range(count))
        for i in range(500):
            key = f"request-{i}".encode()
            chosen = crc32_partitioner(key, partitions, partitions)
            assert chosen in partitions
            assert chosen == crc32_partitioner(key, partitions, [])
            # The same mapping as librdkafka's consistent partitioner, fixed across runs.
            assert chosen == zlib.crc32(key) % count


def test_partitioner_spreads_keys() -> None:
    partitions = [0, 1, 2, 3]
    hits = {p: 0 for p in partitions}
    for i in range(4000):
        hits[crc32_partitioner(f"id-{i}".encode(), partitions, partitions)] += 1
    assert min(hits.values()) > 800


def test_partitioner_without_key_picks_an_available_partition() -> None:
    for _ in range(200):
        assert crc32_partitioner(None, [0, 1, 2, 3], [2, 3]) in (2, 3)
        assert crc32_partitioner(None, [0, 1, 2], []) in (0, 1, 2)


def test_known_key_lands_on_known_partition() -> None:
    # Pinned value: changing the partitioner would move keys between partitions.
    assert crc32_partitioner(b"abc", [0, 1, 2, 3, 4, 5, 6, 7], []) == 0x352441C2 % 8
