"""A seeded Qwen3-Omni checkpoint in the hub layout, for tests and offline runs.

`python -m mstar_qwen3omni.checkpoint DIR [--preset tiny] [--seed 0]` builds transformers'
`Qwen3OmniMoeForConditionalGeneration` from the preset's config (random weights, seeded)
and saves it with `save_pretrained`, which writes the hub's key names (transformers 5
fuses each MoE layer's experts in memory and splits them back into per-expert
`experts.{e}.{gate,up,down}_proj` tensors on save), plus `config.json`, the packaged tiny
tokenizer's files and its chat template, so `mstar serve qwen3_omni --model-path DIR`
loads it as it would the real checkpoint. Its Code2Wav is drawn as dummy weights are made
audible (`dummy.audible_code2wav`): transformers' random initialisation decodes to near
silence, under which any codes give the same waveform.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from mstar_qwen3omni.dummy import audible_code2wav
from mstar_qwen3omni.model import Qwen3Omni
from mstar_qwen3omni.tokenizer import CHAT_TEMPLATE, PACKAGED_TOKENIZER


def write_checkpoint(directory: str | os.PathLike[str], *, preset: str = "tiny",
                     seed: int = 0, enable_audio_output: bool = True) -> Path:
    """The preset's model with seeded random weights in `directory` (hub layout); returns
    the directory. `enable_audio_output=False` writes a thinker-only checkpoint (as
    `-Thinking` and `-Captioner` are: transformers then builds no Talker or Code2Wav, so
    none of their weights are saved) whose Thinker is the full one's for the seed."""
    import torch
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeConfig,
    )
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeForConditionalGeneration,
    )

    config = Qwen3Omni.make_config(preset=preset,
                                   model_kwargs={"enable_audio_output": enable_audio_output})
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**config.hf_dict()))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # transformers' `_init_weights` never initialises the Talker's experts (made with
        # `torch.empty`): without this the file would hold whatever memory held
        for module in model.modules():
            if type(module).__name__ == "Qwen3OmniMoeTalkerTextExperts":
                for param in module.parameters():
                    param.normal_(0.0, 0.02, generator=generator)
        for name, param in (model.code2wav.named_parameters() if model.has_talker else ()):
            param.copy_(audible_code2wav(name, param.detach().clone(), generator))
    out = Path(directory)
    model.eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PACKAGED_TOKENIZER / name, out / name)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thinker-only", action="store_true",
                        help="no Talker or Code2Wav (enable_audio_output false)")
    args = parser.parse_args(argv)
    print(write_checkpoint(args.directory, preset=args.preset, seed=args.seed,
                           enable_audio_output=not args.thinker_only))


if __name__ == "__main__":
    main()
