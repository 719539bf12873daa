"""Typed config schema, YAML composition and validation.

A run config is a YAML file under ``configs/`` with an optional ``defaults`` list
naming one file per group (``model``, ``objective``, ``data``, ``optim``,
``trainer``, ``strategy``)::

    defaults:
      - model: tiny
      - objective: mdlm
    trainer:
      max_steps: 200

Composition order (later wins): schema defaults, group files in the order listed,
the file body, then command-line overrides. An override is either a group choice
(``model=small``) or a dotted key (``optim.lr=1e-3``). The result is a struct-mode
OmegaConf object typed by :class:`Config`: unknown keys and wrong types raise
:class:`ConfigError` naming the key and close matches.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dlmtrain.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "objective", "data", "optim", "trainer", "strategy")


@dataclass
class ModelConfig:
    """The shared backbone. Named sizes live in configs/model/<name>.yaml."""

    name: str = "tiny"
    vocab_size: int = 0  # data vocabulary (0: taken from the data's tokenizer)
    eos_id: int = -1  # end-of-document id; needed by document_mask (-1: from data)
    mask_id: int = -1  # [MASK] id (-1: the objective appends one at vocab_size)
    hidden_size: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    mlp: str = "swiglu"  # swiglu | gelu
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    tie_weights: bool = False
    cond_dim: int = 128  # width of the time/noise-level embedding (adaLN-Zero)
    rope_theta: float = 10000.0
    dropout: float = 0.0
    document_mask: bool = False  # attention never crosses an EOS document boundary
    causal: bool = False  # causal attention; objective ar always sets it (see _implied)
    attn_backend: str = "auto"  # auto (flash-attn on CUDA if installed, else sdpa) | sdpa | flash
    init_std: float = 0.02
    # Options that reproduce other codebases' networks exactly (e.g. MDLM's DiT, imported by
    # `dlmtrain convert --from mdlm`; see configs/model/mdlm_dit.yaml). Defaults are ours.
    norm_eps: float = 1e-6  # LayerNorm/RMSNorm epsilon (MDLM: 1e-5, torch's LayerNorm default)
    mlp_width: int = 0  # MLP hidden width; 0: mlp_ratio * hidden_size rounded up to a multiple of 64
    mlp_bias: bool = False  # biases in the MLP's two linears (MDLM: true)
    head_bias: bool = False  # a bias in the output head (MDLM: true)
    time_freq_dim: int = 0  # sinusoidal features of the noise level before the time MLP; 0: cond_dim (MDLM: 256)
    adaln_always: bool = False  # adaLN layers even when the objective feeds no noise level; they then get
    #                             sigma = 0, a learned constant modulation (MDLM's DiT with time_conditioning=False)


# One typed section per objective: `objective.name` picks the schema, so an option of another
# objective (objective.graph under mdlm) is an error, not silently ignored.


@dataclass
class MDLMObjective:
    """Masked (absorbing) diffusion, SUBS (dlmtrain/modules/mdlm.py), with LLaDA's options."""

    name: str = "mdlm"
    schedule: str = "loglinear"  # loglinear | linear | cosine
    eps: float = 1e-3  # below eps the bound uses a one-shot reconstruction term (see diffusion/masked.py)
    time_conditioning: bool = False  # feed the noise level to the backbone (adaLN)
    antithetic: bool = True  # stratified t over the global batch (lower variance)
    random_length_fraction: float = 0.0  # LLaDA: this share of training sequences is cut to a random length (0.01)
    # Output head + cross-entropy only at the masked positions (SUBS scores nothing else), chunked
    # so [tokens x V] float32 logits never exist at once; same loss, NELBO and gradients (tests/modules/test_mdlm_masked_head.py)
    masked_head: bool = True
    ce_chunk_size: int = 4096  # rows of logits per chunk with masked_head (0: all at once)


@dataclass
class SEDDObjective:
    """Score entropy discrete diffusion (dlmtrain/modules/sedd.py)."""

    name: str = "sedd"
    graph: str = "absorb"  # absorb | uniform
    noise: str = "loglinear"  # loglinear | geometric
    sigma_min: float = 1e-4  # geometric noise: sigma(t) = sigma_min^(1-t) sigma_max^t
    sigma_max: float = 20.0
    eps: float = 1e-3  # t < eps: covered by a reconstruction term so the bound stays valid
    antithetic: bool = True


