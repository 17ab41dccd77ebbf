"""doit task generators for the c10 build graph: the only doit-aware code besides the CLI and API."""
from __future__ import annotations

import os

from rules.checker import Blake3Checker
from rules.reporter import C10Reporter

DEP_FILE = ".c10/doit.sqlite"

# sqlite3: `doit list`/`info` can read it during a build (gdbm locks them out) and a kill
# loses at most the run's updates (json loses concurrent ones); see DESIGN.md.
DOIT_CONFIG = {
    "default_tasks": ["build_cache"],
    "backend": "sqlite3",
    "dep_file": DEP_FILE,
    "check_file_uptodate": Blake3Checker,
    "reporter": C10Reporter,  # doit's console output, then the BuildReport (.c10/report.json)
    # `doit -n N` runs tasks in threads of this one process: the build lock and the operator key
    # are held once per build (forked workers would each try to take them).
    "par_type": "thread",
}

if os.path.isfile("c10.toml"):
    os.makedirs(".c10", exist_ok=True)  # doit opens its dep DB before any task runs
    from rules.depdb import recover

    recover(DEP_FILE)  # a corrupt DB is moved aside with a warning instead of stopping doit
