"""`stepflash` command line: `generate` and `chat` stream through the engine and report speed."""

import argparse
import dataclasses
import os
import signal
import socket
import sys
import time
import types
import typing
from pathlib import Path

from stepflash.config import ConfigError, EngineConfig
from stepflash.distributed import launched_by_torchrun
from stepflash.engine.engine import LLMEngine
from stepflash.engine.worker import serve_rank
from stepflash.model.loader import CheckpointError
from stepflash.model.step3p5 import active_weight_bytes
from stepflash.models import default_model_dir
from stepflash.sampling import SamplingParams
from stepflash.server.parsers import split_reasoning


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), **defaults) -> None:
    """One flag per EngineConfig field (`--max-num-seqs`, `--enable-prefix-caching/--no-...`),
    with the field's help and choices; `defaults` overrides a field's default for this command."""
    hints = typing.get_type_hints(EngineConfig)
    fields = [f for f in dataclasses.fields(EngineConfig) if f.name not in skip]
    parser.set_defaults(engine_options=[f.name for f in fields])
    for f in fields:
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not types.NoneType)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                                help=f.metadata["help"])


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name in args.engine_options})


def stream_completion(engine: LLMEngine, prompt: str | list[int], params: SamplingParams,
                      echo: str = "") -> tuple[str, float, int]:
    """Run one request, printing `echo` once it is accepted, then text as it arrives;
    returns (text, seconds, tokens)."""
    engine.add_request("cli", prompt, params)
    sys.stdout.write(echo)
    text, count, start = "", 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for c in delta.outputs:
                sys.stdout.write(c.text)
                text, count = text + c.text, count + len(c.token_ids)
            sys.stdout.flush()
    return text, time.perf_counter() - start, count


def report_speed(engine: LLMEngine, seconds: float, count: int) -> None:
    """Tokens/s, and the weight bandwidth it amounts to (per target forward, so MTP steps count once)."""
    spec = engine.output.spec
    forwards = count - spec.num_accepted_tokens
    gbps = active_weight_bytes(engine.model) * forwards / seconds / 1e9 if seconds > 0 else 0.0
    mtp = (f", MTP-{engine.num_mtp}: {spec.mean_accepted_length:.2f} tokens per step, "
           f"{100 * spec.acceptance_rate:.0f}% of drafts accepted" if engine.num_mtp else "")
    print(f"[{count} tokens in {seconds:.2f} s: {count / max(seconds, 1e-9):.1f} tokens/s, "
          f"{gbps:.2f} GB/s of active weights{mtp}]", file=sys.stderr)


def make_engine(args: argparse.Namespace) -> LLMEngine:
    return LLMEngine(*engine_source(args))


def engine_source(args: argparse.Namespace) -> tuple[Path, EngineConfig]:
    """The model directory and engine options; under `torchrun` (several nodes) every rank but 0
    serves its shard here until rank 0 stops, then exits."""
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    ec = engine_config(args)
    if launched_by_torchrun() and int(os.environ["RANK"]) > 0:
        if int(os.environ["WORLD_SIZE"]) != ec.tensor_parallel_size:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} ranks; --tensor-parallel-size is "
                             f"{ec.tensor_parallel_size}")
        serve_rank(int(os.environ["RANK"]), None, model_dir, ec, int(os.environ.get("LOCAL_RANK", 0)))
        raise SystemExit(0)
    return model_dir, ec


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens)


def cmd_generate(args: argparse.Namespace) -> None:
    engine = make_engine(args)
    try:
        params = sampling_from_args(args)
        _, seconds, count = stream_completion(engine, args.prompt, params, echo=args.prompt)
        sys.stdout.write("\n")
        report_speed(engine, seconds, count)
    finally:
        engine.shutdown()


def cmd_chat(args: argparse.Namespace) -> None:
    """Interactive loop: each line is a user turn; the reply streams back (reasoning included)."""
    engine = make_engine(args)
    try:
        chat_loop(engine, args)
    finally:
        engine.shutdown()


