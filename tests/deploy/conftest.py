from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.harness import Up

from .support import UP_ARGS


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One `pydstack up` per module (KMS and scheduler, no VMM, no gateway node); every test
    deploys its own app, so the tests do not depend on each other."""
    up = Up(Path(tmp_path_factory.mktemp("deploy")) / "home", extra=UP_ARGS).start()
    yield up
    assert up.stop() == 0, up.text()
