"""The ingress gateway: WebSocket and REST door for clients, publishing to Kafka."""
