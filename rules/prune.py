"""prune: stale engines and writers' leftovers, listed; `doit prune --apply` removes them."""
from __future__ import annotations

from c10.rules import session
from c10.rules.adapters import action, plan_or_none


def task_prune():
    """List stale engines and leftovers (engines of other keys); `doit prune --apply` removes
    them."""
    if plan_or_none() is None:
        return {"actions": None}
    return {
        "actions": [action(prune)],
        "params": [{"name": "apply", "long": "apply", "type": bool, "default": False,
                    "help": "remove the listed files (default: only list them)"}],
        "uptodate": [False],
        "verbosity": 2,
    }


def prune(apply: bool) -> None:
    """List (and with --apply remove) stale derived files; never inputs or unrecognised files."""
    from c10.tools.prune import remove_files, stale_files

    build = session.current()
    plan = build.plan()
    stale, unknown = stale_files(plan.root, plan.declared())
    for rel in stale:
        print(f"{'removing' if apply else 'stale'} {rel}")
    for rel in unknown:
        print(f"not c10's, left alone: {rel} (move it out of the cache yourself)")
    if apply and stale:
        build.ensure_locked()
        print(f"freed {remove_files(plan.root, stale) / 1e6:.1f} MB; run `doit build_cache` to "
              "re-sign")
    elif stale:
        print(f"{len(stale)} stale file(s); `doit prune --apply` removes them")
