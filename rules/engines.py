"""engines:{model}: compile each model into an engine for this host, named by its identity key."""
from __future__ import annotations

from pathlib import Path

from c10.rules import session
from c10.rules.adapters import action, changed, plan_or_none
from c10.store.layout import ENGINES_DIR


def task_engines():
    """Compile each model into an engine for this host, named by its identity key."""
    plan = plan_or_none()
    for name, model_plan in (plan.plans.items() if plan else ()):
        deps = [str(model_plan.model.path.resolve())]
        if model_plan.spec.calibration_path is not None:
            deps.append(str(Path(model_plan.spec.calibration_path).resolve()))
        spec = model_plan.spec
        # an INT8 engine's gate reruns (on its recorded figures) when a threshold changes
        gate = ({"int8_min_cosine": spec.int8_min_cosine,
                 "int8_max_recall_drop": spec.int8_max_recall_drop}
                if spec.precision == "int8" and model_plan.backend.quantizer() else {})
        if gate and spec.role == "local":  # a local model's gate: matches, by the matcher
            gate = {"int8_min_match_retention": spec.int8_min_match_retention}
            if spec.gate_matcher:
                deps.append(str(Path(spec.gate_matcher).resolve()))
        yield {
            "name": name,
            "doc": f"engine of model {name} ({model_plan.backend.name})",
            "file_dep": deps,
            "targets": [model_plan.engine_rel, model_plan.sidecar_rel],
            "uptodate": [changed({"engine_key": model_plan.engine_key, **gate})],
            "actions": [(action(build_engine), [name])],
            # no "clean": engines are removed only by `doit prune --apply` (GC is explicit)
        }


def build_engine(name: str) -> dict:
    from c10.features import engines
    from c10.tools.export import check_backend

    build = session.current()
    model_plan = build.begin_writing().plans[name]
    # DeformConv vs OpenVINO: say the fix before the backend fails on it
    check_backend(model_plan.spec.onnx_path, name, model_plan.backend.name)
    _, built = engines.build_engine(model_plan.spec, model_plan.backend, build.root / ENGINES_DIR,
                                    written=lambda files: _record(build, files))
    return {"built": built}


def _record(build, files: dict[str, str]) -> None:
    """A compiled engine and its sidecar are this host's own (c10.trust.provenance), ledgered
    before they appear in engines/."""
    for name, digest in files.items():
        build.provenance.record(f"{ENGINES_DIR}/{name}", digest)
    build.provenance.save()
