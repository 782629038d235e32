"""The REST API, one router per resource: commands, devices (push tokens), operations."""
