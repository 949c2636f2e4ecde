"""Fixtures shared by the integration tests: an in-process broker (`broker`) and an HTTP client to it (`http`)."""

from tests.integration.test_end_to_end import broker, http  # noqa: F401
