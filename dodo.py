"""The c10 build graph of this cache directory (written by `c10 init`): `doit list` shows the tasks."""
from rules import DOIT_CONFIG  # noqa: F401
from rules.tasks import (  # noqa: F401
    task_build_cache, task_coverage, task_engines, task_index, task_manifest, task_shards)
