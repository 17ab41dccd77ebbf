"""OvRunner under many threads at once: no hang (a hard join timeout), the single-threaded
results, and no infer request ever used by two threads."""
from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest
from tiny_models import images, spec_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason="openvino is not installed")

THREADS = 12
CALLS = 6
JOIN_TIMEOUT_S = 60  # well under pytest-timeout's 300 s: a hang fails here, naming the threads


@pytest.fixture
def runner(tmp_path, onnx_file):
    from c10.features.backends.openvino import OpenVinoBackend
    from c10.features.engines import build_engine, load_engine

    backend, spec = OpenVinoBackend(), spec_for(onnx_file, batch=(1, 8, 16))
    return load_engine(build_engine(spec, backend, tmp_path / "engines")[0], spec, backend)


def run_threads(target, n: int) -> list:
    """target(i) on n threads started together; their results, or a failure if any is stuck."""
    start, results, errors = threading.Barrier(n), [None] * n, []

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 (reported below, on the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True, name=f"ov-{i}")
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still inside the runner after {JOIN_TIMEOUT_S} s: {stuck}"
    assert not errors, errors
    return results


def test_many_threads_on_one_runner_get_the_single_threaded_results(runner):
    """run_stream and run (a batch split over the streams, so pool threads too) from many
    threads at once, their first calls together: same outputs as one thread alone, each request
    used by exactly one thread."""
    owner: dict[int, tuple] = {}  # id(request) -> (the one thread that used it, the request)
    shared: list = []
    infer = runner._infer

    def recording(request, feeds):
        # the request is kept: a thread's request goes with the thread, and its id could be reused
        me = threading.get_ident()
        if owner.setdefault(id(request), (me, request))[0] != me:
            shared.append(id(request))
        return infer(request, feeds)

    runner._infer = recording
    name = runner.input_names[0]
    # 3, 11, 20 rows: under, at and over the streams, 20 > max batch 16 (chunked).
    batches = [images(n, seed=n) for n in (1, 3, 8, 11, 20)]

    def calls(i: int) -> list:
        out = []
        for c in range(CALLS):
            batch = batches[(i + c) % len(batches)]
            feeds = {name: batch}
            out.append(runner.run(feeds)[0] if (i + c) % 2 else runner.run_stream(feeds)[0])
        return out

    together = run_threads(calls, THREADS)
    fresh = {id(b): runner.run({name: b})[0] for b in batches}  # one thread, after
    for i, outs in enumerate(together):
        for c, out in enumerate(outs):
            batch = batches[(i + c) % len(batches)]
            assert out.shape == (len(batch), 16)
            np.testing.assert_allclose(out, fresh[id(batch)], rtol=1e-5, atol=1e-5)
    assert not shared, "an infer request was used by more than one thread"
    assert len(owner) >= THREADS  # every caller thread had its own request


def test_results_match_a_reference_made_before_any_thread(tmp_path, onnx_file):
    """The reference from a runner that only ever saw one thread, the threads on another."""
    from c10.features.backends.openvino import OpenVinoBackend
    from c10.features.engines import build_engine, load_engine

    backend, spec = OpenVinoBackend(), spec_for(onnx_file, batch=(1, 8, 16))
    path = build_engine(spec, backend, tmp_path / "engines")[0]
    alone, shared = load_engine(path, spec, backend), load_engine(path, spec, backend)
    batches = [images(n, seed=100 + n) for n in (2, 7, 16)]
    reference = [alone(b) for b in batches]
    results = run_threads(lambda i: [shared.stream(b) if i % 2 else shared(b) for b in batches],
                          THREADS)
    for outs in results:
        for out, ref in zip(outs, reference):
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
