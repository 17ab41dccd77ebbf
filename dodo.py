"""The c10 build graph of this cache directory (written by `c10 init`): `doit list` shows the tasks."""
from rules import DOIT_CONFIG  # noqa: F401
from rules.tasks import *  # noqa: F401,F403  (every task_* generator: the graph grows with c10)
