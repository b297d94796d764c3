"""Config schemas: one dataclass per group option.

Each YAML option in ``conf/<group>/`` starts its defaults list with the schema registered for it
(``sem.config.store``: ``<group>_schema`` or a named variant), so an unknown key or a value of the
wrong type fails when Hydra composes the config. ``sem.config.validate`` then runs the value and
cross-field checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf

from sem.models.dynamic import DynamicSettings

# ---------------------------------------------------------------------------------------- model


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
    # Alpha ramps 0 -> 1 over this many steps: give steps or a fraction of trainer.max_steps (one of them).
    propagator_warmup_steps: int | None = None
    propagator_warmup_fraction: float | None = 0.2
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
    # a chunked cumulative-sum scan instead of model.recurrence. Off: it lost at equal wall time (issue 25).
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
    unitary_lambda: float = 0.0


# ----------------------------------------------------------------------------------------- data


@dataclass
class StdlibCorpusConf:
    _target_: str = "sem.data.corpus.StdlibCorpus"
    root: str | None = None
    exclude_dirs: list[str] | None = None


@dataclass
class TextFilesCorpusConf:
    _target_: str = "sem.data.corpus.TextFilesCorpus"
    paths: list[str] = MISSING


@dataclass
class JsonlCorpusConf:
    _target_: str = "sem.data.corpus.JsonlCorpus"
    paths: list[str] = MISSING
    text_field: str = "text"


@dataclass
class DataConf:
    _target_: str = "sem.data.datamodule.SEMDataModule"
    corpus: Any = MISSING
    batch_size: int = 16  # x seq_len 128 = 2048 tokens per step: the measured CPU default (README)
    seq_len: int = 128
    val_seq_len: int | None = None
    val_fraction: float = 0.05  # documents held out for choosing: validation, checkpoint ranking, sweeps
    # documents held out for reporting (test_bpb, test_stream_bpb at the end of a run; never a choice),
    # taken from train by the same name hash; 0: no test split
    test_fraction: float = 0.05
    val_max_windows: int | None = 256
    final_val_max_windows: int | None = None  # null = every held-out window (the summary's val_bpb)
    val_batch_size: int | None = None
    cache_dir: str = "${oc.env:SEM_CACHE_DIR,'~/.cache/sem'}"
    seed: int = "${seed}"  # type: ignore[assignment]
    # Truncated BPTT: K >= 2 makes each batch row a lane of K consecutive windows, the model's recurrent
    # state carried from one to the next (gradients stop at the window); 0 (or 1): independent windows.
    tbptt: int = 0


def _corpus(conf: type) -> Any:
    """The corpus node of a data option as a plain dict of ``conf``'s fields: untyped, so an option
    of one's own can extend the option (``defaults: [stdlib, _self_]``) and swap in its own corpus
    class with other arguments. The constructor's signature checks them (``sem.config.components``)."""
    return field(default_factory=lambda: OmegaConf.to_container(OmegaConf.structured(conf)))


@dataclass
class StdlibDataConf(DataConf):
    corpus: Any = _corpus(StdlibCorpusConf)


@dataclass
class TextFilesDataConf(DataConf):
    corpus: Any = _corpus(TextFilesCorpusConf)


@dataclass
class JsonlDataConf(DataConf):
    corpus: Any = _corpus(JsonlCorpusConf)


# ---------------------------------------------------------------------- optimizer and scheduler


@dataclass
class AdamWConf:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # One kernel per step (on CPU ~20x faster than the per-tensor loop), and it can skip an update on
    # the device: health checks then need no host sync between logging steps (sem.training.step).
    fused: bool | None = True


@dataclass
class SGDConf:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    fused: bool | None = True  # as AdamW's


@dataclass
class MuonConf:
    """Muon on hidden matrices, AdamW on the rest (sem.training.optim.MuonAdamW)."""

    _target_: str = "sem.training.optim.MuonAdamW"
    _partial_: bool = True
    lr: float = 0.02  # Muon's, on the "matrix" group; scaled by sqrt(max(1, rows/cols)) per matrix
    adamw_lr: float = 3e-3  # every other group
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.1  # decoupled, both sides
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8
    ns_steps: int = 5
    ns_dtype: str = "auto"  # auto (bfloat16 on CUDA/XPU, float32 elsewhere) | float32 | bfloat16


