"""Event and frame schemas and the topic catalog: the one source of truth on the wire."""
