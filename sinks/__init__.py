"""Where events leave Kafka: ScyllaDB/Cassandra, ClickHouse, APNs and FCM."""
