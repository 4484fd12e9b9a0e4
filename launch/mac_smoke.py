"""Smoke test of an exported llmpalette .mlpackage on a Mac: load, prefill a prompt, generate, time it.

Needs macOS 15 / iOS 18 class Core ML (the package is an iOS18 ML Program with states), coremltools,
numpy and transformers (for the tokenizer). It was written against the package's documented inputs and
NOT run by llmpalette's authors: Core ML cannot run models on Linux, where the package is built and
checked with a numpy reference evaluator (`llmpalette verify`). Please report what it prints.

    python launch/mac_smoke.py MODEL.mlpackage --tokenizer JOB/tokenizer [--prompt TEXT] [--tokens 64]
        [--compute-units CPU_AND_NE|ALL|CPU_ONLY|CPU_AND_GPU] [--reference]

`--reference` also runs the same tokens through llmpalette's numpy reference evaluator (llmpalette
installed) and prints the largest difference between the device's logits and the reference's.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

METADATA_KEY = "com.github.llmpalette.export"


def causal_mask(positions: np.ndarray, context_length: int, mask_value: float) -> np.ndarray:
    """0 where cache slot j <= the query's position, `mask_value` elsewhere: float16 [1, 1, S, context]."""
    visible = np.arange(context_length)[None, :] <= positions[:, None]
    return np.where(visible, 0.0, mask_value).astype(np.float16)[None, None]


def logits_of(outputs: dict) -> np.ndarray:
    """[S, vocab] from the lm_head parts logits_0 ... logits_{n-1}."""
    parts = sorted((k for k in outputs if k.startswith("logits_")), key=lambda k: int(k.split("_")[1]))
    return np.concatenate([np.asarray(outputs[k], dtype=np.float32)[0] for k in parts], axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--tokenizer", required=True, help="the job's tokenizer folder (JOB/tokenizer) or a hub id")
    parser.add_argument("--prompt", default="The three most useful Python built-in functions are")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate (greedy)")
    parser.add_argument("--compute-units", default="CPU_AND_NE", choices=["CPU_AND_NE", "ALL", "CPU_ONLY", "CPU_AND_GPU"])
    parser.add_argument("--reference", action="store_true", help="compare the logits with llmpalette's numpy reference evaluator")
    args = parser.parse_args()

    import coremltools as ct
    from transformers import AutoTokenizer

    units = getattr(ct.ComputeUnit, args.compute_units)
    started = time.perf_counter()
    prefill = ct.models.MLModel(args.package, compute_units=units, function_name="prefill")
    decode = ct.models.MLModel(args.package, compute_units=units, function_name="decode")
    load_s = time.perf_counter() - started
    meta = json.loads(prefill.user_defined_metadata[METADATA_KEY])
    S, ctx, mask_value = meta["prefill_length"], meta["context_length"], meta["mask_value"]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompt = tokenizer(args.prompt).input_ids
    if len(prompt) + args.tokens > ctx or -(-len(prompt) // S) * S > ctx:
        raise SystemExit(f"prompt ({len(prompt)} tokens) + {args.tokens} new tokens do not fit the context of {ctx}")
    print(f"loaded {args.package} ({meta['architecture']}, {meta['layers']} layers, context {ctx}, prefill {S}) "
          f"on {args.compute_units} in {load_s:.1f} s (the first load compiles the model)")

    state = prefill.make_state()
    feeds, rows = [], []
    started = time.perf_counter()
    for start in range(0, len(prompt), S):
        chunk = prompt[start:start + S]
        ids = np.zeros((1, S), dtype=np.int32)
        ids[0, :len(chunk)] = chunk
        positions = np.arange(start, start + S, dtype=np.int32)
        feed = {"input_ids": ids, "position_ids": positions, "causal_mask": causal_mask(positions, ctx, mask_value)}
        rows.append(logits_of(prefill.predict(feed, state=state))[:len(chunk)])
        feeds.append(("prefill", feed))
    prefill_s = time.perf_counter() - started
    generated = [int(rows[-1][-1].argmax())]
    started = time.perf_counter()
    for position in range(len(prompt), len(prompt) + args.tokens - 1):
        positions = np.array([position], dtype=np.int32)
        feed = {"input_ids": np.array([[generated[-1]]], dtype=np.int32), "position_ids": positions,
                "causal_mask": causal_mask(positions, ctx, mask_value)}
        logits = logits_of(decode.predict(feed, state=state))
        rows.append(logits)
        feeds.append(("decode", feed))
        generated.append(int(logits[-1].argmax()))
    decode_s = time.perf_counter() - started

    print(f"prompt: {args.prompt!r}")
    print(f"generated: {tokenizer.decode(generated)!r}")
    print(f"prefill: {len(prompt)} tokens in {prefill_s:.3f} s ({len(prompt) / prefill_s:.1f} tokens/s, "
          f"{-(-len(prompt) // S)} call(s) of {S})")
    print(f"decode: {len(generated) - 1} tokens in {decode_s:.3f} s ({(len(generated) - 1) / max(decode_s, 1e-9):.1f} tokens/s)")

    if args.reference:
        from llmpalette.export.coreml import ReferenceEvaluator

        evaluator = ReferenceEvaluator(args.package)
        states = evaluator.new_states("prefill")
        worst = 0.0
        for (function, feed), device in zip(feeds, rows):
            reference = logits_of(evaluator.run(function, feed, states))[:len(device)]
            worst = max(worst, float(np.abs(reference - device).max()))
        print(f"device vs llmpalette's numpy reference evaluator: max |logit difference| {worst:.4g} "
              f"over {sum(len(r) for r in rows)} tokens")


if __name__ == "__main__":
    main()
