"""Scripted checkpoints: hub-format models whose greedy decoding follows a given script, for server
and parser tests that need known output."""

import json
from pathlib import Path
from typing import Any

import tokenizers
import torch

from stepflash.config import ModelConfig
from checkpoints import random_weights, save_shards
from stepflash.train.configs import tiny_config
from checkpoints import write_byte_level_tokenizer
from stepflash.tokenizer import EOS_TOKEN

_BLOCK_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "moe.down_proj.weight",
                  "share_expert.down_proj.weight")
SCRIPT_LOGIT = 30.0  # logit of the scripted next token; the other scripted rows give 0, random rows O(1)


def write_scripted_checkpoint(out_dir: str | Path, script: list[str], trigger: str = "\n",
                              config: dict[str, Any] | None = None,
                              more: dict[str, list[str]] | None = None) -> list[int]:
    """Write a hub-format checkpoint whose greedy decoding, after any prompt that ends with the token
    for `trigger`, emits `script` (one token per string) and then `<|end_of_sentence|>`.

    Script strings that are already single tokens of the byte-level tokenizer (such as `</think>`)
    keep their ids; the others become added, non-special tokens. Every block output (attention
    o_proj, dense, shared and routed down_proj, decoder and MTP layers) is zero, so each hidden state
    is its token's embedding; the final norm is the identity scale and lm_head maps the normalised
    embedding of token t to exactly SCRIPT_LOGIT on next(t) and 0 on the other scripted tokens:
    next(trigger) = script[0], next(script[i]) = script[i + 1], next(script[-1]) = eos. MTP modules
    pass the embedding of their input token through (eh_proj = [I, 0]) to a copy of lm_head, so their
    drafts follow the script too. `more` maps further triggers to their own scripts (every trigger
    and script token distinct). Returns the script's token ids (eos not included).
    """
    chains = {trigger: script, **(more or {})}
    strings = [s for chain in chains.values() for s in chain]
    if len(set(strings)) != len(strings) or set(chains) & set(strings):
        raise ValueError("script tokens must be distinct from each other and from the triggers")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_config())
    config["torch_dtype"] = "float32"
    cfg = ModelConfig.from_dict(config)
    if cfg.tie_word_embeddings:
        raise ValueError("a scripted checkpoint needs an lm_head separate from the embeddings")
    if len(strings) + len(chains) > cfg.hidden_size:
        raise ValueError(f"scripts of {len(strings)} tokens need hidden_size >= {len(strings) + len(chains)}")
    backend, all_ids = _script_tokenizer(out, cfg.vocab_size, strings)
    eos = backend.token_to_id(EOS_TOKEN)
    sources, targets = [], []
    for chain_trigger, chain in chains.items():
        trigger_ids = backend.encode(chain_trigger, add_special_tokens=False).ids
        if len(trigger_ids) != 1:
            raise ValueError(f"trigger {chain_trigger!r} is not a single token: {trigger_ids}")
        ids, all_ids = all_ids[:len(chain)], all_ids[len(chain):]
        sources, targets = sources + [trigger_ids[0], *ids], targets + [*ids, eos]
        if chain is script:
            script_ids = ids
    if len(set(sources)) != len(sources) or eos in sources:
        raise ValueError(f"trigger and script token ids must be distinct and not eos: {sources}")

    weights = random_weights(cfg)
    for name in weights:
        if name.endswith(_BLOCK_OUTPUTS):
            weights[name].zero_()
    weights["model.norm.weight"].zero_()  # zero-centred: scale 1
    embeds = weights["model.embed_tokens.weight"][sources]
    hidden = embeds * torch.rsqrt(embeds.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    # Rows whose products with the normalised source embeddings are SCRIPT_LOGIT on each source's
    # next token and 0 on the other targets (eos ends every chain, so targets may repeat).
    rows = sorted(set(targets))
    wanted = torch.zeros(len(sources), len(rows))
    wanted[range(len(sources)), [rows.index(t) for t in targets]] = SCRIPT_LOGIT
    weights["lm_head.weight"][rows] = (torch.linalg.pinv(hidden) @ wanted).T
    h = cfg.hidden_size
    for depth in range(cfg.num_mtp_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + depth}."
        weights[prefix + "enorm.weight"].zero_()
        weights[prefix + "eh_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
        weights[prefix + "transformer.shared_head.norm.weight"].zero_()
        weights[prefix + "transformer.shared_head.output.weight"] = weights["lm_head.weight"].clone()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_shards(out, weights, 1)
    return script_ids


def _script_tokenizer(out: Path, vocab_size: int, script: list[str]) -> tuple[tokenizers.Tokenizer, list[int]]:
    """Write the byte-level tokenizer with room for the script, add the script strings that are not
    single tokens yet, and return it with the script's ids (each checked to decode to its string)."""
    write_byte_level_tokenizer(out, vocab_size - len(script))
    path = out / "tokenizer.json"
    backend = tokenizers.Tokenizer.from_file(str(path))
    backend.add_tokens([tokenizers.AddedToken(s, special=False, normalized=False) for s in script
                        if len(backend.encode(s, add_special_tokens=False).ids) != 1])
    backend.save(str(path))
    ids = []
    for s in script:
        encoded = backend.encode(s, add_special_tokens=False).ids
        if len(encoded) != 1 or backend.decode(encoded, skip_special_tokens=True) != s:
            raise ValueError(f"script token {s!r} is not one token that decodes back to itself: {encoded}")
        ids.append(encoded[0])
    if backend.decode(ids, skip_special_tokens=True) != "".join(script):
        raise ValueError("the script's token ids do not decode back to the script")
    return backend, ids
