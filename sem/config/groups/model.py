"""The model group: sem's models' schemas, and the checks of any model node (sem's by their own
settings checks, any other ``_target_`` by its signature and a probe)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from sem.config.components import locate, model_contract_problems, signature_problems
from sem.contracts import VOCAB_SIZE
from sem.training.budget import resolve_budget


@dataclass
class SEMModelConf:
    _target_: str = "sem.models.sem.SEMModel"
    vocab_size: int = 259
    d_model: int = 128
    n_layers: int = 4
    max_seq_len: int = 2048
    mlp_ratio: float = 2.0
    readout: str = "born"  # born | linear
    unitary_lambda: float = 0.01
    # Alpha ramps 0 -> 1 over this many steps: give steps, or a fraction of max_steps (steps win).
    propagator_warmup_steps: int | None = None
    propagator_warmup_fraction: float | None = 0.2
    max_steps: int | None = "${trainer.max_steps}"  # type: ignore[assignment]  # the budget fractions scale with
    recurrence: str = "fft"  # fft | scan
    gradient_checkpointing: bool = False
    born_eps: float = 1e-6
    # b > 0: the Born readout's p_k ~ |z_k|^(2b) (logits b log(|z_k|^2 + born_eps)): the Born rule of
    # b copies of the state measured together, kept where they agree; 1: the Born rule itself.
    born_power: float = 1.0
    # c != 0: a learned complex amplitude per token, c at init, added to the Born readout's amplitudes
    # before the measurement (z_k = w_k . U psi + beta_k: a reference amplitude, as homodyne detection's
    # local oscillator); 0: none, the Born rule of the state itself.
    born_offset: float = 0.0
    dropout: float = 0.0
    # k > 0: a causal depthwise convolution of k taps + SiLU on each block's recurrence input (after
    # in_proj; H3/Mamba's short conv, 3-4 is usual); decoding carries each block's last k-1 inputs.
    conv_width: int = 0  # 0: off
    # Initial |lambda| per block, spread so that the timescales 1/(1-|lambda|) are log-uniform between
    # the two moduli, and phases uniform in [0, max_phase]: today's defaults are timescales 1..1000 and
    # phases [0, pi]; LRU's ring is r_min=0.9 r_max=0.999 max_phase=0.314 (pi/10).
    r_min: float = 0.36787944117144233  # exp(-1): timescale 1 token
    r_max: float = 0.9990004998333750  # exp(-1/1000): timescale 1000 tokens
    max_phase: float = 3.141592653589793
    # true: input-dependent decay and input gate per channel (Griffin's RG-LRU on the complex lambda:
    # |a_t| = |lambda|^(8 r_t), phase theta, h_t = a_t h_{t-1} + sqrt(1 - |a_t|^2) i_t v_t, r and i sigmoids of v_t);
    # a chunked cumulative-sum scan instead of model.recurrence. Off by default: it lost at equal wall time.
    selective: bool = False
    # N > 1: several timescales per channel, N complex modes read out by learned complex weights (S4D's
    # state size; the FFT path folds them into one kernel, so training costs about what N = 1 does);
    # decoding carries [B, D, N] per block. Not with selective.
    modes: int = 1
    # H > 0: each block's state is a [K, K] complex matrix per head (K = d_model / H), written by keys and
    # read by queries computed from the recurrence input (retention: RetNet's, as SEM's complex
    # recurrence with one modulus per head and one phase per key channel); 0: the diagonal state.
    # Not with selective or modes.
    heads: int = 0
    # k > 0: causal softmax attention over the last attention_window positions (its own residual
    # sub-layer, no positional encoding: the recurrence orders the tokens) before every k-th block,
    # Griffin's recurrence + local attention; its state is the last window - 1 keys and values. 0: none.
    attention_every: int = 0
    attention_window: int = 128
    # true: the attention's queries and keys turned by their position (RoPE: one phase per complex
    # channel, a ladder of frequencies per head), so its scores see the distance; false: no positional
    # encoding (the recurrence before it orders the tokens).
    attention_rope: bool = False


@dataclass
class TransformerConf:
    _target_: str = "sem.models.transformer.TransformerLM"
    vocab_size: int = 259
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 2048
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    gradient_checkpointing: bool = False


OWN_MODELS = ("sem.models.sem.SEMModel", "sem.models.sem.model.SEMModel", "sem.models.transformer.TransformerLM")


def model_problems(m: DictConfig, max_steps: int) -> tuple[list[str], int | None]:
    """(problems, the model's max_seq_len or None). sem's models by their own settings checks (the
    ones their constructors run); any other ``_target_`` by its signature and a 2 x 8 probe of the built
    model (``sem.config.components``)."""
    target = m.get("_target_")
    node = OmegaConf.to_container(m, resolve=True)
    if target not in OWN_MODELS:
        cls, err = locate("model", target)
        if err:
            return [err], None
        # as the run builds it: lengths given as fractions of max_steps resolved first (sem.training.budget)
        node = resolve_budget({"model": node, "trainer": {"max_steps": max_steps}})[0]["model"]
        problems = signature_problems("model", cls, node, injected=("vocab_size",))
        if isinstance(m.get("vocab_size"), int) and m.vocab_size < VOCAB_SIZE:
            problems.append(f"model.vocab_size={m.vocab_size}: the byte tokenizer needs at least {VOCAB_SIZE} "
                            "(256 bytes + BOS/EOS/PAD)")
        if problems:
            return problems, None
        return model_contract_problems("model", cls, node)
    args = {k: v for k, v in node.items() if not k.startswith("_")}
    if target.endswith("SEMModel"):
        from sem.models.sem.settings import settings_problems

        return settings_problems("model.", **args), m.max_seq_len
    from sem.models.transformer import settings_problems as transformer_problems

    return transformer_problems("model.", **args), m.max_seq_len