@dataclass
class D3PMObjective:
    """Discrete-time D3PM (dlmtrain/modules/d3pm.py)."""

    name: str = "d3pm"
    graph: str = "absorb"  # absorb | uniform
    T: int = 1000  # diffusion steps
    schedule: str = "auto"  # auto (jsd 1/(T-t+1) for absorb, cosine for uniform) | jsd | cosine | linear
    hybrid_lambda: float = 0.01  # weight of the auxiliary -log p(x0 | x_t) in the training loss (never in nelbo)
    antithetic: bool = True


@dataclass
class UDLMObjective:
    """Uniform-state continuous-time diffusion (dlmtrain/modules/udlm.py)."""

    name: str = "udlm"
    schedule: str = "loglinear"  # loglinear | linear | cosine (alpha(t) of the uniform-state process)
    eps: float = 1e-3
    time_conditioning: bool = True
    antithetic: bool = True


@dataclass
class BD3LMObjective:
    """Block diffusion, BD3-LM (dlmtrain/modules/bd3lm.py, math in dlmtrain/diffusion/block.py)."""

    name: str = "bd3lm"
    block_size: int = 16  # L': tokens per block (1: autoregressive, >= seq_len: one block = MDLM)
    schedule: str = "loglinear"  # loglinear (alpha = 1 - t, BD3-LM's) | linear | cosine
    eps: float = 1e-3  # below eps each block's bound uses a one-shot reconstruction term (diffusion/masked.py)
    time_conditioning: bool = False  # feed each position's noise level to the backbone (adaLN per position)
    antithetic: bool = True  # stratified block times over the global batch x blocks
    clip_min: float = 0.0  # training only: block times ~ U[clip_min, clip_max] (BD3-LM's beta, omega; e.g. 0.3, 0.8
    clip_max: float = 1.0  # for L' = 16). Not a bound unless [0, 1]; nelbo and val/nelbo always use [0, 1]
    masked_head: bool = True  # as MDLM's: head + chunked cross-entropy only at the masked positions of the x_t copy
    ce_chunk_size: int = 4096  # rows of logits per chunk with masked_head (0: all at once)


@dataclass
class GaussianObjective:
    """Gaussian diffusion of learned token embeddings, VDM bound (dlmtrain/modules/gaussian.py)."""

    name: str = "gaussian"
    embed_dim: int = 16  # width d of the diffused embeddings, rows of unit norm (Plaid: 16; 0: model.hidden_size)
    schedule: str = "cosine"  # cosine | linear (in log-SNR) | learned (monotone gamma(t), learned endpoints)
    gamma_min: float = -6.0  # -log SNR at t = 0 (learned: its initial value); lower: smaller reconstruction term
    gamma_max: float = 10.0  # -log SNR at t = 1; prior term ~ exp(-gamma_max) / 2 nats per token
    self_conditioning: bool = True  # the previous x0 estimate as an extra input (Chen et al., 2023)
    self_cond_prob: float = 0.5  # share of training rows that get it (evaluation and sampling: always)
    antithetic: bool = True  # stratified t over the global batch


@dataclass
class ARObjective:
    """The autoregressive baseline: the backbone in causal mode (dlmtrain/modules/ar.py)."""

    name: str = "ar"


OBJECTIVES: dict[str, type] = {
    "mdlm": MDLMObjective, "sedd": SEDDObjective, "d3pm": D3PMObjective, "udlm": UDLMObjective, "ar": ARObjective,
    "bd3lm": BD3LMObjective,
    "gaussian": GaussianObjective,
}
ObjectiveConfig = MDLMObjective  # the default objective


