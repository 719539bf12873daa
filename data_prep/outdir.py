"""The output directory: checks before anything is written, replacing a dataset safely, shard checks.

Replacing a finished dataset (``--overwrite``, or a rerun that found damaged shards) leaves
it alone until the new one is complete: the new dataset is written to ``OUT/.prep-new/``
(inside OUT, so the same filesystem, and a hidden name that no reader or input walk
sees); an interrupted replacement resumes there. Then ``install`` swaps it in with
renames: remove the old manifest (the old dataset is gone from readers' view), move the
new files in, move the new manifest in last, delete stale files of ours. A run stopped
during the swap is finished by the next run (``recover``): the new dataset is complete in
``.prep-new`` until its manifest has moved.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from dlmtrain.data.tokenizer import file_sha256
from dlmtrain.errors import DataError

NEW = ".prep-new"
OURS = re.compile(r"^((train|val)-\d{6}\.tar|manifest\.json|tokenizer\.json|inputs\.json)(\.tmp-\d+)?$"
                  r"|^\.prep-state\.json(\.tmp-\d+)?$|^\.prep-probe-\d+$")


def check_out(out: Path, spelled: str, input_paths: list[str]) -> None:
    """Refuse an --out that cannot hold a dataset, then create it; nothing is written before a refusal."""
    for raw in input_paths:
        d = Path(raw).expanduser().resolve()
        if d.is_dir() and (out == d or d in out.parents):
            where = "is" if out == d else "lies inside"
            raise DataError(f"--out {spelled} {where} the input directory {raw}, so its shards would be read "
                            f"as input next time; choose an --out outside {raw}")
    missing = [a for a in [out, *out.parents] if not a.exists()]
    base = out.parents[len(missing) - 1] if missing else out
    if not base.is_dir():
        raise DataError(f"--out {spelled}: {base} is a file, not a directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".prep-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        for d in missing:  # deepest first: leave nothing behind
            try:
                d.rmdir()
            except OSError:
                pass
        raise DataError(f"cannot write to --out {spelled} (in {base}): {e.strerror or e}; "
                        "choose a directory you can write to") from None


def remove_ours(d: Path, keep: set[str] = frozenset(), rmdir: bool = False) -> None:
    """Delete the files of ours in ``d`` except ``keep`` (never anything else); ``rmdir`` if then empty."""
    if not d.is_dir():
        return
    for p in d.iterdir():
        if OURS.match(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
    if rmdir:
        try:
            d.rmdir()
        except OSError:  # holds something we did not write: leave it
            pass


def _dataset_files(manifest: dict) -> set[str]:
    names = {s["name"] for sp in manifest["splits"].values() for s in sp["shards"]}
    return names | {"manifest.json", "inputs.json"} | ({manifest["tokenizer"]["file"]} - {None})


def install(out: Path, new: Path) -> None:
    """Swap the complete dataset in ``new`` into ``out`` (idempotent: a rerun finishes a stopped swap)."""
    manifest = json.loads((new / "manifest.json").read_text())
    (out / "manifest.json").unlink(missing_ok=True)  # from here readers see no dataset until the new one is whole
    for p in sorted(new.iterdir()):
        if OURS.match(p.name) and p.name != "manifest.json":
            os.replace(p, out / p.name)
    os.replace(new / "manifest.json", out / "manifest.json")
    remove_ours(out, keep=_dataset_files(manifest))
    remove_ours(new, rmdir=True)


def recover(out: Path) -> bool:
    """Finish a replacement that was stopped after its new dataset was complete; True if it did."""
    new = out / NEW
    if (new / "manifest.json").is_file():
        install(out, new)
        return True
    return False


def verify(out: Path, manifest: dict, full: bool, tick=None) -> tuple[list[str], int, float]:
    """Files of the dataset that differ from the manifest (size; sha256 too if ``full``), bytes read, seconds.

    ``tick(files_done, files, bytes_read)`` is called after each file (progress lines)."""
    t = time.time()
    want = [(s["name"], s["bytes"], s["sha256"]) for sp in manifest["splits"].values() for s in sp["shards"]]
    tok = manifest.get("tokenizer", {})
    if tok.get("file") and tok.get("sha256"):
        want.append((tok["file"], None, tok["sha256"]))
    bad, read = [], 0
    for i, (name, size, sha) in enumerate(want):
        p = out / name
        if not p.is_file():
            bad.append(f"{name} is missing")
        elif size is not None and p.stat().st_size != size:
            bad.append(f"{name} has {p.stat().st_size} bytes, the manifest says {size}")
        elif full or size is None:
            read += p.stat().st_size
            if file_sha256(p) != sha:
                bad.append(f"{name} has another sha256 than the manifest")
        if tick is not None:
            tick(i + 1, len(want), read)
    return bad, read, time.time() - t
