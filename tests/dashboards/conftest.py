"""The system under the supervisor (tests/pipelines/conftest.py), for the browser test: one start
for this package."""

from tests.pipelines.conftest import push_fakes, supervised, system

__all__ = ["push_fakes", "supervised", "system"]
