"""``sem-sample`` / ``python -m sem.sample``: sample from a checkpoint on the command line, streamed to
stdout (the generation itself is ``sem.models.generate``)::

    python -m sem.sample ckpt=outputs/base/checkpoints/last.ckpt prompt='def fib(n):' \
        max_new_tokens=300 temperature=0.8 top_k=50 top_p=null seed=0 n=3

``compile`` (auto, true, false): decode through a compiled step (``SEMModel.decode_state(compile=True)``);
auto compiles where the tokens to generate pay its cold compile back (``decode_compile_choice``).
"""

from __future__ import annotations

import codecs
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from sem.config.hardware import compile_missing, compile_setting_problems
from sem.models.generate import compiles_decoding, generate, sampling_problems
from sem.tools.entries import CONF_DIR, device_of, load_checkpoint, start, usage_error
from sem.tools.entries import cli as _cli

log = logging.getLogger("sem.sample")

# ---------------------------------------------------------------------------------------- entry

# sem_small on one CPU thread (python -m bench.decode --threads 1, 2-core AMD EPYC, 2026-12-08): the compiled
# step 0.54-0.62 ms a token against 0.94-1.10 eager; its first two calls (a prefill's state, then its own
# layout) compile in 15.9 s with an empty inductor cache, ~2.4 s with the cache an earlier one left. ~0.4 ms
# saved a token pays a cold compile back from ~40,000 tokens (a cached one from ~6,000): auto counts on cold,
# with a margin for a CPU where eager is relatively faster.
DECODE_COMPILE_MIN_TOKENS = 50_000


def decode_compile_choice(setting: Any, tokens: int, model: Any, device_type: str) -> tuple[bool, str]:
    """Whether ``sem.sample`` decodes through a compiled step, and why: ``compile``=``setting`` (validated),
    ``tokens`` to generate in all (n x max_new_tokens)."""
    if not compiles_decoding(model):
        return False, f"{type(model).__name__} has no compiled decoding (decode_state(..., compile=True))"
    if setting is False:
        return False, "compile=false"
    missing = compile_missing(device_type)
    if missing:
        return False, f"torch.compile's inductor needs {missing} on {device_type}"
    if setting is True:
        return True, "compile=true"
    if tokens < DECODE_COMPILE_MIN_TOKENS:
        return False, f"compile=auto: eager ({tokens:,} tokens < {DECODE_COMPILE_MIN_TOKENS:,}: too few to pay a compile back)"
    return True, f"compile=auto: compiled ({tokens:,} tokens >= {DECODE_COMPILE_MIN_TOKENS:,})"


@dataclass
class SampleConf:
    ckpt: str = MISSING  # a checkpoint file or a directory written by sem-export
    prompt: str = ""  # the text to continue ("" starts a new document)
    max_new_tokens: int = 300
    temperature: float = 0.8  # <= 0: greedy
    top_k: int | None = 50  # null: no top-k filter
    top_p: float | None = None  # null: no nucleus filter
    seed: int = 0  # sample i uses seed + i
    n: int = 1
    device: str = "auto"  # auto | cpu | cuda
    compile: Any = "auto"  # true | false | auto: a compiled decoding step where the generation pays it back


ConfigStore.instance().store(name="sample_schema", node=SampleConf)


class _Stream:
    """Writes bytes to stdout as text as they arrive: a multi-byte UTF-8 character appears once it is
    complete, invalid sequences as U+FFFD."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> None:
        self.write(bytes([token]))

    def write(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final=final)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()


def _prompt_bytes(prompt: str) -> bytes:
    # Bytes that are not UTF-8 on the command line reach Python as lone surrogates (surrogateescape):
    # turn them back into the very bytes the user typed.
    return str(prompt).encode("utf-8", errors="surrogateescape")


@hydra.main(config_path=CONF_DIR, config_name="sample", version_base="1.3")
def app(cfg: DictConfig) -> None:
    start(cfg)
    problems = sampling_problems(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.n)
    problems += compile_setting_problems(cfg.compile)
    if problems:
        usage_error(*problems)
    device = device_of(cfg.device)
    model, _ = load_checkpoint(cfg.ckpt, device)
    log.info("loaded %s: %s, %s parameters, on %s", cfg.ckpt, type(model).__name__,
             f"{sum(p.numel() for p in model.parameters()):,}", device)
    if cfg.temperature <= 0:
        log.info("temperature=%s <= 0: greedy decoding (the most likely byte each time; top_k, top_p and "
                 "seed change nothing%s)", cfg.temperature, ", so every sample is the same" if cfg.n > 1 else "")
    compiled, why = decode_compile_choice(cfg.compile, cfg.n * cfg.max_new_tokens, model, device.type)
    log.info("decoding: %s (%s)", "a compiled step" if compiled else "eager", why)
    prompt = _prompt_bytes(cfg.prompt)
    for i in range(cfg.n):
        log.info("--- sample %d/%d (seed %d) ---", i + 1, cfg.n, cfg.seed + i)
        stream = _Stream()
        stream.write(prompt)
        generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed + i,
                 on_token=stream, compile=compiled)
        stream.write(b"", final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()


def hydra_quoted(value: str) -> str:
    """``value`` as a Hydra override value that parses back to exactly ``value`` (a single-quoted
    string: backslashes before a quote or at the end doubled, quotes escaped, ``${`` not interpolated)."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("${", "\\${") + "'"


def verbatim_prompt(argv: list[str]) -> list[str]:
    """``prompt=<text>`` is taken as typed: code such as ``prompt='def fib(n):'`` is not Hydra override
    grammar (parentheses, colons, commas), so an unquoted value is quoted for Hydra. A value already in
    quotes is left for Hydra to parse, as for any other key."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in ("prompt", "+prompt", "++prompt") and not (
                len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            arg = f"{key}={hydra_quoted(value)}"
        out.append(arg)
    return out


def cli() -> None:
    """``sem-sample``: see the module docstring."""
    sys.argv[1:] = verbatim_prompt(sys.argv[1:])
    _cli(app)


if __name__ == "__main__":
    cli()
