"""Fixtures shared by the integration tests: the real registries on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ci_required
from tests.registry_rig import Rig, missing_prerequisites


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """docker-registry processes (plain, basic, token, redirect) with images pushed by skopeo."""
    missing = missing_prerequisites()
    if missing:
        ci_required(f"real-registry tests need: {', '.join(missing)} "
                    "(apt-get install docker-registry skopeo apache2-utils)")
    rig = Rig(tmp_path_factory.mktemp("registry-rig"))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()
