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
