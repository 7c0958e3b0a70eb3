"""`stepflash generate`: greedy output equal to the transformers oracle; clear errors."""

import io
import socket

from reference import reference_logits
from stepflash.cli import main
from checkpoints import write_checkpoint
from stepflash.train.configs import tiny_config
from stepflash.tokenizer import Tokenizer

PROMPT = "def fib(n):"


def test_generate_is_greedy_decoding_of_the_reference(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "m", seed=2)
    tok = Tokenizer.from_pretrained(ckpt)
    ids = tok.encode(PROMPT, add_special_tokens=True)
    expected = []
    for _ in range(6):
        token = int(reference_logits(ckpt, ids + expected)[-1].argmax())
        expected.append(token)
        if token in tok.eos_token_ids:
            break
    assert main(["generate", PROMPT, "--model", str(ckpt), "--max-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == PROMPT + tok.decode(expected) + "\n"
    assert "tokens/s" in out.err and "GB/s" in out.err


def test_generate_runs_the_bundled_model_by_default(capsys):
    assert main(["generate", "def fibonacci(n):", "--max-tokens", "8", "--mtp", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def fibonacci(n):") and len(out.out) > len("def fibonacci(n):\n")
    assert "tokens/s" in out.err and "MTP-3" in out.err


def test_generate_errors_name_the_problem(tmp_path, capsys):
    assert main(["generate", PROMPT, "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err

    ckpt = write_checkpoint(tmp_path / "short", tiny_config(max_position_embeddings=16))
    assert main(["generate", "a much longer prompt than sixteen tokens", "--model", str(ckpt)]) == 2
    out = capsys.readouterr()
    assert "prompt has 32 tokens; the context is 16" in out.err and out.out == ""

    assert main(["generate", PROMPT, "--model", str(ckpt), "--max-tokens", "0"]) == 2
    assert "max_tokens must be an integer >= 1" in capsys.readouterr().err


def test_serve_names_a_port_in_use_before_loading_anything(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1 port {port}: Address already in use" in err and "nowhere" not in err


def test_chat_streams_the_same_reply_as_llm_chat(tmp_path, capsys, monkeypatch):
    from stepflash import LLM, SamplingParams

    ckpt = write_checkpoint(tmp_path / "m", seed=6)
    expected = LLM(str(ckpt)).chat([{"role": "user", "content": "hi"}],
                                   SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].text
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\n"))
    assert main(["chat", "--model", str(ckpt), "--max-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "assistant: " + expected + "\n"
