"""Fixtures of the query tests: a built cache and the public key its Manifest is signed with."""
from __future__ import annotations

import pytest

from c10.rules.driver import run_build


@pytest.fixture
def built(cache, capsys):
    assert run_build(cache) == 0, capsys.readouterr().out
    capsys.readouterr()
    return cache


@pytest.fixture
def pub(operator_key):
    return operator_key[1]
