"""Byte-level tokenizer: the 256 byte values plus BOS, EOS and PAD.

Any text (or any bytes at all) encodes losslessly and there is nothing to download or train, which keeps
bits-per-byte directly comparable with byte compressors such as gzip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

# Bump when encode() changes behaviour: the fingerprint keys the token cache.
_FORMAT = "byte-v1"


class ByteTokenizer:
    """Token id = byte value (0..255); 256 = BOS, 257 = EOS, 258 = PAD."""

    vocab_size: int = 259
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    def encode(self, data: bytes | str, add_special: bool = True) -> np.ndarray:
        """Return uint16 ids [len(bytes) (+2)]: BOS, the raw bytes, EOS. A str is encoded as UTF-8."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"ByteTokenizer.encode expects bytes or str, got {type(data).__name__}")
        body = np.frombuffer(data, dtype=np.uint8)
        if not add_special:
            return body.astype(np.uint16)
        out = np.empty(body.size + 2, dtype=np.uint16)
        out[0] = self.bos_id
        out[1:-1] = body
        out[-1] = self.eos_id
        return out

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Bytes back to text: special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids if not hasattr(ids, "detach") else ids.detach().cpu()).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the byte vocabulary [0, {self.vocab_size})")
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """Short hash that changes whenever the encoding changes (part of the token-cache key)."""
        spec = f"{_FORMAT}:{self.vocab_size}:{self.bos_id}:{self.eos_id}:{self.pad_id}"
        return hashlib.sha1(spec.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"
