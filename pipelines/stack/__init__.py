"""The embedded local stack: Apache Kafka, Apache Cassandra and chDB on one machine."""
