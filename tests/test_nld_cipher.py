"""NLD and CIPHER on a tiny random model: prompts, the T → 0 limit, the cached message loop, empty messages, costs."""

from __future__ import annotations

import pytest
import torch

from kvcomm.errors import IncompatibleModelsError
from kvcomm.generation import generate
from kvcomm.methods import CIPHER, NLD
from kvcomm.methods.cipher import EmbeddingMessage, embedding_message, nearest_tokens
from kvcomm.methods.debate import refine_message, sender_message
from kvcomm.methods.nld import TextMessage
from kvcomm.runner import predict_one
from kvcomm.prompts import MATH_INSTRUCTION, SENDER_AWARE_MATH_INSTRUCTION, SENDER_AWARE_QA_INSTRUCTION, chat_ids
from kvcomm.tasks.base import Example
from tests.conftest import tiny_llama

EXAMPLE = Example.qa(context="Bob lives in Ollerby. Alice's code is 4821.", question="What is Alice's code?",
                     answers=["4821"], max_new_tokens=6, answer_prefix="Alice's code is")
STEPS = 8


def _embedding(model):
    return model.model.get_input_embeddings().weight


# --- prompts -----------------------------------------------------------------------------------------------------

def test_refine_prompt_holds_draft_and_sender_message_verbatim(tiny):
    nld = NLD(tiny, tiny, message_tokens=STEPS)
    draft, sent = "I think it is {unknown} 12.", "Alice's code is 4821\nand Bob is in Ollerby."
    prompt = nld.refine_prompt(EXAMPLE, draft, sent)
    assert prompt == refine_message(EXAMPLE.messages["receiver"], draft, sent)
    assert prompt.startswith(EXAMPLE.messages["receiver"] + "\nYour previous answer:\n" + draft + "\n")
    assert ("\nOther agents' answers (for your consideration):\n" + sent
            + "\nIf needed, revise your answer. Your new answer is:") in prompt
    empty = nld.refine_prompt(EXAMPLE, "", "")
    assert "(for your consideration):\n\nIf needed" in empty


def test_sender_aware_replaces_the_instruction(tiny):
    plain = NLD(tiny, tiny).sender_prompt(EXAMPLE)
    aware = NLD(tiny, tiny, sender_aware=True).sender_prompt(EXAMPLE)
    assert plain == EXAMPLE.messages["sender"]
    assert aware == f"Instruction: {SENDER_AWARE_QA_INSTRUCTION} Context: {EXAMPLE.context}"
    math = Example.qa(context="x = 3", question="What is 2x?", instruction=MATH_INSTRUCTION)
    assert sender_message(math, True) == f"Instruction: {SENDER_AWARE_MATH_INSTRUCTION} Context: x = 3"


def test_sender_aware_message_is_what_the_sender_reads(tiny):
    nld = NLD(tiny, tiny, message_tokens=STEPS, sender_aware=True)
    aware_ids = chat_ids(tiny.tokenizer, f"Instruction: {SENDER_AWARE_QA_INSTRUCTION} Context: {EXAMPLE.context}")
    message = nld.send(EXAMPLE)
    assert message.prompt_tokens == aware_ids.shape[-1]
    assert message.tokens == generate(tiny, aware_ids, STEPS)


# --- CIPHER messages ---------------------------------------------------------------------------------------------

def test_cipher_at_zero_temperature_produces_nld_greedy_tokens(tiny):
    tokens = NLD(tiny, tiny, message_tokens=STEPS).send(EXAMPLE).tokens
    vectors = CIPHER(tiny, tiny, message_tokens=STEPS, temperature=1e-4).send(EXAMPLE).vectors
    assert len(tokens) > 0
    assert vectors.shape == (len(tokens), tiny.fingerprint.hidden_size)
    assert nearest_tokens(tiny, vectors) == tokens
    assert torch.allclose(vectors, _embedding(tiny)[tokens], atol=1e-6)


