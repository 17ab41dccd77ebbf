"""c10's doit layer, installed as c10.rules: the task generators (one module per artifact family),
their actions, the loader and in-process driver, the reporter. The only code that imports doit."""
