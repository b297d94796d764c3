"""The training policies, pure and engine-free (no Lightning, no Hydra): the step (``step``, with truncated
BPTT's ``lanes`` and its ``compiled`` forward), LR schedules
(``scheduler``), the sequence-length curriculum, EMA-teacher distillation, checkpoints and their
retention (``checkpoint``) and restoring a model from one (``restore``), the health monitor, metrics,
optimizers (Muon), budget fractions, precision, preemption signals and process-group facts
(``distributed``). Both engines call these, so a behaviour is written once."""
