"""Generation from an exported ONNX decoder with ONNX Runtime: numpy, onnxruntime and tokenizers only.

A serving machine needs no torch and no transformers. The sampling steps follow transformers'
logits processors (repetition penalty, temperature, top-k, top-p, in that order) so greedy output
is token-for-token the same as the torch path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np

from finetune.config import GenerateConfig
from finetune.errors import FinetuneError, install_hint
from finetune.exporting import MANIFEST
from finetune.files import read_json, reading, short
from finetune.generation import StopAwareStreamer
from finetune.onnx_kv_cache import SharedFeed, SharedKV
from finetune.text_stream import cut_at_stop


def position_ids_for(mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the last `new_tokens` columns: count of real tokens so far, pads set to 1 (as transformers)."""
    positions = np.cumsum(mask, axis=-1) - 1
    positions[mask == 0] = 1
    return positions[:, -new_tokens:].astype(np.int64)


EXPORT_AGAIN = "export it again with `finetune export --format onnx`"
# The manifest entries generation relies on, and the JSON type each must have.
MANIFEST_FIELDS = {"file": str, "dtype": str, "inputs": list, "eos_token_id": int, "pad_token_id": int}
# The manifest's "kv_cache": how the graph takes its past. "concat" (the default, and every export made
# before the field): past in, a longer present out. "shared": ONNX Runtime's GroupQueryAttention, the
# present written into the past's own buffer (onnx_kv_cache.py). Per kind, the inputs between input_ids
# and the past: name, dtype, shape, what to feed.
CONTROL_INPUTS = {
    "concat": [
        (
            "attention_mask",
            "int64",
            ["batch", "past_sequence + sequence"],
            "1 for real tokens, 0 for left padding; covers past and new tokens",
        ),
        (
            "position_ids",
            "int64",
            ["batch", "sequence"],
            "cumsum(attention_mask) - 1, with padded positions set to 1 (as transformers does)",
        ),
    ],
    "shared": [
        ("position_ids", "int64", ["batch", "sequence"], "each row's filled length plus 0, 1, ... (right padded)"),
        ("seqlens_k", "int32", ["batch"], "each row's filled length after this call, minus 1"),
        ("total_sequence_length", "int32", [], "the longest filled length before this call plus sequence"),
        ("logits_positions", "int64", ["batch", "outputs"], "per row, the positions whose logits to compute"),
    ],
}


def read_manifest(path: Path) -> dict:
    """The export's manifest, with every entry generation relies on present and of the right type."""
    manifest = read_json(path, "ONNX manifest", EXPORT_AGAIN, required=tuple(MANIFEST_FIELDS))
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise FinetuneError(
                f"ONNX manifest {path}: '{key}' should be a {kind.__name__}, not {manifest[key]!r}; {EXPORT_AGAIN}"
            )
    for key in ("bos_token_id", "max_positions"):
        value = manifest.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise FinetuneError(
                f"ONNX manifest {path}: '{key}' should be a non-negative integer, not {value!r}; {EXPORT_AGAIN}"
            )
    if manifest.get("max_positions") == 0:
        raise FinetuneError(f"ONNX manifest {path}: 'max_positions' should be at least 1, not 0; {EXPORT_AGAIN}")
    kv_cache = manifest.setdefault("kv_cache", "concat")
    if not isinstance(kv_cache, str) or kv_cache not in CONTROL_INPUTS:
        raise FinetuneError(
            f"ONNX manifest {path}: 'kv_cache' should be one of {', '.join(CONTROL_INPUTS)}, not {kv_cache!r}; "
            f"{EXPORT_AGAIN} (or upgrade finetune)"
        )
    control = first_past_input(kv_cache)
    inputs = manifest["inputs"]
    outputs = manifest.get("outputs")
    well_formed = (
        len(inputs) > control
        and all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in inputs)
        and all(
            isinstance(s.get("shape"), list)
            and len(s["shape"]) == 4
            and all(isinstance(d, int) for d in s["shape"][1::2])
            for s in inputs[control:]
        )
    )
    if not well_formed:
        raise FinetuneError(
            f"ONNX manifest {path}: 'inputs' is not a list of named inputs with past key/value shapes; {EXPORT_AGAIN}"
        )
    if kv_cache == "shared":
        # Each present output is bound to its past input's memory: the pairs must match name for name.
        presents = [present_name(s["name"]) for s in inputs[control:]]
        named = isinstance(outputs, list) and all(isinstance(s, dict) for s in outputs)
        if not named or [s.get("name") for s in outputs[1:]] != presents:
            raise FinetuneError(
                f"ONNX manifest {path}: 'outputs' should be logits then {', '.join(presents[:2])}, ... in the "
                f"order of the past inputs; {EXPORT_AGAIN}"
            )
    return manifest


