"""Import of MDLM checkpoints (Sahoo et al., 2024; github.com/kuleshov-group/mdlm) onto our backbone.

Two source layouts, both holding their DiT under the prefix ``backbone.``:

- their Lightning ``.ckpt``: ``state_dict`` (raw weights), ``ema`` = {decay, num_updates,
  shadow_params: a *list* of tensors in the order of ``backbone.parameters()``}, and
  ``hyper_parameters.config`` (their Hydra config: model.n_heads, time_conditioning,
  parameterization, noise.type, training.sampling_eps, ...). It also pickles their tokenizer, so
  the file is read with an unpickler that stands in a placeholder for classes that are not
  installed (transformers) instead of failing;
- the Hugging Face layout of ``kuleshov-group/mdlm-owt``: ``config.json`` (model_type "mdlm",
  hidden_dim, n_blocks, n_heads, cond_dim, vocab_size, time_conditioning) and
  ``model.safetensors`` or ``pytorch_model.bin``.

Their DiT (models/dit.py), as named config data here (configs/model/mdlm_dit.yaml):
LayerNorm without bias, eps 1e-5 (``norm_eps``); qkv and attention output without bias; a GELU-tanh
MLP of exactly 4 x hidden with biases (``mlp_width``, ``mlp_bias``); rotary embeddings in the
rotate-half layout with base 10000 on q and k (what our Rotary does); adaLN with one linear per
block giving (shift, scale, gate) for attention then MLP, and (shift, scale) before the output head
(the order our blocks use); a noise-level embedding of 256 sinusoidal features (cos then sin,
max period 10000) -> Linear -> SiLU -> Linear, then SiLU (``time_freq_dim=256``); an output head
with a bias (``head_bias``). Time conditioning: with time_conditioning=False they still run the
adaLN layers, on sigma = 0 (``adaln_always``); with True they feed sigma = -log(1 - (1 - eps) t),
the same function of the masking rate as our loglinear schedule's sigma = -log(1 - t). The
[MASK] token is the last id when the tokenizer has none (GPT-2: 50257 of 50258).

Only what our MDLM objective computes exactly is imported: backbone ``dit``, parameterization
``subs``, noise ``loglinear``. Others (SEDD / D3PM parameterizations, DiMamba, AR) are refused.
Dropout: their dropout sits elsewhere in the block; the import sets ``model.dropout=0`` (eval
is unaffected; set it when fine-tuning if wanted).
"""

from __future__ import annotations

import json
import pickle
import types
from pathlib import Path

from dlmtrain.errors import ConfigError

# Our backbone options that make it compute their DiT live in configs/model/mdlm_dit.yaml (named
# config data); the importer picks that file and sets the sizes it reads from the weights.
MODEL_CONFIG = "mdlm_dit"

# their name (after "backbone.") -> ours (after "backbone."); {i} = block index
_BLOCK = {
    "norm1.weight": "norm1.weight", "attn_qkv.weight": "attn.qkv.weight", "attn_out.weight": "attn.proj.weight",
    "norm2.weight": "norm2.weight", "mlp.0.weight": "mlp.up.weight", "mlp.0.bias": "mlp.up.bias",
    "mlp.2.weight": "mlp.down.weight", "mlp.2.bias": "mlp.down.bias",
    "adaLN_modulation.weight": "ada.weight", "adaLN_modulation.bias": "ada.bias",
}
_TOP = {
    "vocab_embed.embedding": "embed.weight",
    "sigma_map.mlp.0.weight": "time.mlp.0.weight", "sigma_map.mlp.0.bias": "time.mlp.0.bias",
    "sigma_map.mlp.2.weight": "time.mlp.2.weight", "sigma_map.mlp.2.bias": "time.mlp.2.bias",
    "output_layer.norm_final.weight": "norm.weight",
    "output_layer.linear.weight": "head.weight", "output_layer.linear.bias": "head.bias",
    "output_layer.adaLN_modulation.weight": "final_ada.weight", "output_layer.adaLN_modulation.bias": "final_ada.bias",
}
_BUFFERS = ("rotary_emb.inv_freq",)  # recomputed by our Rotary (checked equal)


def their_name_to_ours(name: str) -> str | None:
    """'blocks.3.attn_qkv.weight' -> 'blocks.3.attn.qkv.weight' (names without 'backbone.'); None: unknown."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"blocks.{parts[1]}.{_BLOCK[parts[2]]}"
    return None


# ----------------------------------------------------------------------------- reading their files


class _Missing:
    """Stands in for a pickled object whose class is not installed (their tokenizer)."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Missing,), {"__module__": "dlmtrain.checkpoint.mdlm.missing"})