def chat_loop(engine: LLMEngine, args: argparse.Namespace) -> None:
    params = sampling_from_args(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("stepflash chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
        reply, seconds, count = stream_completion(engine, prompt, params, echo="assistant: ")
        sys.stdout.write("\n")
        report_speed(engine, seconds, count)
        reasoning, content = split_reasoning(reply)
        messages.append({"role": "assistant", "content": content, "reasoning_content": (reasoning or "").strip("\n")})


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the engine starts: a port in use fails at once, and port 0
    takes one the OS picks (the startup line names it)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise ValueError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    """OpenAI-compatible server; binds 127.0.0.1 unless told otherwise."""
    import logging

    import uvicorn

    from stepflash.engine.front import AsyncLLMEngine
    from stepflash.multimodal import MediaPolicy
    from stepflash.server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    listening = listen(args.host, args.port)
    model_dir, ec = engine_source(args)
    api_key = args.api_key or os.environ.get("STEPFLASH_API_KEY")
    media = MediaPolicy(args.max_image_bytes, tuple(args.allowed_media_domains or ()), args.allowed_local_media_path)
    front = AsyncLLMEngine(model_dir, ec)  # the engine's own process (engine/front.py)
    app = create_app(front, args.served_model_name or model_dir.name, api_key, args.max_queue,
                     args.thinking_token_budget, media, args.allowed_origins)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    front.on_fatal = lambda error: setattr(server, "should_exit", True)  # a rank failed: shut down, exit 1
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"stepflash: serving {model_dir} as {args.served_model_name or model_dir.name!r} on "
          f"http://{host}:{listening.getsockname()[1]}/v1 (api key {'required' if api_key else 'off'})",
          file=sys.stderr, flush=True)
    # uvicorn re-raises SIGTERM once it has shut down: leave through `finally`, so that the ranks stop
    # too, then die of the signal as before
    terminated = []

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.run(sockets=[listening])
    finally:
        front.shutdown()
        if terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
    if front.fatal is not None:
        print(f"stepflash: error: {front.fatal}", file=sys.stderr)
        raise SystemExit(1)


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from stepflash.train.tokenizer import corpus_files, train_tokenizer

    files = corpus_files(args.corpus, tuple(args.suffixes or (".py",)), args.exclude or ())
    tok = train_tokenizer(files, args.out, args.vocab_size)
    print(f"trained on {len(files)} files; vocab {tok.vocab_size}; wrote {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    """Tokenizer (trained on the corpus unless --tokenizer is given), then the model; resumes a run in --out."""
    import json

    from stepflash.tokenizer import Tokenizer
    from stepflash.train.configs import PRESETS
    from stepflash.train.tokenizer import corpus_files, train_tokenizer
    from stepflash.train.trainer import STATE_FILE, TrainConfig, split_files, train

    files = corpus_files(args.corpus, (".py",), args.exclude or ())
    train_files, heldout_files = split_files(files, 0.05)
    if not heldout_files and len(train_files) > 1:
        heldout_files = [train_files.pop()]
    if not train_files or not heldout_files:
        raise ValueError(f"need at least 2 corpus files, found {len(files)}")
    tok_dir = Path(args.tokenizer) if args.tokenizer else args.out / "tokenizer"
    if args.tokenizer is None and not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(train_files, tok_dir, args.vocab_size)
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    if args.config in PRESETS:
        config = PRESETS[args.config](tokenizer.vocab_size)
    else:
        config = json.loads(Path(args.config).read_text())
    eos = tokenizer.eos_token_ids[:1]
    encode = lambda paths: [tokenizer.encode(p.read_text(encoding="utf-8")) + eos for p in paths]  # noqa: E731
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      device=args.device if args.device != "auto" else "cpu", stop_at=args.stop_at,
                      warmup_steps=args.warmup_steps, save_dtype=args.save_dtype)
    print(f"training on {len(train_files)} files ({len(heldout_files)} held out), vocab {tokenizer.vocab_size}",
          file=sys.stderr)
    result = train(config, tok_dir, encode(train_files), encode(heldout_files), args.out, cfg,
                   resume=(args.out / STATE_FILE).is_file())
    print(f"held-out loss {result.final_heldout_loss:.4f}, perplexity {result.final_heldout_perplexity:.2f}; "
          f"model written to {args.out}")


def _endpoint(args: argparse.Namespace):
    try:
        from stepflash.bench.client import Endpoint, served_model
    except ImportError as e:
        raise ValueError(f"stepflash bench/eval need the bench extra ({e}): pip install 'stepflash[bench]'") from None

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    model = args.model or served_model(args.base_url, api_key)
    return Endpoint(args.base_url, model, api_key, chat=not args.completions, timeout=args.timeout)


def _tag(results: list[dict], args: argparse.Namespace) -> None:
    if args.label:
        for result in results:
            result["label"] = args.label


def cmd_bench(args: argparse.Namespace) -> None:
    import dataclasses

    from stepflash.bench.load import PRESETS, PromptSource, Workload, run_bench, sweep

    base = PRESETS[args.preset] if args.preset else Workload("custom")
    overrides = {k: v for k, v in {
        "input_len": args.input_len, "output_len": args.output_len, "range_ratio": args.range_ratio,
        "request_rate": args.request_rate, "burstiness": args.burstiness, "num_requests": args.num_requests,
        "duration": args.duration, "warmup": args.warmup, "temperature": args.temperature}.items() if v is not None}
    base = dataclasses.replace(base, **overrides)
    ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731
    source = PromptSource([Path(p) for p in args.text] if args.text else None, args.dataset, args.seed)
    slo = {k: float(v) / 1e3 for k, v in (item.split(":") for item in args.goodput.split(","))} if args.goodput else None
    results = run_bench(_endpoint(args), sweep(base, ints(args.concurrency), ints(args.input_lens)), source, slo,
                        args.seed)
    _tag(results, args)
    _write(results, args.output_dir, "bench")


def cmd_eval(args: argparse.Namespace) -> None:
    from stepflash.bench.evals import run_eval

    endpoint = _endpoint(args)
    if args.task == "humaneval" and not args.chat:
        endpoint.chat = False  # code continuation
    result = run_eval(endpoint, args.task, args.data, args.max_tokens, args.limit, args.concurrency,
                      args.unsafe_no_sandbox)
    _tag([result], args)
    _write([result], args.output_dir, f"eval-{args.task}")


def _write(results: list[dict], out_dir: Path | None, stem: str) -> None:
    import json

    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i, result in enumerate(results):
        name = "".join(c if c.isalnum() or c in "=.-" else "_" for c in result.get("label", "run"))
        suffix = f"-c{result['workload']['concurrency']}-in{result['workload']['input_len']}" if "workload" in result else ""
        path = out_dir / f"{stem}-{name}{suffix}-{stamp}-{i}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}", file=sys.stderr)


def cmd_quantize(args: argparse.Namespace) -> None:
    from stepflash.model.quant import quantize_checkpoint

    count = quantize_checkpoint(Path(args.model), args.out, args.group_size)
    print(f"quantized {count} expert tensors to int4 (group size {args.group_size}); wrote {args.out}")


def cmd_report(args: argparse.Namespace) -> None:
    from stepflash.bench.report import load_results, print_tables, write_charts

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("stepflash report needs matplotlib: pip install 'stepflash[bench]'") from None
    results = load_results(args.results)
    print_tables(results)
    for path in write_charts(results, args.out):
        print(f"wrote {path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepflash", description="Serve Step-3.5-Flash-class models fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming")
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", help="system message")
    for p, max_tokens, temperature in ((gen, 32, 0.0), (chat, 256, 0.7)):
        p.add_argument("--model", help="hub-format model directory (default: the bundled model)")
        p.add_argument("--max-tokens", type=int, default=max_tokens)
        p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int)
    gen.set_defaults(func=cmd_generate)
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--model", help="hub-format model directory (default: the bundled model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: a free port, named in the startup line")
    serve.add_argument("--api-key", help="require this bearer token on /v1 (or set STEPFLASH_API_KEY)")
    serve.add_argument("--served-model-name", help="model id clients use (default: the directory name)")
    for p in (gen, chat):  # one request at a time, too short to pay for compiling; --seed is the request's
        add_engine_args(p, skip=("seed",), max_num_seqs=1, compile="off")
    add_engine_args(serve)
    serve.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    serve.add_argument("--thinking-token-budget", type=int, default=None,
                       help="default reasoning budget in tokens: once spent the engine closes the reasoning "
                            "(</think>) and the answer begins (requests may set their own)")
    serve.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                       help="browser origins allowed to call the API (CORS; off by default), e.g. http://localhost:3000")
    serve.add_argument("--allowed-media-domains", nargs="+", help="domains whose http(s) image URLs may be fetched "
                       "(default: none; data: URLs always work)")
    serve.add_argument("--allowed-local-media-path", help="directory whose files image URLs may name (default: none)")
    serve.add_argument("--max-image-bytes", type=int, default=20 << 20, help="encoded bytes per image")
    serve.set_defaults(func=cmd_serve)
    tt = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with the Step-3.5 special tokens")
    tt.add_argument("--corpus", type=Path, nargs="+", required=True, help="files or directories")
    tt.add_argument("--out", type=Path, required=True)
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--suffix", action="append", dest="suffixes", help="file suffix to take from directories "
                    "(repeatable; default .py)")
    tt.add_argument("--exclude", action="append", help="skip folders with this name, e.g. site-packages (repeatable)")
    tt.set_defaults(func=cmd_train_tokenizer)
    tr = sub.add_parser("train", help="train a Step-3.5-architecture model (MTP modules included) on code")
    tr.add_argument("--corpus", type=Path, nargs="+", required=True, help="files or directories of .py files")
    tr.add_argument("--out", type=Path, required=True, help="hub-format model directory (a run there resumes)")
    tr.add_argument("--exclude", action="append", help="skip folders with this name, e.g. site-packages (repeatable)")
    tr.add_argument("--config", default="small", help="tiny, small, bundled, or a config.json file")
    tr.add_argument("--tokenizer", help="directory with tokenizer.json (default: train one on the corpus)")
    tr.add_argument("--vocab-size", type=int, default=8192)
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--stop-at", type=int, help="end this run at this step (resume later)")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--seq-len", type=int, default=256)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--warmup-steps", type=int, default=20)
    tr.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the written weights")
    tr.add_argument("--device", default="auto")
    tr.set_defaults(func=cmd_train)
    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (speed metrics, JSON results)")
    ev = sub.add_parser("eval", help="accuracy and speed on a task file (gsm8k, humaneval, jsonl)")
    for p in (bench, ev):
        p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
        p.add_argument("--model", help="model name the endpoint serves (default: the first of its /v1/models)")
        p.add_argument("--api-key", help="bearer token (or set OPENAI_API_KEY)")
        p.add_argument("--label", help="name for this configuration in reports (default: the model)")
        p.add_argument("--completions", action="store_true", help="use /v1/completions instead of chat")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds per request and between chunks")
        p.add_argument("--output-dir", type=Path, help="write JSON results here")
    bench.add_argument("--preset", choices=["aa-1k", "aa-1k-parallel", "aa-10k", "aa-100k", "random"])
    bench.add_argument("--input-len", type=int, help="prompt tokens (approximately: text is cut by characters)")
    bench.add_argument("--output-len", type=int)
    bench.add_argument("--range-ratio", type=float, help="lengths uniform in [L(1-r), L(1+r)]")
    bench.add_argument("--concurrency", help="requests in flight, e.g. 1,2,4,8 for a sweep")
    bench.add_argument("--input-lens", help="sweep over input lengths, e.g. 1000,10000")
    bench.add_argument("--request-rate", type=float, help="requests/s with gamma arrivals (default: back to back)")
    bench.add_argument("--burstiness", type=float, help="gamma shape of arrivals (1 = Poisson)")
    bench.add_argument("--num-requests", type=int)
    bench.add_argument("--duration", type=float, help="seconds to keep sending (instead of --num-requests)")
    bench.add_argument("--warmup", type=int, help="requests sent first and not measured")
    bench.add_argument("--temperature", type=float)
    bench.add_argument("--dataset", type=Path, help="JSONL prompts ('prompt' field or ShareGPT 'conversations')")
    bench.add_argument("--text", nargs="+", help="text files to cut prompts from (default: Python's stdlib)")
    bench.add_argument("--seed", type=int, help="repeatable prompts and lengths (default: prompts unique to the run)")
    bench.add_argument("--goodput", help="SLOs in ms for goodput, e.g. ttft:500,tpot:50,e2el:5000")
    bench.set_defaults(func=cmd_bench)
    ev.add_argument("--task", required=True, choices=["gsm8k", "humaneval", "jsonl"])
    ev.add_argument("--data", type=Path, required=True, help="the task's JSONL file")
    ev.add_argument("--limit", type=int, help="first N items only")
    ev.add_argument("--max-tokens", type=int, default=512)
    ev.add_argument("--concurrency", type=int, default=1)
    ev.add_argument("--chat", action="store_true", help="humaneval through chat (default: completions)")
    ev.add_argument("--unsafe-no-sandbox", action="store_true",
                    help="run model-written code (humaneval) without the bubblewrap sandbox: unsafe, warns")
    ev.set_defaults(func=cmd_eval)
    quant = sub.add_parser("quantize", help="write a copy of a model with its routed experts in INT4")
    quant.add_argument("--model", required=True, help="hub-format model directory")
    quant.add_argument("--out", type=Path, required=True)
    quant.add_argument("--format", default="int4", choices=["int4"])
    quant.add_argument("--group-size", type=int, default=128, help="inputs per scale (symmetric, group-wise)")
    quant.set_defaults(func=cmd_quantize)
    rep = sub.add_parser("report", help="tables and PNG charts from bench/eval JSON results")
    rep.add_argument("results", type=Path, nargs="+")
    rep.add_argument("--out", type=Path, required=True, help="directory for the PNG charts")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"stepflash: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
