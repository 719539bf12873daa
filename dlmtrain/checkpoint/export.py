"""Export directories: a trained model as plain files, and back to a trainable Lightning checkpoint.

An export directory ``DST/`` holds

- ``model.safetensors``: the module's state dict (EMA weights by default, or the raw training
  weights), in float32 or bfloat16. A tied output head is stored once (under the embedding).
- ``config.json``: the resolved dlmtrain config (the same keys as a run's ``config.yaml``) plus one
  block ``dlmtrain_export`` saying what the file holds: format version, weights (ema | raw), dtype,
  training step, source, data seq_len and the tokenizer's description (kind, special tokens).
- ``tokenizer.json``: the tokenizer of the checkpoint's data (absent for the byte tokenizer,
  which needs no file; absent for an import made without ``--tokenizer``).

``load_pretrained(DST)`` rebuilds the module from these files alone (no Lightning checkpoint, no
data): eval mode, float32 unless asked otherwise, ready for ``nelbo`` and sampling, with
``module.tokenizer`` and ``module.seq_len`` attached. ``export_to_lightning`` writes a checkpoint
that ``dlmtrain train ... run.resume=<it>`` continues from: the weights, the EMA started at those
weights, and a *fresh* optimizer and LR schedule at step 0 (an export keeps no optimizer state).

Every write is atomic: the directory is assembled under a temporary name beside ``DST`` and
renamed into place; an existing ``DST`` is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dlmtrain.errors import ConfigError

FORMAT = 1
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ----------------------------------------------------------------------------- what a path is


def is_export_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file() and _meta(p) is not None


def _meta(path: Path) -> dict | None:
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    meta = cfg.get("dlmtrain_export") if isinstance(cfg, dict) else None
    return meta if isinstance(meta, dict) else None


def sharded_kind(path: str | Path) -> str | None:
    """'DeepSpeed' / 'FSDP (torch.distributed.checkpoint)' for a sharded checkpoint directory, else None."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "latest").is_file() or any(p.glob("**/*zero_pp_rank_*")) or any(p.glob("**/mp_rank_*_model_states.pt")):
        return "DeepSpeed"
    if any(p.glob("**/.metadata")) or any(p.glob("**/*.distcp")):
        return "FSDP (torch.distributed.checkpoint)"
    return None


def refuse_sharded(path: str | Path) -> None:
    """Refuse a DeepSpeed / DCP directory without dlmtrain's manifest (dlmtrain.json, written last):
    an interrupted save, or not written by dlmtrain train. A complete one is read (read_whole)."""
    from dlmtrain.checkpoint.files import MANIFEST

    kind = sharded_kind(path)
    if kind and not (Path(path) / MANIFEST).is_file():
        raise ConfigError(f"{path} is a {kind} sharded checkpoint without {MANIFEST}: incomplete (an interrupted "
                          "save) or not written by dlmtrain train; use a complete checkpoint, or DeepSpeed's "
                          "zero_to_fp32.py / torch's dcp_to_torch_save for another program's")


# ----------------------------------------------------------------------------- atomic directory


