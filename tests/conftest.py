from __future__ import annotations

import pytest

# Redis fixtures (redis_url, redis_prefix, own_redis_url, start_redis) for every suite.
pytest_plugins = ["tests.redis_support"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
