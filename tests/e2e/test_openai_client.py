"""The server through the official `openai` client: completions (plain, streamed, n, logprobs,
stop, echo, seeds, candlewick's sampling extensions), chat completions, structured outputs
(response_format, `chat.completions.parse`, vLLM's guided_* fields), the fields clients add,
and the model list.

Greedy outputs are checked against transformers' reference generations for the w8-gqa2
fixture (tests/fixtures/mistral/w8-gqa2/reference.json), sending the reference prompts as token
ids.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from support import BOS_ID, FIXTURE_DIR, GreedyCase, expected_text, load_reference

CASES = load_reference().cases
CASE_IDS = [f"prompt{case.index}" for case in CASES]
MAX_TOKENS = load_reference().max_new_tokens  # 24


def _case(index: int) -> GreedyCase:
    return CASES[index]


def greedy_text(tokenizer: Tokenizer, case: GreedyCase, max_tokens: int = MAX_TOKENS) -> str:
    return expected_text(tokenizer, case.prompt, case.generated_up_to(max_tokens))


Messages = list[ChatCompletionMessageParam]


def render_mistral_chat(messages: Sequence[Mapping[str, object]]) -> str:
    """The fixture's chat template (tokenizer_config.json), for user/assistant turns."""
    out = "<s>"
    for message in messages:
        if message["role"] == "user":
            out += f"[INST] {message['content']} [/INST]"
        else:
            out += f"{message['content']}</s>"
    return out


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, object]]) -> list[int]:
    # The template writes the BOS itself, so the rendered text is tokenized without adding
    # special tokens (as transformers' apply_chat_template does).
    return tokenizer.encode(render_mistral_chat(messages), add_special_tokens=False).ids


# --------------------------------------------------------------------------------------------
# Models


def test_models_list_contains_served_model(client: OpenAI, model_name: str) -> None:
    models = client.models.list()
    ids = [model.id for model in models.data]
    assert model_name in ids, ids
    assert model_name == "w8-gqa2"  # the folder's name when --served-model-name is not given
    assert all(model.object == "model" for model in models.data)


