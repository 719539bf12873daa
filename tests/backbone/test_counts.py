"""Parameter and FLOP accounting against hand formulas."""

import torch
import torch.nn as nn

from dlmtrain.backbone import Backbone, count_params, ffn_width, flops_per_token, param_summary
from dlmtrain.config import load_config


def small():
    return load_config(None, ["model=small", "model.vocab_size=50258"]).model


def test_ffn_width():
    cfg = load_config(None, ["model=tiny"]).model
    assert ffn_width(cfg) == 384  # 2.75 * 128 = 352 -> next multiple of 64
    assert ffn_width(small()) == 3072
    assert ffn_width(load_config(None, ["model=1b"]).model) == 5504


def test_small_param_count(capsys):
    cfg = small()
    V, h, n, c = 50258, 768, 12, cfg.cond_dim
    per_block = 4 * h * h + 2 * h * 4 * h + 2 * h  # attention, GELU MLP, two norm weights
    body = n * per_block + h  # + final norm
    with torch.device("meta"):  # no memory, no init cost; also checks meta construction (FSDP)
        model = Backbone(cfg, V)
    assert count_params(model, non_embedding=True) == body == 84_953_856
    assert count_params(model) == body + 2 * V * h  # untied embedding and head
    with torch.device("meta"):
        cond = Backbone(cfg, V, use_cond=True)
    extra = 2 * (c * c + c) + n * (c * 6 * h + 6 * h) + (c * 2 * h + 2 * h)
    assert count_params(cond) == body + 2 * V * h + extra
    print(param_summary(cond))
    assert "non-embedding" in capsys.readouterr().out


def test_tied_count_counts_once():
    cfg = load_config(None, ["model=tiny", "model.tie_weights=true"]).model
    m = Backbone(cfg, 100)
    untied = Backbone(load_config(None, ["model=tiny"]).model, 100)
    assert count_params(untied) - count_params(m) == 100 * 128


def test_flops_per_token_by_hand():
    cfg = load_config(None, ["model=tiny"]).model  # h=128, 2 layers, swiglu width 384
    h, n, f, V, L = 128, 2, 384, 100, 128
    n_matmul = n * (4 * h * h + 3 * h * f) + h * V
    assert n_matmul == 438_784
    assert flops_per_token(cfg, L, V) == 6 * 438_784 + 12 * n * h * L == 3_025_920
    # N_matmul equals the model's Linear weights outside the time conditioning
    m = Backbone(cfg, V, use_cond=True)
    linear = sum(mod.weight.numel() for name, mod in m.named_modules()
                 if isinstance(mod, nn.Linear) and "ada" not in name and not name.startswith("time"))
    assert linear == n_matmul
    g = small()  # GELU: two matrices in the MLP
    assert flops_per_token(g, 1024, 50258) == 6 * (12 * (4 * 768**2 + 2 * 768 * 3072) + 768 * 50258) + 12 * 12 * 768 * 1024