@dataclass
class SchedulerConf:
    _target_: str = "sem.training.scheduler.WSDScheduler"
    _partial_: bool = True
    max_steps: int = "${trainer.max_steps}"  # type: ignore[assignment]
    warmup_steps: int | None = None
    warmup_fraction: float | None = None
    decay_steps: int | None = None
    decay_fraction: float | None = None
    decay_start_step: int | None = None
    decay_shape: str = "linear"  # linear | cosine | 1-sqrt
    min_lr_ratio: float = 0.0


# ---------------------------------------------------------------------------------- curriculum


@dataclass
class StageConf:
    name: str = MISSING
    seq_len: int = MISSING
    batch_size: int = MISSING
    lr_scale: float = 1.0
    steps: int | None = None
    fraction: float | None = None
    # {min_steps, window, threshold}: typed Any because OmegaConf cannot merge a dict into a null
    # structured node; sem.training.curriculum checks its keys and values.
    gate: Any = None
    checkpoint: bool = False


@dataclass
class CurriculumConf:
    _target_: str = "sem.training.curriculum.CurriculumManager"
    _convert_: str = "all"
    max_steps: int = "${trainer.max_steps}"  # type: ignore[assignment]
    stages: list[StageConf] = MISSING


# ------------------------------------------------------------------------------- distillation


@dataclass
class EMATeacherConf:
    _target_: str = "sem.training.distillation.EMATeacher"
    _partial_: bool = True  # the student is passed in by the composition root
    decay_start: float = 0.99
    decay_end: float = 0.999
    # Lengths in steps or as fractions of trainer.max_steps (resolved once per run: sem.training.budget).
    ramp_steps: int | None = None
    ramp_fraction: float | None = 0.5
    start_step: int | None = None
    start_fraction: float | None = None
    start_stage: str | None = None


@dataclass
class DistillationLossConf:
    _target_: str = "sem.training.distillation.DistillationLoss"
    alpha: float = 0.5
    temperature: float = 2.0


@dataclass
class DistillationConf:
    """``off`` leaves both null; ``ema_teacher`` sets both (``EMADistillationConf``). Typed Any here
    because OmegaConf cannot merge a dict into a null structured node: ``distillation.teacher={...}`` on
    ``off`` raised AttributeError inside Hydra's composition; validation checks what it gets."""

    teacher: Any = None
    loss: Any = None


@dataclass
class EMADistillationConf(DistillationConf):
    """``distillation=ema_teacher``: both nodes typed, so a wrong type fails at compose time."""

    teacher: EMATeacherConf | None = field(default_factory=EMATeacherConf)
    loss: DistillationLossConf | None = field(default_factory=DistillationLossConf)


# ------------------------------------------------------------------ hardware and the Trainer


@dataclass
class PrecisionConf:
    _target_: str = "sem.engines.lightning.precision.make_precision_plugin"
    _partial_: bool = True
    # auto (bf16-mixed on CUDA, XPU and CPUs with bf16 instructions, else fp32) | 32-true | bf16-mixed | 16-mixed | bf16-true
    precision: str = "auto"


@dataclass
class AcceleratorConf:
    _target_: str = MISSING
    name: str = MISSING  # auto | cpu | cuda | xpu: what the validator checks against the hardware


@dataclass
class StrategyConf:
    """Built by ``sem.engines.lightning.strategy.make_strategy`` with the device and precision in use."""

    _target_: str = "sem.engines.lightning.strategy.make_strategy"
    _partial_: bool = True
    name: str = "auto"  # auto | ddp | fsdp
    backend: str | None = None  # null: gloo (cpu), nccl (cuda), xccl (xpu)
    find_unused_parameters: bool = False
    timeout_s: int = 1800  # a collective waits this long for the other ranks
    join_timeout_s: int = 300  # joining (and a rank gone silent afterwards): every process exits 1 after it
    sharding_strategy: str = "FULL_SHARD"  # fsdp only


@dataclass
class TrainerConf:
    _target_: str = "pytorch_lightning.Trainer"
    max_steps: int = 3900
    val_check_interval: int = 250  # in optimizer steps
    log_every_n_steps: int = 10  # a train row in metrics.jsonl every N optimizer steps
    devices: Any = 1
    num_nodes: int = 1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    deterministic: bool = False
    enable_model_summary: bool = True
    num_sanity_val_steps: int = 0
    benchmark: bool | None = None
    # Lightning habits: a quick check (a step, one validation batch, no checkpoints) and a profile.
    # Any other Trainer argument: +trainer.<arg>=..., checked against Trainer's signature.
    fast_dev_run: Any = False  # true or a number of steps
    profiler: str | None = None  # simple | advanced | pytorch