def _no_cache_reference(model, input_ids, steps, temperature):
    """Full recompute on the whole embedding sequence at every step (the reference code's loop)."""
    weight = _embedding(model)
    vectors = []
    with torch.no_grad():
        embeds = weight[input_ids]  # [1, n, hidden]
        for _ in range(steps):
            logits = model.model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            vector = torch.softmax(logits / temperature, -1) @ weight
            cosine = torch.nn.functional.cosine_similarity(weight, vector[None], dim=-1)
            if int(cosine.argmax()) == 1:
                break
            vectors.append(vector)
            embeds = torch.cat([embeds, vector.view(1, 1, -1)], 1)
    return torch.stack(vectors)


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_cached_message_equals_no_cache_recompute(tiny, temperature):
    input_ids = chat_ids(tiny.tokenizer, EXAMPLE.messages["sender"])
    cached = embedding_message(tiny, input_ids, 5, temperature)
    reference = _no_cache_reference(tiny, input_ids, 5, temperature)
    assert cached.shape == reference.shape == (5, tiny.fingerprint.hidden_size)
    assert (cached - reference).abs().max().item() < 1e-4


def test_refine_embeddings_splice_messages_where_the_text_would_be(tiny):
    """Byte tokenizer: embedding the draft and sender texts and splicing them == embedding the NLD refine prompt."""
    cipher = CIPHER(tiny, tiny, message_tokens=STEPS)
    weight = _embedding(tiny)
    draft, sent = "It is 12.", "Alice's code is 4821."
    own = weight[tiny.tokenizer(draft, add_special_tokens=False).input_ids]
    others = weight[tiny.tokenizer(sent, add_special_tokens=False).input_ids]
    spliced = cipher.refine_embeddings(EXAMPLE, own, others)
    nld = NLD(tiny, tiny, message_tokens=STEPS)
    ids = chat_ids(tiny.tokenizer, nld.refine_prompt(EXAMPLE, draft, sent), EXAMPLE.answer_prefix)
    assert torch.equal(spliced, weight[ids])
    seconds = 0.0
    cipher_answer = cipher.refine(EXAMPLE, EmbeddingMessage(own, 10, seconds), EmbeddingMessage(others, 20, seconds))
    nld_answer = nld.refine(EXAMPLE, TextMessage([0] * own.shape[0], draft, 10, seconds),
                            TextMessage([0] * others.shape[0], sent, 20, seconds))
    assert cipher_answer.answer == nld_answer.answer
    assert cipher_answer.costs.receiver_prefill_tokens == nld_answer.costs.receiver_prefill_tokens == 10 + ids.shape[-1]


# --- empty messages, costs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eos_first():
    """A tiny model whose every next-token distribution puts (nearly) all mass on EOS (id 1)."""
    model = tiny_llama(seed=1)

    def force_eos(module, inputs, output):
        output[..., 1] += 1e4
        return output

    model.model.lm_head.register_forward_hook(force_eos)
    return model


def test_empty_messages_do_not_crash(eos_first, tiny):
    nld = NLD(eos_first, eos_first, message_tokens=STEPS).answer(EXAMPLE)
    cipher = CIPHER(eos_first, eos_first, message_tokens=STEPS).answer(EXAMPLE)
    assert nld.answer == cipher.answer == ""
    assert nld.costs.text_bytes == cipher.costs.text_bytes == 0
    assert nld.costs.generated_tokens == cipher.costs.generated_tokens == 0
    # empty messages from phase 1, a normal receiver in phase 2
    hidden = tiny.fingerprint.hidden_size
    empty = EmbeddingMessage(torch.zeros(0, hidden), 5, 0.0)
    output = CIPHER(tiny, tiny, message_tokens=STEPS).refine(EXAMPLE, empty, empty)
    assert output.costs.generated_tokens > 0
    text = NLD(tiny, tiny, message_tokens=STEPS).refine(EXAMPLE, TextMessage([], "", 5, 0.0),
                                                       TextMessage([], "", 5, 0.0))
    assert text.costs.generated_tokens > 0


