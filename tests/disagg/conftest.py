from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.disagg.server_helpers import Servers


@pytest.fixture
def start(llama_dir, tmp_path) -> Iterator[Servers]:
    """Start `kvflow serve` on the test model with extra flags; every server is stopped at the end."""
    servers = Servers(llama_dir, tmp_path)
    yield servers
    servers.stop_all()
