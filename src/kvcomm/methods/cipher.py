"""CIPHER: debate whose messages are sequences of expected embeddings (Pham et al. 2023)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvcomm.costs import CostRecord, stopwatch
from kvcomm.errors import IncompatibleModelsError, PromptError
from kvcomm.generation import GenerationSettings, decode, eos_ids, generate_from_embeds
from kvcomm.message import check_window
from kvcomm.methods.base import MethodOutput, answer_flops, max_new_tokens, model_dims
from kvcomm.methods.debate import check_message_tokens, refine_message, sender_message
from kvcomm.models import LoadedModel
from kvcomm.prompts import chat_ids, chat_text
from kvcomm.tasks.base import Example

logger = logging.getLogger(__name__)

SELF_SLOT = "<|kvcomm-self-answer|>"
OTHERS_SLOT = "<|kvcomm-others-answer|>"
GREEDY = GenerationSettings()


def embedding_matrix(model: LoadedModel) -> torch.Tensor:
    """The input-embedding matrix ``E`` ``[vocab, hidden]`` of ``model``.

    Raises :class:`IncompatibleModelsError` when the embedding module is not a plain row lookup (e.g. a scaled
    embedding), since then ``p @ E`` would not live in the space of the model's input embeddings.
    """
    module = model.model.get_input_embeddings()
    weight = module.weight
    probe = torch.tensor([[min(3, weight.shape[0] - 1)]], device=weight.device)
    with torch.no_grad():
        if not torch.equal(module(probe)[0, 0], weight[probe[0, 0]]):
            raise IncompatibleModelsError(f"{model.name}: CIPHER needs an input embedding that is a plain lookup of "
                                          "its weight rows (this model scales or transforms them)")
    return weight


def nearest_tokens(model: LoadedModel, vectors: torch.Tensor) -> list[int]:
    """Cosine-nearest vocabulary ids of ``vectors`` ``[n, hidden]`` in ``model``'s input embeddings."""
    weight = embedding_matrix(model)
    norms = torch.linalg.vector_norm(weight, dim=-1, dtype=torch.float32).clamp_min(1e-12)  # [vocab]
    scores = (vectors.to(weight.device, weight.dtype) @ weight.T).float() / norms  # [n, vocab]
    return scores.argmax(-1).tolist()


def embedding_message(model: LoadedModel, input_ids: torch.Tensor, max_steps: int, temperature: float,
                      ignore_eos: bool = False) -> torch.Tensor:
    """CIPHER message of ``model`` after the prompt ``input_ids`` ``[1, n]``: ``[m, hidden]``, ``m <= max_steps``
    (:func:`embedding_message_tokens` without the nearest ids)."""
    return embedding_message_tokens(model, input_ids, max_steps, temperature, ignore_eos)[0]