def check_destination(dst: str | Path, force: bool) -> Path:
    """Refuse an existing ``dst`` without ``force`` and a missing parent, before any work."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        if not force:
            raise ConfigError(f"{dst} already exists; choose another destination or pass --force to replace it")
        if dst.is_dir() and not is_export_dir(dst):
            raise ConfigError(f"{dst} is a directory that is not a dlmtrain export; --force replaces only export "
                              "directories and files: choose another destination")
    if not dst.parent.exists():
        raise ConfigError(f"{dst.parent} does not exist; create it first")
    return dst


def _publish_dir(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` to ``dst``; an existing ``dst`` (force) is moved aside first and
    removed only after the new one is in place."""
    from dlmtrain.checkpoint.files import temp_name

    old = None
    if dst.exists():
        old = Path(temp_name(dst) + ".old")
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def write_export(dst: str | Path, state: dict, config: dict, meta: dict, tokenizer=None, force: bool = False) -> Path:
    """Write an export directory atomically. ``state``: name -> tensor (already in the wanted dtype);
    ``config``: the resolved config as a dict; ``tokenizer``: a dlmtrain Tokenizer or None."""
    from safetensors.torch import save_file

    from dlmtrain.checkpoint.files import temp_name

    dst = check_destination(dst, force)
    tmp = Path(temp_name(dst))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        seen, tensors, aliases = {}, {}, {}
        for name, t in state.items():  # a tied head shares the embedding's storage: store it once
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
            if key is not None and key in seen:
                aliases[name] = seen[key]
                continue
            if key is not None:
                seen[key] = name
            tensors[name] = t.detach().to("cpu").contiguous()
        meta = {**meta, "format": FORMAT, "aliases": aliases}
        if tokenizer is not None:
            meta["tokenizer"] = tokenizer.describe()
            if tokenizer.kind == "hf":
                (tmp / TOKENIZER_FILE).write_text(tokenizer.to_str())
                meta["tokenizer"]["file"] = TOKENIZER_FILE
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "dlmtrain_export": str(FORMAT),
                                                               "weights": str(meta.get("weights", "")),
                                                               "dtype": str(meta.get("dtype", ""))})
        (tmp / CONFIG_FILE).write_text(json.dumps({**config, "dlmtrain_export": meta}, indent=1) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ----------------------------------------------------------------------------- .ckpt -> export


def cast_state(state: dict, dtype: str) -> dict:
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    target = getattr(torch, DTYPES[dtype])
    done: dict = {}  # tensors sharing storage (a tied head) stay shared after the cast, so they are stored once
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key not in done:
            done[key] = v.to(target) if v.is_floating_point() else v
        out[k] = done[key]
    return out


def data_tokenizer(cfg, data: str | None = None):
    """(tokenizer, seq_len) of the data a config names (or ``data``), read from its manifest."""
    from omegaconf import OmegaConf

    from dlmtrain.data import build_datamodule
    from dlmtrain.errors import UserError

    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if data:
        c.data.manifest = data
    try:
        dm = build_datamodule(c, 1)
    except UserError as e:
        raise ConfigError(f"cannot read the checkpoint's data for its tokenizer ({e}); pass --data MANIFEST "
                          "(a manifest with the same tokenizer)") from None
    if dm.vocab_size > int(cfg.model.vocab_size):
        raise ConfigError(f"the data's vocabulary ({dm.vocab_size}, {dm.manifest_url}) is larger than the model's "
                          f"({cfg.model.vocab_size}); pass --data with the tokenizer the model was trained with")
    return dm.tokenizer, dm.seq_len


def export_checkpoint(src: str | Path, dst: str | Path, ema: bool = True, dtype: str = "fp32", force: bool = False,
                      data: str | None = None, say=print) -> Path:
    """A dlmtrain Lightning ``.ckpt`` -> an export directory (see the module docstring)."""
    from omegaconf import OmegaConf

    from dlmtrain.checkpoint import load_checkpoint

    dst = check_destination(dst, force)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    module = load_checkpoint(src, ema=ema)
    tok, seq_len = data_tokenizer(module.cfg, data)
    meta = {"weights": module.weights, "dtype": dtype, "step": module.global_step_loaded, "source": str(src),
            "source_format": "dlmtrain", "seq_len": seq_len, "objective": module.cfg.objective.name}
    config = OmegaConf.to_container(module.cfg, resolve=True)
    out = write_export(dst, cast_state(module.state_dict(), dtype), config, meta, tok, force)
    say(f"[dlmtrain] exported {src} (step {module.global_step_loaded}, {module.weights} weights, {dtype}) to {out}/")
    return out


# ----------------------------------------------------------------------------- export -> module


def read_export(path: str | Path) -> tuple[dict, dict]:
    """(config dict without the export block, export metadata) of an export directory."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{path} is not an export directory (expected a directory with {CONFIG_FILE} and {WEIGHTS_FILE})")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (p / f).is_file()]
    if missing:
        raise ConfigError(f"{path} is not a dlmtrain export directory (no {' / '.join(missing)}); write one with "
                          "`dlmtrain convert CKPT DST --to safetensors`")
    try:
        cfg = json.loads((p / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {p / CONFIG_FILE}: {str(e).splitlines()[0]}") from None
    meta = cfg.pop("dlmtrain_export", None) if isinstance(cfg, dict) else None
    if not isinstance(meta, dict):
        hint = "; it looks like a Hugging Face MDLM directory: use `dlmtrain convert --from mdlm`" \
            if isinstance(cfg, dict) and cfg.get("model_type") == "mdlm" else ""
        raise ConfigError(f"{p / CONFIG_FILE} was not written by dlmtrain convert (no dlmtrain_export block){hint}")
    if int(meta.get("format", 0)) > FORMAT:
        raise ConfigError(f"{path} has export format {meta.get('format')}; this dlmtrain reads up to {FORMAT}: upgrade dlmtrain")
    return cfg, meta


def export_tokenizer(path: Path, meta: dict):
    """The tokenizer an export directory holds (None if it has none)."""
    from dlmtrain.data.tokenizer import ByteTokenizer, hf_from_str

    info = meta.get("tokenizer")
    if not info:
        return None
    if info["kind"] == "bytes":
        return ByteTokenizer()
    specials = {k: (v["token"], int(v["id"])) for k, v in info["special_tokens"].items()}
    try:
        return hf_from_str((path / info.get("file", TOKENIZER_FILE)).read_text(), specials)
    except (OSError, ValueError, Exception) as e:  # tokenizers raises its own Exception type
        raise ConfigError(f"cannot read the tokenizer of {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_pretrained(path: str | Path, map_location="cpu", dtype=None, overrides: list[str] | None = None):
    """The module stored in an export directory, in eval mode, ready for ``nelbo`` and sampling.

    float32 parameters unless ``dtype`` (a torch dtype) is given. ``overrides`` may change settings
    that do not alter the weights (``model.attn_backend=sdpa``). Attached: ``module.tokenizer`` (or
    None), ``module.seq_len`` (the data's, or None), ``module.weights`` (ema | raw),
    ``module.global_step_loaded`` and ``module.export_meta``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dlmtrain.config import config_from_resolved
    from dlmtrain.modules import build_module

    p = Path(path)
    cfg_dict, meta = read_export(p)
    cfg = config_from_resolved(cfg_dict, overrides, where=str(p / CONFIG_FILE))
    module = build_module(cfg)
    try:
        state = load_file(str(p / WEIGHTS_FILE))
    except (SafetensorError, OSError, Exception) as e:  # a truncated file raises SafetensorError
        raise ConfigError(f"{p / WEIGHTS_FILE} is not a readable safetensors file "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    aliases = meta.get("aliases", {})
    for name, target in aliases.items():
        if target in state:
            state[name] = state[target]
    expected = module.state_dict()
    bad = [k for k in state if k not in expected] + [k for k in expected if k not in state]
    shapes = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad or shapes:
        what = f"keys {bad[:3]}" if bad else f"shapes of {shapes[:3]}"
        raise ConfigError(f"{p / WEIGHTS_FILE} does not match the model its {CONFIG_FILE} describes ({what}); "
                          "the export is damaged or was edited")
    module.load_state_dict(state)
    module.weights = meta.get("weights", "raw")
    module.global_step_loaded = int(meta.get("step", 0))
    module.export_meta = meta
    module.tokenizer = export_tokenizer(p, meta)
    module.seq_len = meta.get("seq_len")
    module = module.to(map_location if map_location is not None else "cpu")
    if dtype is not None:
        module = module.to(dtype)
    return module.eval()


# ----------------------------------------------------------------------------- module -> .ckpt


def write_lightning(module, dst: str | Path, force: bool = False, step: int = 0) -> Path:
    """A Lightning checkpoint of ``module``'s weights that ``dlmtrain train run.resume=<dst>`` continues:
    EMA started at these weights, fresh optimizer and LR-schedule state (step 0 of the schedule)."""
    import lightning
    from omegaconf import OmegaConf

    from dlmtrain.callbacks.checkpoint_io import AtomicCheckpointIO
    from dlmtrain.modules.ema import EMA

    dst = check_destination(dst, force)
    module = module.float().train()
    opt = module.configure_optimizers()
    ck = {
        "epoch": 0, "global_step": step, "pytorch-lightning_version": lightning.__version__,
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "optimizer_states": [opt["optimizer"].state_dict()],
        "lr_schedulers": [opt["lr_scheduler"]["scheduler"].state_dict()],
        "hparams_name": "kwargs", "hyper_parameters": dict(module.hparams),
        "dlmtrain_config": OmegaConf.to_yaml(module.cfg, resolve=True),
    }
    if module.cfg.optim.ema > 0:
        ck["ema"] = EMA(module.backbone, module.cfg.optim.ema).state_dict()
    AtomicCheckpointIO().save_checkpoint(ck, dst)
    return dst


def export_to_lightning(src: str | Path, dst: str | Path, force: bool = False, say=print) -> Path:
    """An export directory -> a Lightning checkpoint (see write_lightning)."""
    dst = check_destination(dst, force)
    module = load_pretrained(src)
    out = write_lightning(module, dst, force)
    say(f"[dlmtrain] wrote {out} from {src} ({module.weights} weights; fresh optimizer, step 0): continue with "
        f"`dlmtrain train CONFIG run.resume={out}` (the config's model and objective must match)")
    return out