# --------------------------------------------------------------------------------------------
# Completions: greedy against the reference


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_greedy_completion_matches_reference(
    client: OpenAI, tokenizer: Tokenizer, model_name: str, case: GreedyCase
) -> None:
    response = client.completions.create(
        model=model_name, prompt=case.prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.object == "text_completion"
    assert response.model == model_name
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0
    assert choice.text == greedy_text(tokenizer, case)
    assert choice.finish_reason == case.finish_reason()
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(case.prompt)
    # An end-of-sequence token counts as a generated token (it adds no text).
    assert response.usage.completion_tokens == len(case.generated)
    assert response.usage.total_tokens == len(case.prompt) + len(case.generated)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_streamed_completion_matches_reference(
    client: OpenAI, tokenizer: Tokenizer, model_name: str, case: GreedyCase
) -> None:
    stream = client.completions.create(
        model=model_name, prompt=case.prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)  # the client stops at `data: [DONE]`
    assert chunks, "no chunks"
    assert len({chunk.id for chunk in chunks}) == 1, "chunks of one completion share an id"
    texts = [choice.text for chunk in chunks for choice in chunk.choices]
    assert "".join(texts) == greedy_text(tokenizer, case)
    reasons = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert reasons == [case.finish_reason()], "exactly one finish_reason, on the last chunk"
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == case.finish_reason()
    # Without stream_options no chunk carries usage.
    assert all(chunk.usage is None for chunk in chunks)


def test_stream_options_include_usage_sends_a_final_usage_chunk(
    client: OpenAI, tokenizer: Tokenizer, model_name: str
) -> None:
    case = _case(1)
    stream = client.completions.create(
        model=model_name,
        prompt=case.prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [], "the usage chunk comes last, with no choices"
    assert last.usage is not None
    assert last.usage.prompt_tokens == len(case.prompt)
    assert last.usage.completion_tokens == len(case.generated)
    assert last.usage.total_tokens == len(case.prompt) + len(case.generated)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == greedy_text(tokenizer, case)


def test_n2_greedy_gives_two_identical_choices(
    client: OpenAI, tokenizer: Tokenizer, model_name: str
) -> None:
    case = _case(2)
    response = client.completions.create(
        model=model_name, prompt=case.prompt, max_tokens=MAX_TOKENS, temperature=0, n=2
    )
    assert sorted(choice.index for choice in response.choices) == [0, 1]
    for choice in response.choices:
        assert choice.text == greedy_text(tokenizer, case)
        assert choice.finish_reason == case.finish_reason()
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(case.prompt)
    assert response.usage.completion_tokens == 2 * len(case.generated)


def test_logprobs_three_alternatives(client: OpenAI, model_name: str) -> None:
    case = _case(0)
    response = client.completions.create(
        model=model_name, prompt=case.prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=3
    )
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None
    tokens = logprobs.tokens
    token_logprobs = logprobs.token_logprobs
    top = logprobs.top_logprobs
    offsets = logprobs.text_offset
    assert tokens is not None and token_logprobs is not None
    assert top is not None and offsets is not None
    n = len(case.generated)
    assert len(tokens) == len(token_logprobs) == len(top) == len(offsets) == n
    assert all(isinstance(token, str) for token in tokens)
    for lp in token_logprobs:
        assert lp is not None and lp <= 0.0 and math.isfinite(lp)
    for step, (chosen, alternatives) in enumerate(zip(token_logprobs, top, strict=True)):
        assert alternatives is not None
        # Keys are token texts; distinct byte tokens can share one ("\ufffd"), so a step may
        # show fewer than 3 keys.
        assert 1 <= len(alternatives) <= 3, (step, alternatives)
        assert all(v <= 0.0 for v in alternatives.values())
        # Greedy picks the most likely token.
        assert chosen is not None
        assert math.isclose(chosen, max(alternatives.values()), abs_tol=1e-4), (
            step,
            chosen,
            alternatives,
        )
    assert max(len(alternatives or {}) for alternatives in top) == 3
    assert all(a <= b for a, b in zip(offsets, offsets[1:], strict=False)), offsets
    assert offsets[-1] > offsets[0], offsets


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_stop_string_cuts_the_text(
    client: OpenAI, tokenizer: Tokenizer, model_name: str, stream: bool
) -> None:
    case = _case(2)
    full = greedy_text(tokenizer, case)
    # A word from the middle of the greedy text.
    match = next(m for m in re.finditer(r"[A-Za-z]{3,}", full) if m.start() >= 4)
    stop = match.group()[:3]
    expected = full[: full.find(stop)]
    kwargs: dict[str, Any] = dict(
        model=model_name, prompt=case.prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
        reasons = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
        assert reasons == ["stop"]
    else:
        response = client.completions.create(**kwargs)
        text = response.choices[0].text
        assert response.choices[0].finish_reason == "stop"
    assert text == expected, (stop, full)
    assert stop not in text


def test_echo_token_prompt_prepends_the_prompt_text(
    client: OpenAI, tokenizer: Tokenizer, model_name: str
) -> None:
    case = _case(1)
    prompt_text = tokenizer.decode(case.prompt, skip_special_tokens=True)
    response = client.completions.create(
        model=model_name, prompt=case.prompt, max_tokens=MAX_TOKENS, temperature=0, echo=True
    )
    text = response.choices[0].text
    assert text.startswith(prompt_text)
    assert text == prompt_text + greedy_text(tokenizer, case)


def test_echo_text_prompt(client: OpenAI, model_name: str) -> None:
    prompt = "Hello world"
    response = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=8, temperature=0, echo=True
    )
    text = response.choices[0].text
    assert text.startswith(prompt)
    assert len(text) > len(prompt)


def test_text_prompt_is_tokenized_with_bos(
    client: OpenAI, tokenizer: Tokenizer, model_name: str
) -> None:
    prompt = "My favourite condiment is"
    ids = tokenizer.encode(prompt).ids
    assert ids[0] == BOS_ID
    as_text = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=12, temperature=0
    )
    as_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=12, temperature=0)
    assert as_text.usage is not None and as_text.usage.prompt_tokens == len(ids)
    assert as_text.choices[0].text == as_ids.choices[0].text
    assert as_text.choices[0].text != ""


def test_ignore_eos_runs_past_end_of_sequence(
    client: OpenAI, tokenizer: Tokenizer, model_name: str
) -> None:
    case = _case(3)
    assert case.ends_with_eos and len(case.generated) < MAX_TOKENS
    response = client.completions.create(
        model=model_name,
        prompt=case.prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == MAX_TOKENS
    assert response.choices[0].text.startswith(greedy_text(tokenizer, case))


def test_top_k_one_is_greedy(client: OpenAI, tokenizer: Tokenizer, model_name: str) -> None:
    case = _case(4)
    response = client.completions.create(
        model=model_name,
        prompt=case.prompt,
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=5,
        extra_body={"top_k": 1},
    )
    assert response.choices[0].text == greedy_text(tokenizer, case)


def test_sampling_extensions_are_accepted_and_seeded(client: OpenAI, model_name: str) -> None:
    case = _case(2)
    kwargs: dict[str, Any] = dict(
        model=model_name,
        prompt=case.prompt,
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2},
    )
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert first.choices[0].text == second.choices[0].text