def first_past_input(kv_cache: str) -> int:
    """The index of the first past input: input_ids and the control inputs of this kind of KV cache come first."""
    return 1 + len(CONTROL_INPUTS[kv_cache])


def present_name(past_name: str) -> str:
    """optimum's naming: past_key_values.N.key is fed back from present.N.key."""
    return past_name.replace("past_key_values.", "present.", 1)


class OnnxCausalLM:
    """An exported decoder with its tokenizer and manifest, ready to run."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not directory.exists():
            raise FinetuneError(f"ONNX export directory {directory} does not exist; check the path")
        if not manifest_path.is_file():
            raise FinetuneError(
                f"{directory} is not a finetune ONNX export (no {MANIFEST}); "
                f"create one with `finetune export --format onnx`"
            )
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError:
            raise FinetuneError(
                f"ONNX generation needs onnxruntime and tokenizers; install them with: {install_hint('onnx')}"
            ) from None
        self.manifest = read_manifest(manifest_path)
        model_file = directory / self.manifest["file"]
        if not model_file.is_file():
            raise FinetuneError(f"ONNX model file {model_file} is missing; {EXPORT_AGAIN}")
        tokenizer_file = directory / "tokenizer.json"
        read_json(tokenizer_file, "tokenizer file", EXPORT_AGAIN, required=("model",))
        with reading(tokenizer_file, "tokenizer file", EXPORT_AGAIN):
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        if self.tokenizer.get_vocab_size() == 0:
            raise FinetuneError(f"tokenizer file {tokenizer_file} has no tokens; {EXPORT_AGAIN}")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        # onnxruntime raises its own exception types for a bad file
        with reading(model_file, "ONNX model", EXPORT_AGAIN):
            self.session = ort.InferenceSession(str(model_file), providers=providers)
        self.model_file = model_file
        self.float_type = np.float16 if self.manifest["dtype"] == "fp16" else np.float32
        control = first_past_input(self.manifest["kv_cache"])
        self.shared_kv = self.manifest["kv_cache"] == "shared"
        self.past_specs = self.manifest["inputs"][control:]
        self.input_names = [spec["name"] for spec in self.manifest["inputs"]]
        self.past_names = self.input_names[control:]
        self.present_names = [present_name(name) for name in self.past_names]
        self.eos_token_id = self.manifest["eos_token_id"]
        self.pad_token_id = self.manifest["pad_token_id"]
        self.bos_token_id = self.manifest.get("bos_token_id")
        self.max_positions = self.manifest.get("max_positions")

    def empty_past(self, batch: int) -> list[np.ndarray] | SharedKV:
        shapes = [(spec["shape"][1], spec["shape"][3]) for spec in self.past_specs]
        if self.shared_kv:
            return SharedKV.empty(shapes, batch, self.float_type)
        return [np.zeros((batch, heads, 0, dim), dtype=self.float_type) for heads, dim in shapes]

    def forward(
        self, input_ids, attention_mask, position_ids, past, last_only: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | SharedKV]:
        """Logits (rows, n, vocab) of n new tokens per row (with last_only, only the last: (rows, 1, vocab)),
        and the past grown by them.

        input_ids are left padded (a row's real tokens end at the last column) and attention_mask covers the
        past and the new tokens; position_ids are position_ids_for(attention_mask, n). A SharedKV past is
        grown in place and returned (use it once)."""
        try:
            if self.shared_kv:
                logits, present = self._forward_shared(input_ids, attention_mask, past, last_only)
            else:
                feed = dict(zip(self.input_names, (input_ids, attention_mask, position_ids, *past)))
                logits, *present = self.session.run(None, feed)
                logits = logits[:, -1:] if last_only else logits
        except Exception as exc:  # the manifest's names, types or shapes do not fit the graph
            raise FinetuneError(
                f"ONNX model {self.model_file} does not accept the inputs its manifest {MANIFEST} "
                f"describes ({short(exc)}); {EXPORT_AGAIN}"
            ) from None
        if not np.isfinite(logits[:, -1]).all():
            raise FinetuneError(
                f"ONNX model {self.model_file} computes NaN/inf (its weights hold NaN/inf: training "
                f"diverged); export an earlier checkpoint"
            )
        return logits, present

    def _forward_shared(
        self, input_ids, attention_mask, past: SharedKV, last_only: bool
    ) -> tuple[np.ndarray, SharedKV]:
        import onnxruntime as ort

        feed = SharedFeed.of(input_ids, attention_mask, past, self.max_positions)
        past.reserve(len(input_ids), int(feed.total_sequence_length), self.max_positions)
        binding = self.session.io_binding()
        binding.bind_output("logits")
        picks = feed.last_positions() if last_only else feed.all_positions()
        binding.bind_cpu_input("logits_positions", picks)
        for name in ("input_ids", "position_ids", "seqlens_k", "total_sequence_length"):
            binding.bind_cpu_input(name, getattr(feed, name))
        for past_input, present_output, view in zip(self.past_names, self.present_names, past.views()):
            value = ort.OrtValue.ortvalue_from_numpy(view)  # the same memory in and out: written in place
            binding.bind_ortvalue_input(past_input, value)
            binding.bind_ortvalue_output(present_output, value)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        past.lengths = feed.seqlens_k.astype(np.int64) + 1
        return (logits if last_only else feed.left_padded(logits)), past

    def greedy(self, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int) -> np.ndarray:
        """`steps` argmax tokens per row, ignoring EOS (used to verify exports)."""
        return self.decode_steps(input_ids, attention_mask, steps, lambda scores, _history: scores.argmax(-1))

    def decode_steps(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        steps: int,
        pick: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """`steps` new tokens per row, ignoring EOS; pick(last-position logits, ids so far) chooses each."""
        logits, past = self.forward(
            input_ids,
            attention_mask,
            position_ids_for(attention_mask, input_ids.shape[1]),
            self.empty_past(len(input_ids)),
            last_only=True,
        )
        mask, history = attention_mask, input_ids
        for _ in range(steps):
            next_ids = pick(logits[:, -1], history).astype(np.int64)[:, None]
            history = np.concatenate([history, next_ids], axis=1)
            mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
            logits, past = self.forward(next_ids, mask, position_ids_for(mask, 1), past)
        return history[:, input_ids.shape[1] :]

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids if prompt else []
        start = self.bos_token_id if self.bos_token_id is not None else self.eos_token_id
        return ids or [start]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


# Top-p without top-k looks at this many best tokens first; the full vocabulary is sorted only when
# they hold less than top_p of the probability mass.
NUCLEUS_CANDIDATES = 256


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sampling_distribution(scores: np.ndarray, cfg: GenerateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Token ids that survive top-k then top-p (transformers' rules) and their probabilities, for one row
    of temperature-scaled scores.

    Works on the few candidates instead of the whole vocabulary: sorting 50k scores per token cost
    6.8 ms on a 2-core CPU, more than half an int8 GPT-2 decode step.
    """
    candidates, probs, outside_mass = None, None, 0.0  # probs: of the candidates, under the full distribution
    if 0 < cfg.top_k < scores.size:
        kth = np.partition(scores, -cfg.top_k)[-cfg.top_k]
        candidates = np.flatnonzero(scores >= kth)  # ties with the k-th are kept, as transformers does
    elif cfg.top_p < 1.0 and scores.size > NUCLEUS_CANDIDATES:
        probs = _softmax(scores)
        best = np.argpartition(scores, -NUCLEUS_CANDIDATES)[-NUCLEUS_CANDIDATES:]
        mass = float(probs[best].sum())
        if mass >= cfg.top_p:  # the rest falls inside the 1 - top_p tail, which top-p removes anyway
            candidates, probs, outside_mass = best, probs[best], 1.0 - mass
    if candidates is None:
        candidates = np.arange(scores.size)
    if probs is None:
        probs = _softmax(scores[candidates])  # top-k masks the rest to probability 0
    if cfg.top_p < 1.0:
        order = np.argsort(probs)  # ascending, as transformers' TopPLogitsWarper
        remove = outside_mass + np.cumsum(probs[order]) <= 1 - cfg.top_p
        remove[-1] = False  # always keep the most likely token
        kept = np.sort(order[~remove])
        candidates, probs = candidates[kept], probs[kept]
    return candidates, probs / probs.sum()


def next_tokens(scores: np.ndarray, history: np.ndarray, cfg: GenerateConfig, rng: np.random.Generator) -> np.ndarray:
    """One token per row from last-position logits, with transformers' processor semantics
    (repetition penalty, temperature, top-k, top-p, in that order)."""
    if cfg.temperature == 0 and cfg.repetition_penalty == 1.0:
        return scores.argmax(-1)  # the same index in float32 as in float64, without copying the vocabulary
    scores = scores.astype(np.float64)
    if cfg.repetition_penalty != 1.0:
        rows = np.arange(len(scores))[:, None]
        seen = scores[rows, history]
        scores[rows, history] = np.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
    if cfg.temperature == 0:
        return scores.argmax(-1)
    chosen = []
    for row in scores / cfg.temperature:
        ids, probs = sampling_distribution(row, cfg)
        chosen.append(ids[rng.choice(len(ids), p=probs)])
    return np.array(chosen)


def generate_texts_onnx(
    lm: OnnxCausalLM, cfg: GenerateConfig, write: Optional[Callable[[str], None]] = None
) -> list[str]:
    """Same contract as generation.generate_texts, on ONNX Runtime."""
    import sys

    jobs = [prompt for prompt in cfg.prompts for _ in range(cfg.n)]
    stream = cfg.stream if cfg.stream is not None else len(jobs) == 1
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    rng = np.random.default_rng(cfg.seed)
    texts: list[str] = []
    for start in range(0, len(jobs), cfg.batch_size):
        prompts = jobs[start : start + cfg.batch_size]
        encoded = [lm.encode(p) for p in prompts]
        width = max(len(e) for e in encoded)
        if lm.max_positions and width + cfg.max_new_tokens > lm.max_positions:
            raise FinetuneError(
                f"prompt ({width} tokens) + --max-new-tokens ({cfg.max_new_tokens}) exceeds the model's context of "
                f"{lm.max_positions} tokens; shorten the prompt or lower --max-new-tokens"
            )
        ids = np.array([[lm.pad_token_id] * (width - len(e)) + e for e in encoded], dtype=np.int64)
        mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], dtype=np.int64)
        streamer = None
        if stream:
            if cfg.include_prompt:
                write(prompts[0])
            streamer = StopAwareStreamer(lm.tokenizer, cfg.stop, write)
            streamer.put(ids[0])
        logits, past = lm.forward(ids, mask, position_ids_for(mask, width), lm.empty_past(len(ids)), last_only=True)
        history, new = ids, [[] for _ in prompts]
        finished = np.zeros(len(prompts), dtype=bool)
        for _ in range(cfg.max_new_tokens):
            chosen = next_tokens(logits[:, -1], history, cfg, rng)
            chosen = np.where(finished, lm.pad_token_id, chosen).astype(np.int64)
            for row, token in enumerate(chosen):
                if not finished[row]:
                    if token == lm.eos_token_id:
                        finished[row] = True
                        continue
                    new[row].append(int(token))
                    if streamer is not None and row == 0:
                        streamer.put(np.array([token]))
                    if cfg.stop and any(s in lm.decode(new[row]) for s in cfg.stop):
                        finished[row] = True
            if finished.all():
                break
            history = np.concatenate([history, chosen[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
            logits, past = lm.forward(chosen[:, None], mask, position_ids_for(mask, 1), past)
        if streamer is not None:
            streamer.end()
            write("\n")
        for prompt, tokens in zip(prompts, new):
            text = cut_at_stop(lm.decode(tokens), cfg.stop)
            texts.append(prompt + text if cfg.include_prompt else text)
    return texts
