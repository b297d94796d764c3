"""The SEM's constructor arguments: their checks, once.

``settings_problems`` is called by ``SEMModel.__init__`` (which raises with every line) and by the
config's validation (``sem.config.groups.model``, with the prefix ``model.``), so a bad value is
refused with the same line whether it comes from the shell or from Python.
"""

from __future__ import annotations

import math
from typing import Any

from sem.lengths import length_problems, unplaced
from sem.models.common import size_problems

MAX_MODES = 256  # beyond, the [D, N, T] kernel outgrows any use


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def settings_problems(prefix: str = "", **s: Any) -> list[str]:
    """Every problem with the SEM's arguments ``s`` (the constructor's names), one line each naming
    ``<prefix><key>`` and the value. Keys left out are not checked (the constructor passes all)."""
    p: list[str] = []

    def say(key: str, text: str) -> None:
        p.append(f"{prefix}{key}={s.get(key)!r}: {text}")

    p += size_problems(prefix, s, ("vocab_size", "d_model", "n_layers", "max_seq_len"), default_ratio=2.0)
    width = s.get("d_model")
    if "unitary_lambda" in s and not (_is_number(s["unitary_lambda"]) and s["unitary_lambda"] >= 0):
        say("unitary_lambda", "must be >= 0")
    readout = s.get("readout", "born")
    if readout not in ("born", "linear"):
        say("readout", "must be 'born' or 'linear'")
    if "recurrence" in s and s["recurrence"] not in ("fft", "scan"):
        say("recurrence", "must be 'fft' or 'scan'")
    if "born_eps" in s and not (_is_number(s["born_eps"]) and s["born_eps"] > 0):
        say("born_eps", "must be > 0")
    power = s.get("born_power", 1.0)
    if not (_is_number(power) and power > 0):
        say("born_power", "must be > 0")
    elif readout == "linear" and power != 1:
        say("born_power", f"with {prefix}readout=linear: the power is the Born readout's (p ~ |z|^(2 born_power)); "
                          f"use {prefix}readout=born or born_power=1")
    offset = s.get("born_offset", 0.0)
    if not _is_number(offset):
        say("born_offset", "must be a finite number (the readout's reference amplitude; 0: none)")
    elif offset != 0 and readout == "linear":
        say("born_offset", f"with {prefix}readout=linear: the offset is the Born readout's (z = W U psi + offset); "
                           f"use {prefix}readout=born or born_offset=0")
    if "dropout" in s and not (_is_number(s["dropout"]) and 0.0 <= s["dropout"] < 1.0):
        say("dropout", "must be in [0, 1)")
    conv, max_len = s.get("conv_width", 0), s.get("max_seq_len")
    if not (_is_int(conv) and 0 <= conv <= (max_len if _is_int(max_len) else conv)):
        say("conv_width", f"must be an integer in [0, {prefix}max_seq_len={max_len}] (taps of the causal "
                          "convolution; 0: none)")
    r_min, r_max = s.get("r_min"), s.get("r_max")
    if "r_min" in s and not (_is_number(r_min) and 0.0 < r_min < 1.0):
        say("r_min", "must be in (0, 1) (the fastest initial modulus |lambda|)")
    elif "r_max" in s and not (_is_number(r_max) and r_min <= r_max < 1.0):
        say("r_max", f"must be in [{prefix}r_min={r_min!r}, 1) (the slowest initial modulus |lambda|)")
    if "max_phase" in s and not (_is_number(s["max_phase"]) and 0.0 <= s["max_phase"] <= 2 * math.pi):
        say("max_phase", "must be in [0, 2 pi] (the initial phases' range)")
    selective = s.get("selective", False)
    if not isinstance(selective, bool):
        say("selective", "must be true or false")
    modes = s.get("modes", 1)
    if not (_is_int(modes) and 1 <= modes <= MAX_MODES):
        say("modes", f"must be an integer in [1, {MAX_MODES}] (timescales per channel)")
    elif modes > 1 and selective:
        say("modes", f"with {prefix}selective=true: the input-dependent recurrence has one mode per channel; "
                     "use one of them")
    heads = s.get("heads", 0)
    if not (_is_int(heads) and heads >= 0):
        say("heads", "must be an integer >= 0 (0: the diagonal state)")
    elif heads and _is_int(width) and width > 0 and width % heads:
        say("heads", f"must divide {prefix}d_model={width} (each head holds d_model / heads channels)")
    elif heads and (selective or (_is_int(modes) and modes > 1)):
        say("heads", f"with {prefix}selective={selective} {prefix}modes={modes}: the matrix state is neither; "
                     "use one of them")
    every, layers = s.get("attention_every", 0), s.get("n_layers")
    if not (_is_int(every) and 0 <= every <= (layers if _is_int(layers) else every)):
        say("attention_every", f"must be an integer in [0, {prefix}n_layers={layers}] (local attention before "
                               "every k-th block; 0: none)")
    if not (_is_int(s.get("attention_window", 128)) and s.get("attention_window", 128) >= 1):
        say("attention_window", "must be an integer >= 1 (positions a query sees, itself included)")
    if not isinstance(s.get("attention_rope", False), bool):
        say("attention_rope", "must be true or false")
    p += warmup_problems(prefix, s.get("propagator_warmup_steps"), s.get("propagator_warmup_fraction"),
                         s.get("max_steps"))
    return p


def warmup_problems(prefix: str, steps: Any, fraction: Any, max_steps: Any) -> list[str]:
    """The propagator warm-up: steps, or a fraction of ``max_steps`` (the run's trainer.max_steps)."""
    missing = unplaced(f"{prefix}propagator_warmup_fraction", fraction, f"{prefix}propagator_warmup_steps", steps,
                       max_steps, f"{prefix}max_steps")
    if missing:
        return missing
    if max_steps is not None and not (_is_int(max_steps) and max_steps > 0):
        return [f"{prefix}max_steps={max_steps!r}: must be an integer > 0 (the training budget)"]
    # a ramp: steps past the end of the run simply stop where it ends (a decay branch shorter than its parent)
    return length_problems(f"{prefix}propagator_warmup_steps", steps, f"{prefix}propagator_warmup_fraction",
                           fraction, max_steps if max_steps is not None else 0, may_overrun=True)