_lenient_pickle = types.SimpleNamespace(Unpickler=_LenientUnpickler, load=pickle.load, loads=pickle.loads,
                                        __name__="pickle")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def _read_ckpt(path: Path) -> tuple[dict, dict | None, dict]:
    """(raw backbone state, EMA state or None, facts) of their Lightning checkpoint."""
    import torch
    from omegaconf import DictConfig, OmegaConf

    try:
        ck = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        raise ConfigError(f"{path} is not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict):
        raise ConfigError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if ck.get("dlmtrain_config"):
        raise ConfigError(f"{path} is a dlmtrain checkpoint, not an MDLM one; convert it without --from mdlm")
    sd = ck["state_dict"]
    if "backbone.vocab_embed.embedding" not in sd:
        raise ConfigError(f"{path} is not a checkpoint of MDLM's DiT (no backbone.vocab_embed.embedding); "
                          "only their backbone=dit checkpoints can be imported")
    hp = ck.get("hyper_parameters") or {}
    cfg = hp.get("config") if isinstance(hp, dict) else None
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} has no hyper_parameters.config (MDLM's Hydra config); it is needed for n_heads "
                          "and the time conditioning")
    sel = lambda key, default=None: OmegaConf.select(OmegaConf.create(cfg), key, default=default)  # noqa: E731
    for key, want in (("backbone", "dit"), ("parameterization", "subs"), ("noise.type", "loglinear"),
                      ("diffusion", "absorbing_state")):
        got = sel(key, want)
        if got != want:
            raise ConfigError(f"{path}: MDLM {key}={got} cannot be imported (only {key}={want} maps onto our "
                              "mdlm objective exactly)")
    facts = {"n_heads": sel("model.n_heads"), "time_conditioning": bool(sel("time_conditioning", False)),
             "eps": float(sel("training.sampling_eps", 1e-3)), "step": int(ck.get("global_step", 0)),
             "T": int(sel("T", 0) or 0), "seq_len": sel("model.length"),
             "tokenizer_name": sel("data.tokenizer_name_or_path")}
    raw = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    ema = ck.get("ema")
    return raw, ema if isinstance(ema, dict) and ema.get("shadow_params") else None, facts


def _read_hf(path: Path) -> tuple[dict, None, dict]:
    """(backbone state, None, facts) of the Hugging Face layout (config.json + weights)."""
    import torch

    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path / 'config.json'}: {_first_line(e)}") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "mdlm":
        raise ConfigError(f"{path / 'config.json'} is not an MDLM Hugging Face config (model_type is "
                          f"{hf.get('model_type') if isinstance(hf, dict) else None!r}, not 'mdlm')")
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path / "model.safetensors"))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path / 'model.safetensors'} is not readable ({_first_line(e)})") from None
    elif (path / "pytorch_model.bin").is_file():
        try:
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path / 'pytorch_model.bin'} is not readable ({_first_line(e)})") from None
    else:
        raise ConfigError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    if "backbone.vocab_embed.embedding" not in sd:
        raise ConfigError(f"{path}: the weights are not MDLM's DiT (no backbone.vocab_embed.embedding)")
    facts = {"n_heads": hf.get("n_heads"), "time_conditioning": bool(hf.get("time_conditioning", False)),
             "eps": 1e-3, "step": 0, "T": 0, "seq_len": hf.get("model_length")}
    raw = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return raw, None, facts


def _ema_state(raw: dict, ema: dict, where: Path) -> dict:
    """Their EMA shadow list mapped to parameter names: the order of ``backbone.parameters()``, which is
    the state dict's order without buffers (every other parameter of their module sits after it)."""
    names = [k for k in raw if k not in _BUFFERS]
    shadow = list(ema["shadow_params"])
    if len(shadow) < len(names) or any(tuple(s.shape) != tuple(raw[n].shape) for s, n in zip(shadow, names)):
        raise ConfigError(f"{where}: the EMA (shadow_params) does not line up with the backbone's parameters; "
                          "import the raw weights with --raw")
    return dict(zip(names, shadow))


# ----------------------------------------------------------------------------- mapping