def test_same_seed_same_text(client: OpenAI, model_name: str) -> None:
    case = _case(2)

    def sample(seed: int) -> str:
        response = client.completions.create(
            model=model_name, prompt=case.prompt, max_tokens=MAX_TOKENS, temperature=0.9, seed=seed
        )
        return response.choices[0].text

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    # 24 tokens sampled at 0.9 from a random model: another seed all but surely differs, and
    # a server that ignored `seed` would give the same text (or differ on the repeat above).
    assert other != first


# --------------------------------------------------------------------------------------------
# Chat


HELLO: Messages = [{"role": "user", "content": "Hello"}]


def test_chat_completion(client: OpenAI, tokenizer: Tokenizer, model_name: str) -> None:
    response = client.chat.completions.create(
        model=model_name,
        messages=HELLO,
        max_tokens=16,
        temperature=0,
    )
    assert response.object == "chat.completion"
    assert response.model == model_name
    choice = response.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content != ""
    assert choice.finish_reason in ("stop", "length")
    assert response.usage is not None
    prompt_ids = chat_prompt_ids(tokenizer, HELLO)
    # One BOS: the template's, not another one added by the tokenizer.
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert 0 < response.usage.completion_tokens <= 16
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


@pytest.mark.parametrize(
    "messages",
    [
        HELLO,
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "How are you?"},
        ],
    ],
    ids=["one-turn", "three-turns"],
)
def test_chat_is_the_completion_of_the_rendered_template(
    client: OpenAI, tokenizer: Tokenizer, model_name: str, messages: Messages
) -> None:
    chat = client.chat.completions.create(
        model=model_name,
        messages=messages,
        max_tokens=16,
        temperature=0,
    )
    completion = client.completions.create(
        model=model_name, prompt=chat_prompt_ids(tokenizer, messages), max_tokens=16, temperature=0
    )
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.choices[0].finish_reason == completion.choices[0].finish_reason
    assert chat.usage is not None and completion.usage is not None
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens


def test_chat_streamed_equals_plain(client: OpenAI, model_name: str) -> None:
    plain = client.chat.completions.create(
        model=model_name,
        messages=HELLO,
        max_tokens=16,
        temperature=0,
    )
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=HELLO,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    deltas = [choice.delta for chunk in chunks for choice in chunk.choices]
    assert deltas and deltas[0].role == "assistant", "the first delta names the role"
    content = "".join(delta.content or "" for delta in deltas)
    assert content == plain.choices[0].message.content
    reasons = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert reasons == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_seeded_sampling_is_reproducible(client: OpenAI, model_name: str) -> None:
    def sample() -> str | None:
        response = client.chat.completions.create(
            model=model_name,
            messages=HELLO,
            max_tokens=16,
            temperature=0.9,
            seed=7,
        )
        return response.choices[0].message.content

    assert sample() == sample()


# --------------------------------------------------------------------------------------------
# Structured outputs, the fields clients add, models.retrieve


