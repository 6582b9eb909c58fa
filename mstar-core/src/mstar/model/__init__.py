"""The model contract and what a model is built from.

A model plugin imports from here (and `mstar.graph`, `mstar.model.layers`,
`mstar.weights`, `mstar.events`), never from the engine, worker or conductor.
"""

from mstar.model.contract import (
    BuildContext,
    Done,
    EngineType,
    Finished,
    Fork,
    KVSpec,
    Model,
    OutputState,
    RequestPlan,
    RequestState,
    WalkStep,
    config_from_fields,
    text_delta,
    token_list,
)
from mstar.model.fields import (
    AudioInput,
    ImageInput,
    InputField,
    TensorInput,
    VideoInput,
)
from mstar.model.forward import (
    ExtraSpec,
    ForwardBatch,
    Segment,
    SeqChunk,
    SeqKey,
    StepContext,
    attention_context,
)
from mstar.model.ragged import ragged_attention
from mstar.model.requests import validate_request
from mstar.model.sampling import SamplingFields, SamplingParams

__all__ = [
    "AudioInput",
    "BuildContext",
    "EngineType",
    "ExtraSpec",
    "Done",
    "Finished",
    "Fork",
    "ForwardBatch",
    "ImageInput",
    "InputField",
    "KVSpec",
    "Model",
    "OutputState",
    "RequestPlan",
    "RequestState",
    "SamplingFields",
    "SamplingParams",
    "Segment",
    "SeqChunk",
    "SeqKey",
    "StepContext",
    "TensorInput",
    "VideoInput",
    "WalkStep",
    "config_from_fields",
    "attention_context",
    "ragged_attention",
    "token_list",
    "text_delta",
    "validate_request",
]
