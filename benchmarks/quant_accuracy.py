"""What INT4 experts cost in accuracy: held-out perplexity and KL(original || int4) per token.

Quantizes the model's routed experts with `stepflash quantize` (group-wise, symmetric) into a
temporary directory, then scores windows of held-out standard-library code with both models.

    python benchmarks/quant_accuracy.py [--model DIR] [--group-size 128] [--windows 100]
"""

import argparse
import datetime
import json
import math
import tempfile
from pathlib import Path

import torch
from model_card import heldout_token_ids, windows

from stepflash.model.loader import load_model
from stepflash.model.quant import quantize_checkpoint
from stepflash.models import default_model_dir
from stepflash.tokenizer import Tokenizer


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--window-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model_dir = args.model or default_model_dir()
    texts = windows(heldout_token_ids(Tokenizer.from_pretrained(model_dir)), args.window_len, args.windows)
    with tempfile.TemporaryDirectory() as tmp:
        quantize_checkpoint(model_dir, Path(tmp), args.group_size)
        original, int4 = load_model(model_dir), load_model(tmp)
    nll = {"original": 0.0, "int4": 0.0}
    kl, agree, count = 0.0, 0, 0
    for ids in texts:
        x = torch.tensor(ids)
        logp = {}
        for name, model in (("original", original), ("int4", int4)):
            logp[name] = model.compute_logits(model(x, torch.arange(len(x)))).log_softmax(-1)[:-1]
            nll[name] -= float(logp[name].gather(1, x[1:, None]).sum())
        kl += float((logp["original"].exp() * (logp["original"] - logp["int4"])).sum())
        agree += int((logp["original"].argmax(-1) == logp["int4"].argmax(-1)).sum())
        count += len(x) - 1
    result = {"model": str(model_dir), "group_size": args.group_size, "tokens": count,
              "perplexity_original": math.exp(nll["original"] / count), "perplexity_int4": math.exp(nll["int4"] / count),
              "kl_per_token": kl / count, "greedy_agreement": agree / count,
              "date": datetime.date.today().isoformat()}
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / f"quant_accuracy-{model_dir.name}-g{args.group_size}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
