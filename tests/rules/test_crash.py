"""The crash bench, short: SIGKILLed builds keep the committed Manifest and a re-run converges
(bench/crash.py)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import crash  # noqa: E402


def test_ten_kills_at_random_moments(tmp_path, operator_key, inputs):
    from c10.trust.keys import load_trusted_keys

    key, pub, kid = operator_key
    fx = {"key": key, "pub": pub, "keyid": kid, "inputs": inputs,
          "trusted": load_trusted_keys([pub])}
    stats = crash.run(kills=10, seed=20260511, work=tmp_path, per_episode=(3, 5), fx=fx)
    print(stats)
    assert stats["kills"] == 10
    assert stats["failures"] == 0, stats["failure_details"]
    assert stats["converged"] == sum(stats["episodes"].values()) >= 2