@torch.no_grad()
def embedding_message_tokens(model: LoadedModel, input_ids: torch.Tensor, max_steps: int, temperature: float,
                             ignore_eos: bool = False) -> tuple[torch.Tensor, list[int]]:
    """CIPHER message of ``model`` after the prompt ``input_ids`` ``[1, n]``: the vectors ``[m, hidden]``,
    ``m <= max_steps``, and the ``m`` ids of their cosine-nearest vocabulary embeddings.

    Each step: ``p = softmax(logits / temperature)`` ``[vocab]`` of the last position, message vector ``p @ E``
    ``[hidden]`` (model dtype); stop (that vector dropped) when its cosine-nearest vocabulary embedding is an EOS
    token. The vector is fed back as ``inputs_embeds`` ``[1, 1, hidden]`` on the model's KV cache (one prefill, then
    one position per step). As ``temperature → 0`` the vectors become the embeddings of the greedy tokens.
    ``ignore_eos``: never stop early, always ``max_steps`` vectors (benchmarks comparing equal work).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weight = embedding_matrix(model)  # [vocab, hidden]
    norms = torch.linalg.vector_norm(weight, dim=-1, dtype=torch.float32).clamp_min(1e-12)  # [vocab]
    stop = eos_ids(model)
    ids = input_ids.to(weight.device)
    length = int(ids.shape[-1])
    output = model.model(inputs_embeds=weight[ids], attention_mask=torch.ones(1, length, dtype=torch.long,
                                                                              device=ids.device),
                         use_cache=True, logits_to_keep=1)
    vectors: list[torch.Tensor] = []
    nearest_ids: list[int] = []
    for step in range(max_steps):
        probs = torch.softmax(output.logits[0, -1].float() / temperature, dim=-1)  # [vocab]
        vector = probs.to(weight.dtype) @ weight  # [hidden]
        nearest = int(((weight @ vector).float() / norms).argmax())  # |vector| is common to every row: cosine order
        if nearest in stop and not ignore_eos:
            break
        vectors.append(vector)
        nearest_ids.append(nearest)
        if step + 1 == max_steps:
            break
        length += 1
        output = model.model(inputs_embeds=vector.view(1, 1, -1), cache=output.cache, use_cache=True,
                             attention_mask=torch.ones(1, length, dtype=torch.long, device=ids.device))
    if not vectors:
        return weight.new_zeros(0, weight.shape[-1]), []
    return torch.stack(vectors), nearest_ids


@dataclass
class EmbeddingMessage:
    """A phase-1 CIPHER message: ``vectors`` ``[m, hidden]`` at the model dtype, the prompt length it was generated
    from, the seconds and the analytic FLOPs it took, and the ids of the vectors' nearest vocabulary embeddings in
    the model that produced them (for the record; the receiver reads the vectors)."""

    vectors: torch.Tensor
    prompt_tokens: int
    seconds: float
    flops: int = 0
    nearest_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the vectors at their dtype (``m × hidden × element size``)."""
        return self.vectors.numel() * self.vectors.element_size()