def import_mdlm(src: str | Path, ema: bool = True, tokenizer: str | None = None, data: str | None = None,
                overrides: list[str] | None = None):
    """Their checkpoint -> (our MDLM module in eval mode, export metadata, tokenizer or None)."""
    import torch

    from dlmtrain.config import load_config
    from dlmtrain.modules import build_module

    src = Path(src)
    if src.is_dir():
        raw, their_ema, facts = _read_hf(src)
    elif src.is_file():
        raw, their_ema, facts = _read_ckpt(src)
    else:
        raise ConfigError(f"{src} does not exist")
    weights = "raw"
    state = raw
    if ema and their_ema is not None:
        state, weights = {**raw, **_ema_state(raw, their_ema, src)}, "ema"

    unknown = [k for k in state if k not in _BUFFERS and their_name_to_ours(k) is None]
    if unknown:
        raise ConfigError(f"{src}: unexpected weights {unknown[:3]} (not MDLM's DiT as this importer knows it)")
    emb, t0 = state["vocab_embed.embedding"], state.get("sigma_map.mlp.0.weight")
    if t0 is None:
        raise ConfigError(f"{src}: no sigma_map weights (not MDLM's DiT)")
    n_layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if not facts.get("n_heads"):
        raise ConfigError(f"{src}: the number of attention heads is not recorded (n_heads)")
    V, hidden = emb.shape
    tok = None
    if tokenizer:
        from dlmtrain.data.tokenizer import load_hf

        tok = load_hf(tokenizer)
    name = str(facts.get("tokenizer_name") or "gpt2")
    if tok is None and "gpt2" not in name.lower():  # e.g. bert-base-uncased (LM1B) has its own [MASK] id
        raise ConfigError(f"{src} was trained with the tokenizer {name}, whose [MASK] id is not the last id; pass "
                          "--tokenizer (its tokenizer.json) so the mask id and special tokens are read from it")
    mask_id = tok.mask_id if tok is not None and tok.mask_id is not None else V - 1
    if tok is not None and tok.vocab_size > V:
        raise ConfigError(f"--tokenizer {tokenizer} has {tok.vocab_size} tokens, more than the model's {V}")
    model = {"vocab_size": V - 1 if mask_id == V - 1 else V, "mask_id": mask_id,
             "hidden_size": hidden, "n_layers": n_layers, "n_heads": int(facts["n_heads"]),
             "cond_dim": t0.shape[0], "time_freq_dim": t0.shape[1], "mlp_width": state["blocks.0.mlp.0.weight"].shape[0],
             "adaln_always": not facts["time_conditioning"]}
    if tok is not None:
        model["eos_id"] = tok.eos_id
    dotted = [f"model={MODEL_CONFIG}"] + [f"model.{k}={v}" for k, v in model.items()] + [
        "objective=mdlm", "objective.schedule=loglinear", f"objective.eps={facts['eps']}",
        f"objective.time_conditioning={facts['time_conditioning']}", "run.name=mdlm-import"]
    if data:
        dotted.append(f"data.manifest={data}")
    if facts.get("T"):
        dotted.append(f"eval.discrete_steps={facts['T']}")
    cfg = load_config(None, dotted + list(overrides or []))
    module = build_module(cfg)

    ours = {}
    for k, v in state.items():
        if k in _BUFFERS:
            continue
        ours["backbone." + their_name_to_ours(k)] = v
    if "rotary_emb.inv_freq" in state:  # base 10000 is hard-coded in their Rotary; check, do not assume
        hd = hidden // int(facts["n_heads"])
        want = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        if state["rotary_emb.inv_freq"].shape != want.shape or not torch.allclose(state["rotary_emb.inv_freq"].float(), want):
            raise ConfigError(f"{src}: rotary frequencies differ from base 10000 (n_heads={facts['n_heads']} wrong?)")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(ours))
    shapes = [k for k in ours if k in expected and tuple(ours[k].shape) != tuple(expected[k].shape)]
    if missing or shapes:
        raise ConfigError(f"{src}: weights do not fit the mapped backbone (missing {missing[:3]}, shape mismatch "
                          f"{shapes[:3]})")
    module.load_state_dict({k: v.float() for k, v in ours.items()})
    module.weights = weights
    module.global_step_loaded = facts["step"]
    meta = {"weights": weights, "step": facts["step"], "source": str(src), "source_format": "mdlm",
            "seq_len": int(facts["seq_len"]) if facts.get("seq_len") else None, "objective": "mdlm",
            "data_known": bool(data)}
    return module.eval(), meta, tok


def convert_mdlm(src, dst, to: str, ema: bool = True, dtype: str = "fp32", force: bool = False,
                 tokenizer: str | None = None, data: str | None = None, say=print) -> Path:
    """``dlmtrain convert SRC DST --from mdlm --to safetensors|lightning``."""
    from omegaconf import OmegaConf

    from dlmtrain.checkpoint.export import cast_state, check_destination, write_export, write_lightning

    check_destination(dst, force)
    module, meta, tok = import_mdlm(src, ema=ema, tokenizer=tokenizer, data=data)
    if data and tok is None:
        from dlmtrain.checkpoint.export import data_tokenizer

        tok, seq_len = data_tokenizer(module.cfg, data)
        meta["seq_len"] = meta["seq_len"] or seq_len
    if to == "lightning":
        out = write_lightning(module, dst, force)
    else:
        meta["dtype"] = dtype
        out = write_export(dst, cast_state(module.state_dict(), dtype), OmegaConf.to_container(module.cfg, resolve=True),
                           meta, tok, force)
    say(f"[dlmtrain] imported MDLM {src} ({meta['weights']} weights, {module.cfg.model.n_layers} x "
        f"{module.cfg.model.hidden_size}, vocab {module.backbone.vocab_size}, mask id {module.mask_id}) to {out}")
    return out
