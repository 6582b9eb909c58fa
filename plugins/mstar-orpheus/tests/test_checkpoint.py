"""`python -m mstar_orpheus.checkpoint DIR --speaking`, the README's offline checkpoint: it
is written into a temporary sibling renamed at the end, so a failure (here the `snac`
package missing, as without the `mstar-orpheus[checkpoint]` extra) leaves nothing at DIR;
what it writes loads in the runtime and speaks (tied embeddings, as the real checkpoint)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import mstar
from mstar import events
from mstar_orpheus.checkpoint import main
from mstar_orpheus.config import SAMPLES_PER_FRAME

torch.set_num_threads(1)  # tests/conftest.py does not reach plugin test folders

FRAMES = 8


def test_a_speaking_checkpoint_is_written_whole_and_speaks(tmp_path: Path, capsys) -> None:
    out = tmp_path / "orpheus-tiny"
    main([str(out), "--speaking"])
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orpheus-tiny"]  # no leftovers
    assert {"model.safetensors", "config.json", "tokenizer.json", "snac"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with mstar.load("orpheus", model_path=str(out), max_seq_len=1024) as dep:
        evs = list(dep.generate({"input": "Hello there", "max_tokens": 7 * FRAMES,
                                 "seed": 3}))
    audio = torch.cat([e.samples.to_tensor() for e in evs if isinstance(e, events.AudioChunk)])
    assert audio.numel() == FRAMES * SAMPLES_PER_FRAME  # every token a code of its position
    assert bool((audio.reshape(FRAMES, -1).std(dim=1) > 0.01).all())


def test_without_snac_it_names_the_extra_and_leaves_nothing(tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "snac", None)  # `import snac` raises ImportError
    out = tmp_path / "orpheus-tiny"
    with pytest.raises(SystemExit) as exit_info:
        main([str(out), "--speaking"])
    assert exit_info.value.code == 1
    assert "pip install 'mstar-orpheus[checkpoint]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither DIR nor its temporary sibling


def test_an_existing_directory_is_never_overwritten(tmp_path: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 1
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
