"""ClosableEnv: the context-manager and closed-check boilerplate shared by the envs."""

from __future__ import annotations

import pytest

from spear_engine.envs.base import ClosableEnv
from spear_engine.envs.webshop import WebShopEnv


class _Toy(ClosableEnv):
    name = "toy"

    def __init__(self) -> None:
        self.handle: object | None = object()

    def close(self) -> None:
        self.handle = None

    def _is_closed(self) -> bool:
        return self.handle is None


def test_with_closes_and_check_open_names_the_env():
    with _Toy() as env:
        env._check_open()
    assert env.handle is None
    with pytest.raises(RuntimeError, match="this toy env is closed"):
        env._check_open()


def test_with_closes_on_an_error():
    env = _Toy()
    with pytest.raises(KeyError), env:
        raise KeyError("boom")
    assert env._is_closed()


def test_webshop_is_a_context_manager_that_reopens_on_reset():
    with WebShopEnv(num_products=60) as env:
        env.reset(1)
    assert env._goal is None
    env._check_open()  # never refuses: a closed WebShop starts a new episode on reset
    env.reset(1)
