"""The ingress metrics: a private registry, closed label sets, and a scrapeable exposition."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from ingress.metrics import IngressMetrics


def test_exposition_names_every_metric() -> None:
    metrics = IngressMetrics(frame_types={"send", "accepted"})
    metrics.connections.inc()
    metrics.frame_in("send")
    metrics.frame_out("accepted")
    metrics.error("rate-limited")
    metrics.produce_latency.observe(0.004)
    metrics.outbound_queued_frames.inc(3)

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert {
        "imstream_ingress_connections",
        "imstream_ingress_frames_in",
        "imstream_ingress_frames_out",
        "imstream_ingress_errors",
        "imstream_ingress_produce_latency_seconds",
        "imstream_ingress_outbound_queued_frames",
        "imstream_ingress_kafka_queued_records",
        "process_resident_memory_bytes",
    } <= set(families)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert samples[("imstream_ingress_frames_in_total", (("type", "send"),))] == 1
    assert samples[("imstream_ingress_errors_total", (("code", "rate-limited"),))] == 1
    assert samples[("imstream_ingress_produce_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("imstream_ingress_produce_latency_seconds_bucket", (("le", "0.002"),))] == 0
    assert samples[("imstream_ingress_outbound_queued_frames", ())] == 3


def test_made_up_frame_types_share_one_label() -> None:
    metrics = IngressMetrics(frame_types={"send"}, process_metrics=False)
    for frame_type in ("send", "x" * 40, "drop table", "send2"):
        metrics.frame_in(frame_type)
    values = {
        sample.labels["type"]: sample.value
        for family in metrics.frames_in.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert values == {"send": 1, "unknown": 3}


def test_registries_are_private() -> None:
    first, second = IngressMetrics(), IngressMetrics()
    first.connections.inc()
    assert second.registry.get_sample_value("imstream_ingress_connections") == 0
    assert REGISTRY.get_sample_value("imstream_ingress_connections") is None
