"""The README's flight workflow on the demo: build, pack, verify the image --airborne, query it."""
from __future__ import annotations

import json
import re

from c10.cli import main as c10_main


def run(capsys, *args) -> tuple[int, str]:
    code = c10_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_demo_pack_verify_airborne_then_query_the_image(tmp_path, capsys):
    demo, image = tmp_path / "demo", tmp_path / "usb" / "sector"
    image.parent.mkdir()
    code, out = run(capsys, "demo", demo, "--tiles", "40", "--backend", "onnxruntime")
    assert code == 0, out
    pub = re.search(r"--trusted-keys (\S+)", out).group(1)
    code, out = run(capsys, "pack", demo, image, "--trusted-keys", pub)
    assert code == 0, out
    # the image holds the signed files only: no control file of the build workspace
    assert not any((image / name).exists() for name in ("c10.toml", "dodo.py", "doit.cfg", ".c10"))
    code, out = run(capsys, "verify", image, "--airborne", "--trusted-keys", pub, "--json",
                    "--state", tmp_path / "state.json")
    assert code == 0 and json.loads(out)["ok"], out
    tile = sorted((image / "tiles" / "16").rglob("*.jpg"))[3]
    code, out = run(capsys, "query", image, tile, "-k", "3", "--json", "--trusted-keys", pub)
    assert code == 0, out
    best = json.loads(out)["hits"][0]
    assert best["path"] == tile.relative_to(image).as_posix() and best["score"] > 0.999
    # the image answers exactly as the workspace it came from
    code, ground = run(capsys, "query", demo, demo / tile.relative_to(image), "-k", "3", "--json",
                       "--trusted-keys", pub)
    assert code == 0 and json.loads(ground)["hits"] == json.loads(out)["hits"]


def test_a_demo_with_windows_signs_them_and_keeps_its_comments(tmp_path, capsys):
    """`c10 demo --stride 0.5` (the default with --real-models): shards.stride is written into
    c10.toml with its comments kept, the window shards are built and signed, and the aircraft
    reads div = 2 from the signed runtime spec."""
    import json

    from c10.cli import main as c10_main

    root = tmp_path / "demo"
    assert c10_main(["demo", str(root), "--tiles", "24", "--backend", "onnxruntime",
                     "--key", str(tmp_path / "k.pem"), "--stride", "0.5"]) == 0
    text = (root / "c10.toml").read_text()
    assert "stride = 0.5" in text and "# Retrieval windows of the global models" in text
    body = json.loads((root / "Manifest.json").read_bytes())
    assert any(f["path"].startswith("shards/global/") and ".windows." in f["path"]
               for f in body["files"])
    assert body["runtime"]["models"]["global"]["index"]["div"] == 2