@dataclass
class DataConfig:
    """Where batches come from: shards written by ``python -m data_prep``. See dlmtrain/data/."""

    kind: str = "shards"  # shards (a webdataset manifest written by data_prep)
    manifest: str = ""  # path/dir/URL of manifest.json; "" builds the embedded default corpus (stdlib .py files)
    shard_url: str = ""  # template for shard/tokenizer URLs, e.g. "pipe:aws s3 cp s3://b/d/{name} -"; "" = beside the manifest
    cache_dir: str = "~/.cache/dlmtrain"  # where the embedded default corpus is prepared
    seq_len: int = 128  # tokens per sequence of the embedded default corpus (a prepared manifest has its own)
    vocab_size: int = 2048  # BPE size trained for the embedded default corpus (a manifest has its own)
    val_fraction: float = 0.02  # validation share of the embedded default corpus
    num_workers: int = 1  # DataLoader worker processes per rank (0: read in the main process)
    shuffle_buffer: int = 1000  # train samples are shuffled in blocks of this many consecutive samples of a shard
    on_corrupt: str = "fail"  # fail | skip (log by name, count in data/skipped_shards, go on)
    verify_checksums: bool = True  # check each whole shard read against the manifest's sha256 and bytes (corrupt: see on_corrupt)
    max_val_samples: int = 0  # 0: the whole validation split; else its first N samples


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.0  # never applied to norms, biases or embeddings
    warmup_steps: int = 100
    decay: str = "constant"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.1  # floor of cosine/linear decay, as a fraction of lr
    grad_clip: float = 1.0  # 0 disables
    ema: float = 0.9999  # 0 disables the EMA
    # torch's fused AdamW kernel (CUDA, and CPU) instead of the foreach one; same update to float
    # rounding (tests/modules/test_fused_adamw.py). Not with 16-mixed + grad_clip, nor with deepspeed.
    fused: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    global_batch_size: int = 32  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 0  # per device; 0: global / world (no accumulation)
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # Lightning's strategy name, passed as is; only when strategy.name=auto (see StrategyConfig)
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU | 32-true | bf16-mixed | bf16-true | 16-mixed
    val_every_n_steps: int = 250
    limit_val_batches: int = 0  # 0: the whole validation stream
    val_before_training: bool = True  # validate the initial weights on a fresh start
    log_every_n_steps: int = 10
    ckpt_every_n_steps: int = 250
    save_top_k: int = 1  # best checkpoints by val/nelbo, beside last.ckpt
    compile: bool = False  # torch.compile each transformer block (dlmtrain/distributed/parallelize.py)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1/3 more compute)
    seed: int = 0
    progress_bar: bool = True  # a bar on a terminal; elsewhere (or with false) plain lines, see print_every_n_steps
    print_every_n_steps: int = 100  # a plain progress line (step, loss, tokens/s, ETA) when there is no bar


@dataclass
class StrategyConfig:
    """How training is spread over devices (configs/strategy/<name>.yaml, dlmtrain/distributed/).

    ``name=auto`` leaves the choice to Lightning's ``trainer.strategy`` (an escape hatch: any
    Lightning strategy name except DeepSpeed/FSDP ones, which need this section); any other
    name requires ``trainer.strategy=auto``. Options apply to the strategies named in their
    comment; setting one for another strategy is an error (dlmtrain.distributed.check).
    """

    name: str = "auto"  # auto | ddp | fsdp (FSDP2 fully_shard per block) | deepspeed
    stage: int = 0  # deepspeed ZeRO stage: 1 optimizer states, 2 + gradients, 3 + parameters sharded
    offload_optimizer: bool = False  # deepspeed: optimizer states and the Adam step on CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # deepspeed stage 3: parameters live on CPU between uses
    overlap_comm: bool = True  # deepspeed: overlap gradient reduction with the backward pass
    contiguous_gradients: bool = True  # deepspeed: copy gradients into one contiguous buffer as produced
    reduce_bucket_size: int = 200_000_000  # deepspeed: elements per gradient reduce bucket
    allgather_bucket_size: int = 200_000_000  # deepspeed stage 1/2: elements per parameter all-gather bucket
    prefetch_bucket_size: int = 50_000_000  # deepspeed stage 3: elements of parameters fetched ahead of use
    param_persistence_threshold: int = 100_000  # deepspeed stage 3: parameters this small stay whole on every rank
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (false: keep until backward)
    mixed_precision: bool = True  # fsdp under bf16-mixed: bf16 parameters for compute, float32 gradient reduction
    find_unused_parameters: bool = False  # ddp


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dlmtrain"
    entity: str = ""
    mode: str = "auto"  # auto (offline when no API key) | online | offline | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    """Evaluation while training (callbacks) and by `dlmtrain eval`."""

    nelbo_samples: int = 1  # K Monte Carlo draws of t per sequence in validation (K >= 2: noise standard errors)
    t_bins: int = 20  # where the bound is spent: NELBO contribution binned by t (W&B plot/table, PNG in RUN/eval/)
    discrete_steps: int = 0  # masked objective: also report the discrete-time bound with T steps (0: off)
    sample_every_n_steps: int = 0  # sample-quality callback cadence in optimizer steps (0: off); also at the end
    num_samples: int = 8  # samples per sample-quality evaluation
    sample_seq_len: int = 0  # 0: the data's seq_len
    eval_lm: str = ""  # generative perplexity: a local Hugging Face causal-LM directory or a dlmtrain ar .ckpt ("": off)


