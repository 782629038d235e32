"""The local Cassandra's configuration: one valid ``cassandra.yaml`` with the small-box settings
(pipelines/stack/services.py, ``SMALL_BOX_YAML``), each given once, and its G1 tuning."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.settings import Settings
from pipelines.stack.services import SMALL_BOX_GC, CassandraServer


def test_the_yaml_carries_the_small_box_settings_once(settings: Settings) -> None:
    text = CassandraServer(settings)._cassandra_yaml()

    config = yaml.safe_load(text)
    top_level = [line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()]
    assert len(top_level) == len(set(top_level)), "a setting given twice: Cassandra takes the last"
    assert config["memtable"]["configurations"]["default"] == {"inherits": "trie"}
    assert config["memtable_allocation_type"] == "offheap_objects"
    assert (config["memtable_flush_writers"], config["concurrent_compactors"]) == (1, 1)
    assert config["hinted_handoff_enabled"] is False
    assert config["dynamic_snitch"] is False
    assert config["commitlog_sync"] == "periodic"


def test_the_jvm_line_carries_the_g1_tuning(settings: Settings) -> None:
    line = CassandraServer(settings).command(Path("java"), "libs/*")

    assert "-XX:+UseG1GC" in line
    assert all(flag in line for flag in SMALL_BOX_GC)
    assert line.index(SMALL_BOX_GC[0]) < line.index("-cp")
