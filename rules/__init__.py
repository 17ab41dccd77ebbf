"""c10's doit layer (installed as c10.rules): tasks, actions, loader, driver, reporter."""
