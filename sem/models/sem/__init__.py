"""The Signal-Entropic Model, in its parts: ``recurrence`` (the parallel complex scan), ``kernels``
(hand-written backwards), ``blocks`` (norm -> recurrence -> MLP), ``mixers`` (the blocks' recurrences: diagonal,
modes, retention heads, selective), ``attention`` (local attention), ``propagator`` (Cayley unitary) and
``model`` (encoder, blocks, propagator, Born readout, recurrent decoding)."""

from sem.models.sem.model import DecodeState, SEMModel

__all__ = ["DecodeState", "SEMModel"]