@dataclass
class SamplingConfig:
    """How samples are drawn (sample-quality callback, `dlmtrain sample`). See dlmtrain/sampling/."""

    sampler: str = "ancestral"  # ancestral | first_hitting | confidence | semi_ar | greedy (what an objective supports)
    steps: int = 128  # network-evaluation budget; its exact meaning per sampler is in dlmtrain/sampling/
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # nucleus; 1.0: off
    float64: bool = True  # categorical draws on float64 noise; false reproduces peers' float32 Gumbel draws
    cache: bool = True  # ancestral: reuse the network output when no token changed (MDLM's ddpm_cache)
    confidence: str = "max_prob"  # confidence sampler's score: max_prob | margin | neg_entropy
    block_len: int = 32  # semi_ar: tokens per block, left to right
    inner: str = "ancestral"  # semi_ar: the sampler used inside each block
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance w: (1 + w) cond - w uncond (0: off)
    stop_at_eos: bool = False  # bd3lm: stop once every sample drew EOS (later positions set to EOS)
    clamp: bool = False  # gaussian (ddpm/ddim): Diffusion-LM's clamping, the x0 estimate snapped to its argmax token


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = ""  # "" -> runs/<name>
    resume: str = "auto"  # auto (last.ckpt in dir if present) | never | <path>


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Any = field(default_factory=MDLMObjective)  # typed by objective.name: see OBJECTIVES
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def _keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            out.append(full)
            out.extend(_keys(node[k], full + "."))
    return out


def _unknown_key_message(key: str, where: str, schema: DictConfig) -> str:
    known = _keys(schema)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # same section, close last component ("optim.lrr" ~ "optim.lr")
        section, _, leaf = key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
        close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.7)]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see dlmtrain/config.py for the schema"
    if key.startswith("objective."):
        leaf = key.split(".", 1)[1]
        owners = [n for n, cls in OBJECTIVES.items() if leaf in cls.__dataclass_fields__]
        if owners:
            hint = f"; it is an option of objective {' / '.join(owners)}, not of {schema.objective.name}"
    return f"unknown config key '{key}' in {where}{hint}"


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or e.key or "?"
        raise ConfigError(_unknown_key_message(str(key), where, base)) from None
    except ValidationError as e:
        raise ConfigError(f"bad value for '{e.full_key}' in {where}: {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config in {where}: {str(e).splitlines()[0]}") from None


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at top level")
    return node


def _group_file(group: str, name: str, where: str) -> Path:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"no {group} config named '{name}' (from {where}); choose one of: {', '.join(options)}")
    return path


def schema(objective: str = "mdlm", where: str = "the config") -> DictConfig:
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective.name='{objective}' (from {where}) is not one of: {', '.join(OBJECTIVES)}")
    cfg = OmegaConf.structured(Config)
    cfg.objective = OmegaConf.structured(OBJECTIVES[objective])
    OmegaConf.set_struct(cfg, True)
    return cfg


def _objective_name(node: Any, default: str = "mdlm") -> str:
    """objective.name in a raw (not yet typed) config node, else ``default``."""
    obj = node.get("objective") if isinstance(node, (dict, DictConfig)) else None
    name = obj.get("name") if isinstance(obj, (dict, DictConfig)) else None
    return str(name) if name is not None else default


def _apply_dotted(cfg: DictConfig, dotted: list[str]) -> DictConfig:
    for ov in dotted:
        try:
            node = OmegaConf.from_dotlist([ov])
        except Exception as e:
            raise ConfigError(f"cannot parse override '{ov}': {str(e).splitlines()[0]}") from None
        cfg = _merge(cfg, node, f"override '{ov}'")
    return cfg


