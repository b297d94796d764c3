"""Sample text from a trained model: ``generate`` (a pure function of the model, the prompt and a
seed) and ``write_samples`` (a run's ``samples.txt``); the ``sem-sample`` entry is ``sem.tools.sample``::

    python -m sem.sample ckpt=outputs/base/checkpoints/last.ckpt prompt='def fib(n):' \
        max_new_tokens=300 temperature=0.8 top_k=50 top_p=null seed=0 n=3

How the next token is computed:

- a model with ``prefill``/``step`` (SEMModel) decodes recurrently: the prompt in one parallel pass,
  then O(1) time and memory per new token, whatever the context length (no max_seq_len limit);
- any other model (the Transformer baseline, which has no KV cache) is run in full over the last
  ``max_seq_len`` tokens for every new token. A longer context is truncated from the left (one notice
  per call): the model only ever sees the last ``max_seq_len`` tokens, so text older than that is
  forgotten, exactly as it would be for a model trained at that length.

A generation is ``BOS prompt`` followed by sampled tokens, and ends at EOS or after
``max_new_tokens`` tokens. Only byte tokens and EOS are ever drawn (BOS and PAD are masked out), so the
result is bytes; text that is not valid UTF-8 is shown with replacement characters, never an error.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from sem.contracts import model_output
from sem.data.tokenizer import ByteTokenizer

log = logging.getLogger("sem.sample")

_TOKENIZER = ByteTokenizer()


def sampling_problems(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                      n: int = 1) -> list[str]:
    """Every problem with the sampling settings, one line each naming key and value."""
    problems = []
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        problems.append(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != temperature:
        problems.append(f"temperature={temperature!r}: must be a number (<= 0 means greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        problems.append(f"top_k={top_k!r}: must be a positive integer, or null for no top-k filter")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        problems.append(f"top_p={top_p!r}: must be in (0, 1], or null for no nucleus filter")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        problems.append(f"n={n!r}: must be an integer >= 0")
    return problems


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator) -> int:
    """The next token id from logits [V]: only bytes and EOS are drawn (BOS and PAD are masked out)."""
    logits = logits.float().clone()
    logits[[i for i in (_TOKENIZER.bos_id, _TOKENIZER.pad_id) if i < logits.numel()]] = float("-inf")
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first is kept)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def compiles_decoding(model: nn.Module) -> bool:
    """Whether ``model`` can decode through a compiled step: ``decode_state(batch_size, compile=True)``
    (SEMModel), whose state ``prefill`` and ``step`` carry on."""
    make = getattr(model, "decode_state", None)
    try:
        return callable(make) and "compile" in inspect.signature(make).parameters
    except (TypeError, ValueError):
        return False


def generate(model: nn.Module, prompt: bytes, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             on_token: Callable[[int], None] | None = None, compile: bool = False) -> bytes:
    """The bytes generated after ``prompt`` (the prompt itself not included).

    Deterministic for a given (model, device, prompt, settings, seed): draws come from a local
    ``torch.Generator`` seeded with ``seed``, never from the global RNG. ``temperature <= 0`` is greedy
    (argmax; top_k and top_p then change nothing). ``on_token(byte)`` is called with each new byte as
    it is generated (for streaming). ``compile``: step through a compiled graph where the model offers
    one (``compiles_decoding``; seconds of compile, then fewer per token: for long generations); a model
    without one decodes as it always does. Raises ValueError for a bad setting.
    """
    if isinstance(prompt, str):
        raise TypeError("generate: prompt must be bytes (encode text with .encode('utf-8'))")
    problems = sampling_problems(max_new_tokens, temperature, top_k, top_p)
    if problems:
        raise ValueError("; ".join(problems))
    param = next(model.parameters())
    device = param.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    ids = [_TOKENIZER.bos_id, *bytes(prompt)]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if hasattr(model, "step") and hasattr(model, "prefill"):
                state = model.decode_state(1, compile=True) if compile and compiles_decoding(model) else None
                return _recurrent(model, ids, max_new_tokens, temperature, top_k, top_p, generator, device,
                                  on_token, state)
            return _recompute(model, ids, max_new_tokens, temperature, top_k, top_p, generator, device,
                              on_token)
    finally:
        model.train(was_training)


def _recurrent(model: nn.Module, ids: list[int], max_new_tokens: int, temperature: float,
               top_k: int | None, top_p: float | None, generator: torch.Generator, device: torch.device,
               on_token: Callable[[int], None] | None, state: object = None) -> bytes:
    prompt = torch.tensor([ids], device=device)
    logits, state = model.prefill(prompt) if state is None else model.prefill(prompt, state)  # [1, V]
    out = bytearray()
    while len(out) < max_new_tokens:
        token = _pick(logits[0], temperature, top_k, top_p, generator)
        if token == _TOKENIZER.eos_id:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        if len(out) < max_new_tokens:  # the last token's successor is never needed
            logits, state = model.step(torch.tensor([token], device=device), state)
    return bytes(out)


def _recompute(model: nn.Module, ids: list[int], max_new_tokens: int, temperature: float,
               top_k: int | None, top_p: float | None, generator: torch.Generator, device: torch.device,
               on_token: Callable[[int], None] | None) -> bytes:
    window = int(getattr(model, "max_seq_len", 0)) or None
    if window is not None and len(ids) > window:
        log.warning("the prompt is %d tokens (with BOS), longer than the model's max_seq_len=%d: it is "
                    "truncated from the left (the model sees its last %d tokens)", len(ids), window, window)
    noticed = window is not None and len(ids) > window
    context = torch.tensor(ids, device=device)
    out = bytearray()
    while len(out) < max_new_tokens:
        if window is not None and context.numel() > window:
            if not noticed:
                log.info("context reached max_seq_len=%d: from here on each token sees only the last %d "
                         "(full recompute over a sliding window)", window, window)
                noticed = True
            context = context[-window:]
        logits = model_output(model, context[None]).logits[0, -1]  # [V]
        token = _pick(logits, temperature, top_k, top_p, generator)
        if token == _TOKENIZER.eos_id:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        context = torch.cat([context, context.new_tensor([token])])
    return bytes(out)


def show(data: bytes) -> str:
    """Bytes as text for a console or a file: invalid UTF-8 becomes U+FFFD, never an error."""
    return data.decode("utf-8", errors="replace")


def write_samples(model: nn.Module, path: str | Path, prompts: Sequence[str | bytes] = ("",), n: int = 3,
                  max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
                  top_p: float | None = None, seed: int = 0) -> Path | None:
    """Write ``n`` samples per prompt to ``path`` (a run's ``samples.txt``); ``n=0`` writes nothing and
    returns None. Sample i of a prompt uses seed ``seed + i``. An empty prompt starts a new document."""
    problems = sampling_problems(max_new_tokens, temperature, top_k, top_p, n)
    if problems:
        raise ValueError("; ".join(problems))
    if n == 0:
        return None
    path = Path(path)
    blocks = []
    for prompt in prompts:
        raw = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        for i in range(n):
            text = generate(model, raw, max_new_tokens, temperature, top_k, top_p, seed + i)
            settings = f"seed {seed + i}, temperature {temperature}, top_k {top_k}, top_p {top_p}"
            blocks.append(f"=== prompt {show(raw)!r}, sample {i + 1}/{n} ({settings}) ===\n"
                          f"{show(raw + text)}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(blocks), encoding="utf-8")
    tmp.replace(path)
    return path
