"""This cache's build graph is c10's own: `doit list` shows it, `c10 init` wrote this file.

doit loads the graph through c10's loader, which doit.cfg beside this file names: doit then
imports nothing from this directory, so nothing planted here (bytecode, a module) can run in a
build. doit reads this file only when doit.cfg is gone.
"""
raise SystemExit("dodo.py: doit.cfg is missing here, so doit read this file instead of using c10's "
                 "loader; run `c10 init .` to write doit.cfg again, then re-run doit")
