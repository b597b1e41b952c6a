"""Fixtures for the sandbox and tool tests."""

import pytest

from tests.tools.helpers import make_sandbox
from verl_mega.tools import Sandbox


@pytest.fixture
def sandbox() -> Sandbox:
    """A sandbox with helpers.SMALL limits."""
    return make_sandbox()