class Pet(BaseModel):
    """Short fields only, and no others (`additionalProperties: false`): the fixture's random
    weights write whatever the schema allows."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=8)
    legs: int = Field(ge=0, le=8)
    kind: Literal["cat", "dog", "bird"]


class Owner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=8)
    pets: list[Pet] = Field(max_length=2)


def test_chat_json_schema_response_format_validates(client: OpenAI, model_name: str) -> None:
    schema = Owner.model_json_schema()
    for seed in range(3):
        response = client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "Describe an owner."}],
            max_tokens=300,
            temperature=1.0,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "owner", "schema": schema, "strict": True},
            },
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        Owner.model_validate_json(choice.message.content or "")


def test_chat_completions_parse_with_a_pydantic_model(client: OpenAI, model_name: str) -> None:
    completion = client.chat.completions.parse(
        model=model_name,
        messages=[{"role": "user", "content": "A pet, please."}],
        response_format=Pet,
        max_tokens=100,
        temperature=0.8,
        seed=3,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet), message
    assert message.refusal is None
    assert message.parsed.kind in ("cat", "dog", "bird")


def test_json_object_and_streamed_structured_chat(client: OpenAI, model_name: str) -> None:
    stream = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "JSON!"}],
        max_tokens=200,
        temperature=1.0,
        seed=5,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pet", "schema": Pet.model_json_schema()},
        },
    )
    text = "".join(
        chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
    )
    Pet.model_validate_json(text)


def test_completions_take_response_format_and_vllm_guided_fields(
    client: OpenAI, model_name: str
) -> None:
    response = client.completions.create(
        model=model_name,
        prompt="Pet:",
        max_tokens=100,
        temperature=1.0,
        seed=1,
        n=2,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "pet", "schema": Pet.model_json_schema()},
            }
        },
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        Pet.model_validate_json(choice.text)
    response = client.completions.create(
        model=model_name,
        prompt="Verdict:",
        max_tokens=20,
        temperature=1.0,
        seed=2,
        extra_body={"guided_choice": ["guilty", "not guilty"]},
    )
    assert response.choices[0].text in ("guilty", "not guilty")


def test_an_invalid_schema_is_a_400_naming_response_format(
    client: OpenAI, model_name: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "objcet"}},
            },
        )
    error = raised.value.body
    assert isinstance(error, dict) and error.get("param") == "response_format", error


def test_models_retrieve(client: OpenAI, model_name: str) -> None:
    model = client.models.retrieve(model_name)
    assert model.id == model_name and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_fields_that_cannot_change_the_output_are_accepted(
    client: OpenAI, model_name: str
) -> None:
    plain = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=8, temperature=0
    )
    decorated = client.chat.completions.create(
        model=model_name,
        messages=HELLO,
        max_completion_tokens=8,
        temperature=0,
        store=False,
        metadata={"app": "e2e"},
        service_tier="auto",
        user="tester",
        safety_identifier="tester-1",
        prompt_cache_key="hello",
        parallel_tool_calls=True,
        modalities=["text"],
        stream_options=None,
        extra_body={"prompt_cache_retention": "in-memory"},
    )
    assert decorated.choices[0].message.content == plain.choices[0].message.content
    assert decorated.choices[0].message.refusal is None
    streamed = client.chat.completions.create(
        model=model_name,
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == plain.choices[0].message.content


# --------------------------------------------------------------------------------------------
# Tool calls

WEATHER_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "unit": {"enum": ["C", "F"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


class WeatherArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=8)
    unit: Literal["C", "F"]


def test_named_tool_choice_returns_a_call_of_that_function(client: OpenAI, model_name: str) -> None:
    response = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        temperature=1.0,
        seed=1,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    WeatherArguments.model_validate_json(call.function.arguments)


def test_required_tool_choice_without_parallel_calls_returns_one_call(
    client: OpenAI, model_name: str
) -> None:
    response = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Time or weather?"}],
        tools=WEATHER_TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=1.0,
        seed=2,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        WeatherArguments.model_validate_json(call.function.arguments)


def test_tool_calls_stream_as_openai_deltas(client: OpenAI, model_name: str) -> None:
    stream = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        temperature=1.0,
        seed=3,
        stream=True,
    )
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            if delta.function and delta.function.name:
                names[delta.index] = names.get(delta.index, "") + delta.function.name
            if delta.function and delta.function.arguments:
                arguments[delta.index] = arguments.get(delta.index, "") + delta.function.arguments
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert names == {0: "get_weather"}
    WeatherArguments.model_validate_json(arguments[0])


def test_auto_tools_with_a_text_reply(client: OpenAI, model_name: str) -> None:
    # The fixture's random weights write text, not calls: it comes back as content.
    response = client.chat.completions.create(
        model=model_name,
        messages=HELLO,
        tools=WEATHER_TOOLS,
        tool_choice="auto",
        max_tokens=8,
        temperature=0,
    )
    message = response.choices[0].message
    assert message.tool_calls is None and isinstance(message.content, str)


HERMES_STYLE_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}"
    "</tools>{% endif %}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} "
    "[/INST]{% elif m.role == 'assistant' %}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}'
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}{{ eos_token }}"
    "{% elif m.role == 'tool' %}<tool_response>{{ m.tool_call_id }}={{ m.content }}"
    "</tool_response>{% endif %}{% endfor %}"
)


def test_a_conversation_with_tool_messages(spawn_server: Any, tmp_path: Any) -> None:
    """The fixture with a tool-aware (Hermes-style) chat template: the history's tool call and
    tool answer reach the template, and the next call comes back as tool_calls."""
    model = tmp_path / "w8-gqa2-tools"
    shutil.copytree(FIXTURE_DIR, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = HERMES_STYLE_TEMPLATE
    config_path.write_text(json.dumps(config))
    server = spawn_server(model=model, name="tools-template")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    messages: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "And Rome?"},
    ]
    # The rendered prompt holds the tools, the earlier call and its answer.
    rendered = httpx.post(
        f"{server.url}/tokenize",
        json={"model": model.name, "messages": messages},
        timeout=60,
    ).json()
    text = httpx.post(
        f"{server.url}/detokenize",
        json={"model": model.name, "tokens": rendered["tokens"]},
        timeout=60,
    ).json()["prompt"]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}' in text, text
    assert "<tool_response>call_1=sunny</tool_response>" in text, text
    response = client.chat.completions.create(
        model=model.name,
        messages=messages,
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        temperature=1.0,
        seed=9,
    )
    (call,) = response.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    WeatherArguments.model_validate_json(call.function.arguments)