def config_from_resolved(resolved: str | dict, overrides: list[str] | None = None, where: str = "checkpoint") -> DictConfig:
    """A config written by dlmtrain (``config.yaml``, a checkpoint's copy) plus dotted overrides."""
    body = OmegaConf.create(resolved)
    cfg = _apply_dotted(_merge(schema(_objective_name(body), where), body, where), list(overrides or []))
    validate(_implied(cfg))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``path`` (a YAML file; None for schema defaults) with ``overrides``."""
    overrides = list(overrides or [])
    body = OmegaConf.create({})
    choices: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        for base in (CONFIG_DIR, CONFIG_DIR.parent):  # "demo.yaml" or "configs/demo.yaml" from anywhere
            if not path.is_file() and (base / path).is_file():
                path = base / path
        body = _read_yaml(path)
        defaults = body.pop("defaults", []) if "defaults" in body else []
        for item in defaults:
            if not isinstance(item, DictConfig) or len(item) != 1:
                raise ConfigError(f"{path}: each defaults entry must be 'group: name', got {item}")
            (group, name), = item.items()
            if group not in GROUPS:
                raise ConfigError(f"{path}: unknown config group '{group}' in defaults; groups are {', '.join(GROUPS)}")
            choices[str(group)] = str(name)

    dotted = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key=value (e.g. optim.lr=1e-3 or model=small)")
        key, _, value = ov.partition("=")
        if key == "objective.name":  # another objective: its group file (if any) replaces the current one
            choices.pop("objective", None)
            if (CONFIG_DIR / "objective" / f"{value}.yaml").is_file():
                choices["objective"] = value
                continue
        if key in GROUPS:
            choices[key] = value
        else:
            dotted.append(ov)

    nodes = {
        group: _read_yaml(_group_file(group, name, "overrides" if group in {o.split('=')[0] for o in overrides} else str(path)))
        for group, name in choices.items()
    }
    # The objective's schema comes first: the body or an override may name it, else its group file does.
    objective = _objective_name(body, "mdlm")
    if "objective" in choices:
        objective = str(nodes["objective"].get("name", choices["objective"]))
    for ov in dotted:
        if ov.startswith("objective.name="):
            objective = ov.partition("=")[2]
    cfg = schema(objective, "overrides" if any(o.startswith("objective") for o in overrides) else str(path))
    for group, node in nodes.items():
        name = choices[group]
        cfg = _merge(cfg, {group: node}, f"configs/{group}/{name}.yaml")
        if group == "model":
            cfg.model.name = name
    cfg = _apply_dotted(_merge(cfg, body, str(path)), dotted)
    validate(_implied(cfg))
    return cfg


def _implied(cfg: DictConfig) -> DictConfig:
    """What an objective decides for the model: ar is causal whatever model.causal said, so the
    resolved config (beside every checkpoint) says what was built."""
    if cfg.objective.name == "ar":
        cfg.model.causal = True
    return cfg


_CHOICES = {
    "model.mlp": ("swiglu", "gelu"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.attn_backend": ("auto", "sdpa", "flash"),
    "optim.decay": ("constant", "cosine", "linear"),
    "data.kind": ("shards",),
    "data.on_corrupt": ("fail", "skip"),
    "logger.wandb.mode": ("auto", "online", "offline", "disabled"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed"),
    "sampling.confidence": ("max_prob", "margin", "neg_entropy"),
    "strategy.name": ("auto", "ddp", "fsdp", "deepspeed"),
}

_OBJECTIVE_CHOICES = {
    "mdlm": {"schedule": ("loglinear", "linear", "cosine")},
    "sedd": {"graph": ("absorb", "uniform"), "noise": ("loglinear", "geometric")},
    "d3pm": {"graph": ("absorb", "uniform"), "schedule": ("auto", "jsd", "cosine", "linear")},
    "udlm": {"schedule": ("loglinear", "linear", "cosine")},
    "bd3lm": {"schedule": ("loglinear", "linear", "cosine")},
    "gaussian": {"schedule": ("cosine", "linear", "learned")},
}

# (key, smallest allowed value): counts and sizes that must be positive (or non-negative)
_AT_LEAST = {
    "model.hidden_size": 1, "model.n_layers": 1, "model.n_heads": 1, "model.cond_dim": 1, "model.mlp_width": 0,
    "model.time_freq_dim": 0,
    "trainer.max_steps": 1, "trainer.global_batch_size": 1, "trainer.micro_batch_size": 0, "trainer.num_nodes": 1,
    "trainer.val_every_n_steps": 1, "trainer.ckpt_every_n_steps": 1, "trainer.log_every_n_steps": 1,
    "trainer.print_every_n_steps": 1, "trainer.limit_val_batches": 0, "trainer.save_top_k": 0, "trainer.seed": 0,
    "data.num_workers": 0, "data.shuffle_buffer": 1, "data.max_val_samples": 0, "optim.warmup_steps": 0,
    "eval.nelbo_samples": 1, "eval.t_bins": 1, "eval.discrete_steps": 0, "eval.sample_every_n_steps": 0,
    "eval.num_samples": 1, "eval.sample_seq_len": 0, "sampling.steps": 1, "sampling.top_k": 0, "sampling.block_len": 1,
}
_HINTS = {
    "trainer.val_every_n_steps": " (optimizer steps between validations; a large value validates rarely)",
    "trainer.max_steps": " (optimizer steps to train for)",
}


def validate(cfg: DictConfig) -> None:
    """Checks that need more than a type: choices and value ranges. Run before anything is built or written."""
    for key, options in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in options:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}")
    for key, low in _AT_LEAST.items():
        value = OmegaConf.select(cfg, key)
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}{_HINTS.get(key, '')}")
    m = cfg.model
    if m.mlp_ratio <= 0:
        raise ConfigError(f"model.mlp_ratio={m.mlp_ratio} must be positive")
    if m.hidden_size % m.n_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} must be divisible by model.n_heads={m.n_heads}")
    if (m.hidden_size // m.n_heads) % 2:
        raise ConfigError("model.hidden_size / model.n_heads must be even (rotary embeddings rotate pairs)")
    if m.norm_eps <= 0:
        raise ConfigError(f"model.norm_eps={m.norm_eps} must be positive")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout={m.dropout} must lie in [0, 1)")
    ob = cfg.objective
    for key, options in _OBJECTIVE_CHOICES.get(ob.name, {}).items():
        if ob[key] not in options:
            raise ConfigError(f"objective.{key}={ob[key]!r} is not one of: {', '.join(options)} (objective {ob.name})")
    if "eps" in ob and not 0 < ob.eps < 1:
        raise ConfigError(f"objective.eps={ob.eps} must lie in (0, 1)")
    if "T" in ob and ob.T < 1:
        raise ConfigError(f"objective.T={ob.T} must be >= 1")
    if "block_size" in ob and ob.block_size < 1:
        raise ConfigError(f"objective.block_size={ob.block_size} must be >= 1")
    if "clip_min" in ob and not 0 <= ob.clip_min < ob.clip_max <= 1:
        raise ConfigError(f"objective.clip_min={ob.clip_min}, clip_max={ob.clip_max}: need 0 <= clip_min < clip_max <= 1")
    if ob.name == "gaussian":
        if not ob.gamma_min < ob.gamma_max:
            raise ConfigError(f"objective.gamma_min={ob.gamma_min} must be below objective.gamma_max={ob.gamma_max} "
                              "(-log SNR increases from t = 0 to t = 1)")
        if ob.embed_dim < 0:
            raise ConfigError(f"objective.embed_dim={ob.embed_dim} must be >= 0 (0: model.hidden_size)")
        if not 0 <= ob.self_cond_prob <= 1:
            raise ConfigError(f"objective.self_cond_prob={ob.self_cond_prob} must lie in [0, 1]")
    if "random_length_fraction" in ob and not 0 <= ob.random_length_fraction <= 1:
        raise ConfigError(f"objective.random_length_fraction={ob.random_length_fraction} must lie in [0, 1]")
    if "ce_chunk_size" in ob and ob.ce_chunk_size < 0:
        raise ConfigError(f"objective.ce_chunk_size={ob.ce_chunk_size} must be >= 0 (0: one chunk); set e.g. 4096")
    o = cfg.optim
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive")
    if not 0 <= o.ema < 1:
        raise ConfigError(f"optim.ema={o.ema} must lie in [0, 1)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _validate_strategy(cfg)
    sp = cfg.sampling
    if sp.clamp and ob.name != "gaussian":
        raise ConfigError(f"sampling.clamp=true is the gaussian samplers' option, not one of objective {ob.name}; "
                          "set sampling.clamp=false")
    if sp.temperature <= 0 or not 0 < sp.top_p <= 1 or sp.cfg_scale < 0:
        raise ConfigError("sampling.temperature must be > 0, sampling.top_p in (0, 1], sampling.cfg_scale >= 0")
    if o.grad_clip < 0 or o.weight_decay < 0 or o.eps <= 0 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.grad_clip and optim.weight_decay must be >= 0, optim.eps > 0, optim.min_lr_ratio in [0, 1]")
    if o.fused and cfg.strategy.name == "deepspeed":
        raise ConfigError("optim.fused=true with strategy deepspeed: DeepSpeed wraps the optimizer itself and this "
                          "combination is untested; set optim.fused=false")
    if o.fused and o.grad_clip > 0 and cfg.trainer.precision == "16-mixed":
        raise ConfigError("optim.fused=true with trainer.precision=16-mixed and optim.grad_clip > 0: the fused step "
                          "unscales the gradients itself, after clipping would run; use bf16-mixed or optim.fused=false")


# Which strategy options each strategy honours: (strategy name, ZeRO stages or None for any).
# A value other than the schema default for a strategy outside its scope is an error, never ignored.
_STRATEGY_SCOPE = {
    "offload_optimizer": ("deepspeed", None),
    "offload_params": ("deepspeed", (3,)),
    "overlap_comm": ("deepspeed", None),
    "contiguous_gradients": ("deepspeed", None),
    "reduce_bucket_size": ("deepspeed", None),
    "allgather_bucket_size": ("deepspeed", (1, 2)),
    "prefetch_bucket_size": ("deepspeed", (3,)),
    "param_persistence_threshold": ("deepspeed", (3,)),
    "reshard_after_forward": ("fsdp", None),
    "mixed_precision": ("fsdp", None),
    "find_unused_parameters": ("ddp", None),
}


def _validate_strategy(cfg: DictConfig) -> None:
    s, low = cfg.strategy, cfg.trainer.strategy
    if s.name != "auto" and low != "auto":
        raise ConfigError(f"strategy.name={s.name} and trainer.strategy={low} are both set; use strategy={s.name} "
                          "(dlmtrain's, preferred) or trainer.strategy (passed to Lightning as is), not both")
    if low.startswith(("deepspeed", "fsdp")):
        raise ConfigError(f"trainer.strategy={low}: DeepSpeed and FSDP are configured by the strategy group "
                          "(sharded checkpoints, EMA, CPU support); use e.g. strategy=deepspeed_zero2 or strategy=fsdp")
    if s.name == "deepspeed":
        if s.stage not in (1, 2, 3):
            raise ConfigError(f"strategy.stage={s.stage}: DeepSpeed needs a ZeRO stage 1, 2 or 3 "
                              "(e.g. strategy=deepspeed_zero2)")
    elif s.stage != 0:
        raise ConfigError(f"strategy.stage={s.stage} is a DeepSpeed option; strategy.name={s.name} has no ZeRO "
                          "stages (use strategy=deepspeed_zero{1,2,3})")
    default = StrategyConfig()
    for key, (owner, stages) in _STRATEGY_SCOPE.items():
        if s[key] == getattr(default, key):
            continue
        if s.name != owner or (stages is not None and s.stage not in stages):
            where = f"strategy.name={owner}" + (f" with strategy.stage={'/'.join(map(str, stages))}" if stages else "")
            now = f"strategy.name={s.name}" + (f", stage {s.stage}" if s.name == "deepspeed" else "")
            raise ConfigError(f"strategy.{key}={s[key]} applies only to {where}, not to {now}; remove it or "
                              f"choose that strategy")
    for key in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
        if s[key] < 1:
            raise ConfigError(f"strategy.{key}={s[key]} must be >= 1 (elements)")
    if s.param_persistence_threshold < 0:
        raise ConfigError(f"strategy.param_persistence_threshold={s.param_persistence_threshold} must be >= 0")


def batch_split(global_batch_size: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, gradient-accumulation steps) for a global batch."""
    if micro_batch_size == 0:
        if global_batch_size % world_size:
            raise ConfigError(
                f"trainer.global_batch_size={global_batch_size} is not divisible by the world size {world_size}; "
                "choose a multiple of it"
            )
        return global_batch_size // world_size, 1
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} is not divisible by micro_batch_size x world size "
            f"= {micro_batch_size} x {world_size}; change one of them"
        )
    return micro_batch_size, global_batch_size // per_step


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
