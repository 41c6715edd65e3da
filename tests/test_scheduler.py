"""The serving scheduler: sequences admitted together are prefilled in one forward and each
decodes what it decodes alone; a prompt the model cannot take fails alone, its neighbours go on."""

import asyncio

from codegpt.base.generate import banned_ids, token_steps
from codegpt.base.sampling import Sampling
from codegpt.base.slots import SlotEngine
from codegpt.serve.scheduler import Request, Scheduler, Sequence
from tests.helpers import varied_model

PROMPTS = ["def add(a, b):\n", "import os\n", "class Stack:\n    def push(self, item):"]


def decode(model, tokenizer, prompts: list[list[int]], tokens: int) -> dict[int, tuple[str | None, str]]:
    """Each sequence's (finish reason, text), all submitted in one request before decoding starts."""
    engine = SlotEngine(model, 4, banned_ids(model, tokenizer, "cpu"), tokenizer.eot_id)
    scheduler = Scheduler(engine, tokenizer, max_queue=8)
    sampling = Sampling(temperature=0, max_new_tokens=tokens)

    async def run():
        request = Request([Sequence(i, ids, sampling, min_new_tokens=tokens) for i, ids in enumerate(prompts)])
        scheduler.submit(request)
        scheduler.start()
        texts, reasons = {}, {}
        while len(reasons) < len(prompts):
            event = await asyncio.wait_for(request.events.get(), 60)
            texts[event.index] = texts.get(event.index, "") + event.text
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
        return {i: (reasons[i], texts[i]) for i in reasons}

    try:
        return asyncio.run(run())
    finally:
        scheduler.close()


def test_sequences_admitted_together_are_prefilled_at_once_and_decode_what_they_decode_alone(tokenizer):
    model = varied_model(block_size=64)
    prefills = []
    hook = model.transformer.ln_f.register_forward_hook(
        lambda module, args, output: prefills.append(output.shape[0]) if output.shape[1] > 1 else None)
    try:
        got = decode(model, tokenizer, [tokenizer.encode(p) for p in PROMPTS], tokens=12)
    finally:
        hook.remove()
    assert prefills == [3]  # one forward over the three prompts, right-padded to the longest
    banned = banned_ids(model, tokenizer, "cpu")
    banned[tokenizer.eot_id] = True  # min_new_tokens: no <|endoftext|> in the first 12
    for i, prompt in enumerate(PROMPTS):
        steps = token_steps(model, [tokenizer.encode(prompt)], Sampling(temperature=0), banned, tokenizer.eot_id)
        alone = tokenizer.decode([next(steps)[0] for _ in range(12)])
        steps.close()
        assert got[i] == ("length", alone)


def test_a_prompt_the_model_cannot_take_fails_alone(tokenizer):
    model = varied_model(block_size=64)
    outside = model.config.vocab_size + 5
    got = decode(model, tokenizer, [tokenizer.encode("x = 1"), [1, outside], tokenizer.encode("y = 2")], tokens=6)
    assert got[1][0] == "error" and f"token id {outside} is outside the model's" in got[1][1]
    assert got[0][0] == got[2][0] == "length" and got[0][1] and got[2][1]
