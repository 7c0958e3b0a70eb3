"""Images through a real `stepflash serve` process of a tiny Step 3.7 checkpoint, with the official
openai client: data-URL images streamed and not, equal to the offline engine; bad images are 400s
that name the problem, and the server keeps serving."""

import base64
import io

import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")

from checkpoints import write_vision_checkpoint  # noqa: E402
from stepflash import LLM, SamplingParams  # noqa: E402
from test_server import serving  # noqa: E402

MODEL = "vision"


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _messages(*urls: str, text: str = "What is in this picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_vision_checkpoint(tmp_path_factory.mktemp("vision-server"), seed=4)


@pytest.fixture(scope="module")
def client(ckpt):
    with serving(ckpt, "--max-model-len", "512", "--max-num-seqs", "4", "--limit-images-per-prompt", "2",
                 "--max-image-bytes", "100000", "--max-image-pixels", "1000000", name=MODEL) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def test_chat_with_an_image_equals_the_offline_engine(ckpt, client) -> None:
    messages = _messages(_data_url(_png(200, 100)))
    out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    offline = LLM(str(ckpt), max_model_len=512).chat(messages, SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.usage.prompt_tokens == len(offline.prompt_token_ids) > 8 * 3 + 6  # image tokens counted
    text = (out.choices[0].message.reasoning_content or "") + (out.choices[0].message.content or "")
    assert out.usage.completion_tokens == len(offline.outputs[0].token_ids)
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                                   stream=True))
    parts = [(getattr(c.choices[0].delta, "reasoning_content", None) or "") + (c.choices[0].delta.content or "")
             for c in streamed if c.choices]
    assert "".join(parts) == text


def test_responses_input_image_is_the_chat_image(client) -> None:
    url = _data_url(_png(120, 80, 3))
    chat = client.chat.completions.create(model=MODEL, messages=_messages(url), temperature=0, max_tokens=8)
    content = [{"type": "input_image", "image_url": url, "detail": "auto"},
               {"type": "input_text", "text": "What is in this picture?"}]
    out = client.responses.create(model=MODEL, input=[{"role": "user", "content": content}], temperature=0,
                                  max_output_tokens=8)
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    text = "".join(part.text for item in out.output for part in (item.content or []))  # reasoning, then message
    assert text == (chat.choices[0].message.reasoning_content or "") + (chat.choices[0].message.content or "")


def test_a_different_image_changes_the_prompt_not_its_length(client) -> None:
    a = client.chat.completions.create(model=MODEL, messages=_messages(_data_url(_png(90, 90, 1))), max_tokens=1)
    b = client.chat.completions.create(model=MODEL, messages=_messages(_data_url(_png(90, 90, 2))), max_tokens=1)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def _webp_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(buf, format="WEBP")
    return buf.getvalue()


@pytest.mark.parametrize("urls, words", [
    (["data:image/png;base64,@@@@"], ["base64"]),
    ([_data_url(b"just some text, not a picture", "image/png")], ["not an image"]),
    ([_data_url(_png(300, 300))], ["100000 bytes"]),
    ([_data_url(_webp_bomb(), "image/webp")], ["2000x1000", "1000000 pixels"]),
    (["https://example.com/cat.png"], ["remote image URLs are not allowed", "--allowed-media-domains"]),
    (["file:///etc/passwd"], ["local files"]),
    ([_data_url(_png(20, 20))] * 3, ["3 images", "limit is 2"]),
])
def test_bad_images_are_400s_naming_the_problem(client, urls, words) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_messages(*urls), max_tokens=2)
    for word in words:
        assert word in e.value.message
    ok = client.chat.completions.create(model=MODEL, messages=_messages(_data_url(_png(30, 30))), max_tokens=2)
    assert ok.usage.completion_tokens == 2
