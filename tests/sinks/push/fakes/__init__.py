"""Local stand-ins for APNs and FCM that behave like the real services, for the push tests.

They listen on 127.0.0.1 only, on an ephemeral port, and are started and stopped by the
fixtures in ``tests/sinks/push/conftest.py``. Nothing outside ``tests/`` imports them.
"""
