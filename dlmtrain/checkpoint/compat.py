"""Which config changes a resumed run may make.

A checkpoint fixes what was learned: the network's shape and the objective. Changing
those on resume would either fail to load (shapes) or silently continue a different
model, so they are refused. Everything else (length of training, LR schedule, logging,
validation and checkpoint cadence, data loading) is applied and listed.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

# Prefixes a resume may not change; model keys that do not change the weights are exempt.
FIXED = ("model.", "objective.")
FREE = {"model.attn_backend", "model.dropout", "model.name"}


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def diff(old_yaml: str, new: DictConfig) -> tuple[list[str], list[str]]:
    """(refused, applied) changes from the checkpoint's config to ``new`` (filled from the data
    already, so vocabulary and special ids compare as trained), as 'key: old -> new'."""
    from dlmtrain.config import _objective_name, schema

    raw = OmegaConf.create(old_yaml)
    try:  # keys added to the schema after the checkpoint was written compare as their defaults
        raw = OmegaConf.merge(schema(_objective_name(raw)), raw)
    except Exception:  # noqa: BLE001 - an unknown old key: compare as written, it shows up in the diff
        pass
    old = _flat(OmegaConf.to_container(raw, resolve=True))
    cur = _flat(OmegaConf.to_container(new, resolve=True))
    refused, applied = [], []
    for key in sorted(set(old) | set(cur)):
        a, b = old.get(key, "<absent>"), cur.get(key, "<absent>")
        if a == b or key == "run.resume":
            continue
        line = f"{key}: {a} -> {b}"
        fixed = key.startswith(FIXED) and key not in FREE
        (refused if fixed else applied).append(line)
    return refused, applied


ACCUMULATION_KEY = "dlmtrain_accumulation"  # gradient accumulation of the run that saved the checkpoint


def rescale_micro_batches(checkpoint: dict, was: int, now: int) -> bool:
    """Lightning places optimizer steps (and validations) by counting micro-batches: a checkpoint
    saved with gradient accumulation ``was`` resumed with ``now`` (another world size or
    micro_batch_size) would take its first optimizer step after a partial global batch. Our
    checkpoints are saved at optimizer-step boundaries, so the counters are whole multiples of
    ``was``; they become the same number of steps at ``now``. Returns whether anything changed."""
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    except (KeyError, TypeError):
        return False
    if was == now or was < 1 or now < 1:
        return False
    parts = [progress[p] for p in ("total", "current") if isinstance(progress.get(p), dict)]
    if any(int(v) % was for part in parts for v in part.values()):
        return False  # not at a step boundary (not written by dlmtrain): leave Lightning's counters alone
    for part in parts:
        for k, v in part.items():
            part[k] = int(v) // was * now
    checkpoint[ACCUMULATION_KEY] = now
    return True
