"""One LightningModule per objective; all share modules/base.py and the backbone."""

from dlmtrain.errors import ConfigError


def _objectives():
    from dlmtrain.modules.ar import AR
    from dlmtrain.modules.bd3lm import BD3LM
    from dlmtrain.modules.d3pm import D3PM
    from dlmtrain.modules.gaussian import Gaussian
    from dlmtrain.modules.mdlm import MDLM
    from dlmtrain.modules.sedd import SEDD
    from dlmtrain.modules.udlm import UDLM

    return {"mdlm": MDLM, "sedd": SEDD, "d3pm": D3PM, "udlm": UDLM, "ar": AR, "bd3lm": BD3LM,
            "gaussian": Gaussian}


def build_module(cfg):
    objectives = _objectives()
    name = cfg.objective.name
    if name not in objectives:
        raise ConfigError(f"objective.name='{name}' is not implemented; choose one of: {', '.join(objectives)}")
    if cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size is not set: pass model.vocab_size=N, or train on data that provides it")
    return objectives[name](cfg)