@dataclass
class CheckpointConf:
    _target_: str = "sem.training.checkpoint.CheckpointManager"
    every_n_steps: int = 500
    keep_last: int = 2
    keep_best: int = 1
    monitor: str = "val/bpb"
    mode: str = "min"
    save_on_exit: bool = True
    every_n_train_steps: int | None = None  # removed (Lightning's name): validation names every_n_steps


def _check(**values: Any) -> dict[str, Any]:
    return field(default_factory=lambda: dict(values))


@dataclass
class HealthConf:
    _target_: str = "sem.training.health.HealthMonitor"
    enabled: bool = True
    nonfinite_loss: str | None = "skip"
    nonfinite_grad: str | None = "skip"
    loss_spike: dict[str, Any] = _check(action="skip", z=8.0, min_ratio=1.5, window=100, min_history=20,
                                        extreme_ratio=20.0)
    grad_explosion: dict[str, Any] = _check(action="warn", z=10.0, min_ratio=20.0, window=100, min_history=20)
    plateau: dict[str, Any] = _check(action="warn", window=500, min_improvement=0.0)
    stall: dict[str, Any] = _check(action="warn", factor=10.0, window=50, min_history=10)
    probes: dict[str, Any] = _check(action="warn", limits={})
    escalate_after: int = 3
    max_rollbacks: int = 3
    rollback_lr_scale: float = 1.0


@dataclass
class RunConf:
    name: str | None = None


@dataclass
class SamplesConf:
    """``samples.txt`` at the end of a run: ``n`` samples per prompt from the final checkpoint."""

    n: int = 3  # 0: no samples.txt
    prompts: list[str] = field(default_factory=lambda: ["", "def "])  # "" starts a new document
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0


@dataclass
class DynamicConf:
    """Dynamic evaluation (``sem.models.stream.dynamic_score``): the model learns as it reads."""

    enabled: bool = False  # the shorthand ``eval.dynamic=true`` sets this
    lr: float = DynamicSettings.lr
    chunk: int = DynamicSettings.chunk  # tokens scored between two steps of the weights
    optimizer: str = DynamicSettings.optimizer  # sgd | adam | adamw | a dotted torch.optim class path
    rows: int = DynamicSettings.rows  # documents read side by side


@dataclass
class EvalConf:
    """Extra evaluations of the final checkpoint, for ``summary.json``."""

    # stream_bpb: every held-out document scored whole, the recurrent state carried (models with
    # prefill(..., all_logits); about the final validation's cost); false: skip it (null in summary.json).
    # The test split is always scored whole too (test_stream_bpb; a sliding window for other models).
    stream: bool = True
    # test_dynamic_bpb: the test documents scored whole while the weights learn from what was scored
    dynamic: DynamicConf = field(default_factory=DynamicConf)


@dataclass
class FaultsConf:
    nan_at_step: int | None = None  # the loss of this optimizer step becomes NaN
    inf_grad_at_step: int | None = None  # one gradient entry of this step becomes inf
    spike_at_step: int | None = None  # the loss of this step is multiplied by 100
    on_rank: int | None = None  # the loss faults on this global rank only (null: every rank)


@dataclass
class Config:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING  # sem's schedules extend SchedulerConf; any torch LRScheduler works too
    curriculum: CurriculumConf = MISSING
    distillation: DistillationConf = field(default_factory=DistillationConf)
    precision: PrecisionConf = MISSING
    accelerator: AcceleratorConf = MISSING
    strategy: StrategyConf = field(default_factory=StrategyConf)
    trainer: TrainerConf = MISSING
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    health: HealthConf = field(default_factory=HealthConf)
    seed: int = 1234
    engine: str = "lightning"
    run: RunConf = field(default_factory=RunConf)
    resume: str | None = None
    dry_run: bool = False
    faults: FaultsConf = field(default_factory=FaultsConf)
    sample: SamplesConf = field(default_factory=SamplesConf)
    eval: EvalConf = field(default_factory=EvalConf)
    # torch intra-op threads for this job; null: the cores split between the jobs a parallel sweep
    # runs at once (sem.sweeps.job.job_threads), torch's default for a single run
    threads: int | None = None
    # the training forward and backward through torch.compile (inductor: a C++ compiler on CPU): true,
    # false, or auto (where inductor is ready and trainer.max_steps pays the compile back; config.hardware)
    compile: Any = "auto"
