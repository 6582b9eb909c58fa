"""A disaggregated deployment over the RDMA transport (Mooncake, over its TCP protocol
here): the prefill rank's K/V pages and the frontend's image reach their readers through
Mooncake, the outputs equal the in-process run's (as SHM's do, test_serving.py), and each
child's transfer engine listens on the port `--mooncake-port` gave it."""

from __future__ import annotations

import importlib.util
import json
import os
import socket

import msgspec
import pytest
import torch
from conftest import collect, image, tokens
from serving_harness import running

import mstar

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mooncake") is None,
                                reason="Mooncake is not installed")

#: An 80x80 image: its pixels (75 KiB) and the prompt's K/V pages (400 image tokens) are
#: larger than what travels inline in a handle, so they go through Mooncake.
BIG = {"prompt": "the picture <image> shows", "image": image(31, 80, 80), "max_tokens": 8,
       "temperature": 0, "logprobs": 2}
SMALL = {"prompt": "the picture <image> shows", "image": image(32), "max_tokens": 8,
         "temperature": 0, "logprobs": 2}


def summary(evs: list) -> tuple[list[int], torch.Tensor]:
    logprobs = [lp.logprob for e in evs if isinstance(e, mstar.events.TextDelta)
                for lp in (e.logprobs or [])]
    return tokens(evs), torch.tensor(logprobs)


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))  # every interface, as Mooncake binds
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(180)
def test_a_disaggregated_deployment_over_rdma_gives_the_in_process_outputs(tmp_path,
                                                                         tiny_ckpt):
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=512) as deployment:
        expected = {name: summary(collect(deployment, req))
                    for name, req in (("big", BIG), ("small", SMALL))}
    # six free ports below 32768 (Mooncake's limit): a data worker and two ranks, two each
    first = next(p for p in range(20000 + os.getpid() % 10000, 32760)
                 if all(bindable(q) for q in range(p, p + 6)))
    with running(tmp_path, "--config", "testvla_pd_disaggregated", "--model-path",
                 str(tiny_ckpt), "--tensor-comm-protocol", "RDMA",
                 "--mooncake-port", str(first)) as server:
        for name, req in (("big", BIG), ("small", SMALL)):
            response = server.generate(req)
            assert response.status_code == 200, response.text
            got = summary([msgspec.json.decode(json.dumps(e).encode(), type=mstar.events.Event)
                           for e in response.json()["events"]])
            assert got[0] == expected[name][0]
            torch.testing.assert_close(got[1], expected[name][1], atol=1e-4, rtol=1e-4)
        # each child listens on its port (handshake) or the next one (Mooncake TCP data)
        for child_first in (first, first + 2, first + 4):
            assert listening(child_first) or listening(child_first + 1)
