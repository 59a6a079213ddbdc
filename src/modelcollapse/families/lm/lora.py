"""LoRA fine-tuning through `peft` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
low-rank adapters on the chosen linear layers of our model or of a transformers model, trained while every
other weight stays frozen, then merged into a copy of the starting model (W + (alpha / r)·B·A), so evaluation
and sampling run the plain model at full speed. The adapters themselves (`adapter_model.safetensors` +
`adapter_config.json`, peft's format) are saved in each generation's `adapter/` folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from modelcollapse.families.lm.hf import HFModel

OURS = ["qkv", "out", "fc", "gate_up", "proj"]  # every linear layer of model.py's blocks (not the output head)


def peft_config(lora, model):
    from peft import LoraConfig

    targets = lora.target_modules or (OURS if not isinstance(model, HFModel) else None)  # None: peft's choice for the architecture
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")


def _inner(model):
    """The module peft adapts: ours, or the transformers model inside an HFModel (peft reads its config)."""
    return model.hf if isinstance(model, HFModel) else model


def add_adapters(model, lora):
    """`model` (changed in place) with fresh adapters, only they trainable."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(lora, model), _inner(model))
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(_inner(model)).items()}


def merge_adapters(model, start):
    """A copy of `start` with `model`'s trained adapters merged into its weights; the adapters and their
    config stay on it as `adapter_` for save_model."""
    from peft.tuners.lora import LoraLayer

    plain = copy.deepcopy(start).to(next(model.parameters()).device)
    prefix = "hf." if isinstance(model, HFModel) else ""
    with torch.no_grad():
        for name, module in _inner(model).named_modules():
            if isinstance(module, LoraLayer):
                target = plain.get_submodule(prefix + name)
                target.weight += module.get_delta_weight("default").to(target.weight.dtype)
    config = _inner(model).peft_config["default"].to_dict()
    plain.adapter_ = ({k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}, adapter_state(model))
    return plain


def save_adapter(model, folder: Path) -> None:
    from safetensors.torch import save_file

    from modelcollapse.store import atomic_write_json

    config, state = model.adapter_
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    atomic_write_json(folder / "adapter_config.json", config)


def load_adapter(start, folder: Path):
    """`start` (a copy) with the adapters saved in `folder` merged, as merge_adapters made it."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    model = copy.deepcopy(start)
    inner = _inner(model)
    inject_adapter_in_model(LoraConfig(**fields), inner)
    set_peft_model_state_dict(inner, load_file(str(folder / "adapter_model.safetensors")))
    return merge_adapters(model, start)