@dataclass
class CIPHER:
    """Debate with expected-embedding messages (spec §4), one exchange.

    Phase 1: the sender (from its sender prompt; ``sender_aware`` as in :class:`~kvcomm.methods.nld.NLD`) and,
    independently, the receiver (from the receiver prompt) each produce an :func:`embedding_message` of up to
    ``message_tokens`` vectors at ``temperature`` (1.0: the reference evaluator's effective value). Phase 2: the
    receiver's refine prompt is embedded with the receiver's own message at ``{self_answer}`` and the sender's at
    ``{others}``; the receiver generates the final answer from these ``inputs_embeds`` (task budget, answer prefix).
    Prompts are chat-wrapped with the receiver's tokenizer; sender and receiver must share the hidden size.

    Costs: ``text_bytes`` = bytes of the sender's message vectors, ``text_tokens`` = their number; prefill tokens,
    generated tokens and FLOPs as for NLD (the refine prefill counts every position, spliced vectors included; each
    phase-1 step adds ``4·V·d`` for ``p @ E`` and the nearest-token search).
    """

    sender: LoadedModel
    receiver: LoadedModel
    message_tokens: int = 256
    sender_aware: bool = False
    temperature: float = 1.0
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "cipher"
    full_messages: bool = False  # phase-1 messages always message_tokens long (EOS ignored; benchmarks)

    def __post_init__(self) -> None:
        check_message_tokens(self.message_tokens)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        sender_hidden, receiver_hidden = self.sender.fingerprint.hidden_size, self.receiver.fingerprint.hidden_size
        if sender_hidden != receiver_hidden:
            raise IncompatibleModelsError(f"CIPHER needs equal hidden sizes: sender {self.sender.name!r} has "
                                          f"{sender_hidden}, receiver {self.receiver.name!r} has {receiver_hidden}")

    def _speak(self, model: LoadedModel, message: str) -> EmbeddingMessage:
        input_ids = chat_ids(self.receiver.tokenizer, message)
        check_window(model, input_ids.shape[-1] + self.message_tokens, f"the phase-1 prompt of {model.name}")
        with stopwatch(model.device) as elapsed:
            vectors, nearest_ids = embedding_message_tokens(model, input_ids, self.message_tokens, self.temperature,
                                                            self.full_messages)
        prompt_tokens, produced = int(input_ids.shape[-1]), int(vectors.shape[0])
        flops = answer_flops(model, prompt_tokens, produced, self.message_tokens, GREEDY)
        # every step also mixes the embedding matrix (p @ E) and finds the nearest row (E @ v): 2·2·V·d
        steps = min(produced + 1, self.message_tokens)
        flops += 4 * model_dims(model).lm_head_params * steps
        return EmbeddingMessage(vectors=vectors, prompt_tokens=prompt_tokens, seconds=elapsed[0], flops=flops,
                                nearest_ids=nearest_ids)

    def send(self, example: Example) -> EmbeddingMessage:
        """Phase 1, sender side."""
        return self._speak(self.sender, sender_message(example, self.sender_aware))

    def draft(self, example: Example) -> EmbeddingMessage:
        """Phase 1, receiver side (no answer prefix)."""
        return self._speak(self.receiver, example.messages["receiver"])

    @torch.no_grad()
    def refine_embeddings(self, example: Example, own: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Receiver input embeddings ``[1, n, hidden]`` of the chat-wrapped refine prompt (with the answer prefix),
        ``own`` ``[m1, hidden]`` at ``{self_answer}`` and ``others`` ``[m2, hidden]`` at ``{others}``."""
        prompt = example.messages["receiver"]
        if SELF_SLOT in prompt or OTHERS_SLOT in prompt:
            raise PromptError(f"item {example.id!r}: the receiver message contains a reserved slot marker")
        text = chat_text(self.receiver.tokenizer, refine_message(prompt, SELF_SLOT, OTHERS_SLOT),
                         example.answer_prefix)
        if text.count(SELF_SLOT) != 1 or text.count(OTHERS_SLOT) != 1:
            raise PromptError(f"{self.receiver.name}: the chat template altered the refine prompt's slots")
        before, rest = text.split(SELF_SLOT)
        middle, after = rest.split(OTHERS_SLOT)
        weight = embedding_matrix(self.receiver)

        def embed(piece: str) -> torch.Tensor:  # [k, hidden]
            ids = self.receiver.tokenizer(piece, add_special_tokens=False, return_tensors="pt").input_ids
            return weight[ids[0].to(weight.device)]

        parts = [embed(before), own.to(weight.device, weight.dtype), embed(middle),
                 others.to(weight.device, weight.dtype), embed(after)]
        return torch.cat(parts, dim=0).unsqueeze(0)

    def refine(self, example: Example, own: EmbeddingMessage, others: EmbeddingMessage) -> MethodOutput:
        """Phase 2: the receiver's final answer given its own message and the sender's."""
        embeds = self.refine_embeddings(example, own.vectors, others.vectors)
        budget = max_new_tokens(example, self.settings)
        check_window(self.receiver, embeds.shape[1] + budget, "the refine prompt")
        with stopwatch(self.receiver.device) as elapsed:
            tokens = generate_from_embeds(self.receiver, embeds, budget, self.settings)
        costs = CostRecord(
            sender_prefill_tokens=others.prompt_tokens,
            receiver_prefill_tokens=own.prompt_tokens + int(embeds.shape[1]),
            generated_tokens=len(others) + len(own) + len(tokens),
            text_bytes=others.nbytes,
            text_tokens=len(others),
            sender_seconds=others.seconds,
            receiver_seconds=own.seconds + elapsed[0],
            sender_flops=others.flops,
            receiver_flops=own.flops + answer_flops(self.receiver, int(embeds.shape[1]), len(tokens), budget,
                                                    self.settings),
        )
        messages = {"sender": decode(self.receiver, others.nearest_ids),
                    "draft": decode(self.receiver, own.nearest_ids)}
        return MethodOutput(answer=decode(self.receiver, tokens), costs=costs, messages=messages)

    def answer(self, example: Example) -> MethodOutput:
        others = self.send(example)
        own = self.draft(example)
        logger.debug("item %r: sender message %d vectors, draft %d vectors", example.id, len(others), len(own))
        return self.refine(example, own, others)