def test_nld_costs(tiny):
    nld = NLD(tiny, tiny, message_tokens=STEPS)
    output = nld.answer(EXAMPLE)
    sent, own = nld.send(EXAMPLE), nld.draft(EXAMPLE)
    refine_ids = chat_ids(tiny.tokenizer, nld.refine_prompt(EXAMPLE, own.text, sent.text), EXAMPLE.answer_prefix)
    costs = output.costs
    assert costs.sender_prefill_tokens == chat_ids(tiny.tokenizer, EXAMPLE.messages["sender"]).shape[-1]
    assert costs.receiver_prefill_tokens == (chat_ids(tiny.tokenizer, EXAMPLE.messages["receiver"]).shape[-1]
                                             + refine_ids.shape[-1])
    final = generate(tiny, refine_ids, EXAMPLE.max_new_tokens)
    assert costs.generated_tokens == len(sent.tokens) + len(own.tokens) + len(final)
    assert costs.text_bytes == len(sent.text.encode("utf-8"))
    assert costs.kv_bytes == 0 and costs.sender_seconds > 0 and costs.receiver_seconds > 0


def test_cipher_costs(tiny):
    cipher = CIPHER(tiny, tiny, message_tokens=STEPS)
    output = cipher.answer(EXAMPLE)
    sent, own = cipher.send(EXAMPLE), cipher.draft(EXAMPLE)
    costs = output.costs
    assert costs.text_bytes == len(sent) * tiny.fingerprint.hidden_size * 4  # fp32
    assert costs.sender_prefill_tokens == chat_ids(tiny.tokenizer, EXAMPLE.messages["sender"]).shape[-1]
    refine_length = cipher.refine_embeddings(EXAMPLE, own.vectors, sent.vectors).shape[1]
    assert costs.receiver_prefill_tokens == own.prompt_tokens + refine_length
    assert len(sent) + len(own) <= costs.generated_tokens <= len(sent) + len(own) + EXAMPLE.max_new_tokens
    assert costs.kv_bytes == 0 and costs.sender_seconds > 0 and costs.receiver_seconds > 0
    assert isinstance(output.answer, str)


def test_bad_settings_raise(tiny):
    with pytest.raises(ValueError):
        NLD(tiny, tiny, message_tokens=0)
    with pytest.raises(ValueError):
        CIPHER(tiny, tiny, temperature=0.0)
    wide = tiny_llama(seed=2)
    wide.fingerprint = type(wide.fingerprint)(**{**wide.fingerprint.to_dict(), "hidden_size": 128})
    with pytest.raises(IncompatibleModelsError):
        CIPHER(tiny, wide)


def test_full_messages_always_have_the_message_length(tiny):
    from conftest import FACTS_EXAMPLE
    from kvcomm.methods import CIPHER, NLD

    assert len(NLD(tiny, tiny, message_tokens=7, full_messages=True).send(FACTS_EXAMPLE).tokens) == 7
    assert len(CIPHER(tiny, tiny, message_tokens=7, full_messages=True).send(FACTS_EXAMPLE)) == 7


def test_answers_record_the_messages_that_were_exchanged(tiny):
    """NLD's row keeps the sender's text and the draft verbatim; CIPHER's (T → 0) decodes to the same tokens."""
    nld = NLD(tiny, tiny, message_tokens=STEPS)
    sent, draft = nld.send(EXAMPLE), nld.draft(EXAMPLE)
    nld_output = nld.answer(EXAMPLE)
    assert nld_output.messages == {"sender": sent.text, "draft": draft.text}
    cipher_output = CIPHER(tiny, tiny, message_tokens=STEPS, temperature=1e-4).answer(EXAMPLE)
    assert cipher_output.messages == nld_output.messages
    assert predict_one(nld, EXAMPLE)["messages"] == nld_output.messages  # the predictions row carries them
