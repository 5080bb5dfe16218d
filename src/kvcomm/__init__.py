"""kvcomm: LLM agents that talk through their KV caches.

Quick use::

    import kvcomm
    model = kvcomm.load_model("smollm2-135m-instruct")
    example = kvcomm.Example.qa(context="Bob lives in Ollerby.", question="Where does Bob live?",
                                answer_prefix="Bob lives in")
    method = kvcomm.KVComm(sender=model, receiver=model, layers=range(model.num_layers))
    message, _ = method.send(example)
    print(method.receive(message, example).answer)
"""

import logging

from kvcomm.errors import (
    IncompatibleModelsError,
    KVCommError,
    LayerSelectionError,
    ModelLoadError,
    PromptError,
    TaskError,
)
from kvcomm.generation import GenerationSettings
from kvcomm.message import KVMessage, encode_context, receiver_cache
from kvcomm.methods import Baseline, KVComm, MethodOutput, Skyline
from kvcomm.models import Fingerprint, LoadedModel, check_compatible, load_model, prepare_model
from kvcomm.selection import LayerScores, calibrate, contiguous_layers, layer_count, parse_layers, random_layers
from kvcomm.tasks import Example, get_task

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Baseline", "Example", "Fingerprint", "GenerationSettings", "IncompatibleModelsError", "KVComm", "KVCommError",
    "KVMessage", "LayerScores", "LayerSelectionError", "LoadedModel", "MethodOutput", "ModelLoadError",
    "PromptError", "Skyline", "TaskError", "calibrate", "check_compatible", "contiguous_layers", "encode_context",
    "get_task", "layer_count", "load_model", "parse_layers", "prepare_model", "random_layers", "receiver_cache",
]
