"""Stream processors (Kafka-transactional loops): sequencing, dedupe, fan-out, routing."""
