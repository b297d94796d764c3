import numpy as np
import pytest
import torch

from sem.data.tokenizer import ByteTokenizer

tok = ByteTokenizer()


@pytest.mark.parametrize("text", ["", "hello\n", "héllo wörld — 世界 🐍", "tab\tnul\x00end"])
def test_round_trip_text(text):
    ids = tok.encode(text)
    assert ids.dtype == np.uint16
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_ids_are_the_bytes():
    data = bytes(range(256))
    ids = tok.encode(data, add_special=False)
    assert ids.tolist() == list(range(256))
    assert tok.encode(data)[1:-1].tolist() == list(range(256))


def test_invalid_utf8_survives_encoding_and_decodes_with_replacement():
    data = b"ok \xff\xfe \xc3"  # stray bytes and a truncated 2-byte sequence
    ids = tok.encode(data)
    assert bytes(ids[1:-1].astype(np.uint8)) == data  # lossless at the byte level
    assert tok.decode(ids) == "ok \ufffd\ufffd \ufffd"


def test_decode_drops_specials_and_accepts_tensors():
    ids = [tok.bos_id, 104, 105, tok.pad_id, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(torch.tensor(ids)) == "hi"
    assert tok.decode(np.array([[104], [105]])) == "hi"


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="259"):
        tok.decode([104, 259])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_encode_rejects_other_types():
    with pytest.raises(TypeError, match="list"):
        tok.encode([1, 2, 3])


def test_vocabulary_constants():
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)


def test_fingerprint_is_stable_and_tracks_the_encoding():
    assert ByteTokenizer().fingerprint() == tok.fingerprint()

    class Shifted(ByteTokenizer):
        eos_id = 258
        pad_id = 257

    assert Shifted().fingerprint() != tok.fingerprint()
