"""Bit packing: exact round trips at any length and the documented little-endian layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant.errors import SchemeError
from edgequant.formats.packing import pack, packed_nbytes, unpack


def reference_pack(codes: list[int], bits: int) -> bytes:
    """The layout spelled out: code i at bits [i*b, (i+1)*b) of one little-endian integer."""
    value = sum(c << (i * bits) for i, c in enumerate(codes))
    return value.to_bytes((len(codes) * bits + 7) // 8, "little")


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=131))
    return codes, bits


@settings(max_examples=200, deadline=None)
@given(codes_and_bits())
def test_pack_matches_the_reference_layout_and_round_trips(cb):
    codes, bits = cb
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack(t, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(len(codes), bits) == -(-len(codes) * bits // 8)
    assert bytes(packed.tolist()) == reference_pack(codes, bits)
    assert torch.equal(unpack(packed, bits, len(codes)), t)


def test_pack_accepts_any_shape_row_major():
    codes = torch.arange(12, dtype=torch.uint8).reshape(3, 4) % 8
    assert torch.equal(pack(codes, 3), pack(codes.reshape(-1), 3))


def test_hand_worked_4bit_layout():
    # low nibble first: byte k = code[2k] | code[2k+1] << 4; odd count leaves a zero high nibble
    packed = pack(torch.tensor([1, 2, 3, 4, 15]), 4)
    assert packed.tolist() == [0x21, 0x43, 0x0F]


def test_hand_worked_3bit_layout():
    # 5=101 3=011 7=111 1=001 6=110 laid from bit 0 of byte 0 upward:
    # byte 0 bits 0..7 = 1,0,1, 1,1,0, 1,1 -> 0b11011101 = 0xDD
    # byte 1 bits 0..7 = 1, 1,0,0, 0,1,1, 0 (pad) -> 0b01100011 = 0x63
    packed = pack(torch.tensor([5, 3, 7, 1, 6]), 3)
    assert packed.tolist() == [0xDD, 0x63]
    assert unpack(packed, 3, 5).tolist() == [5, 3, 7, 1, 6]


def test_hand_worked_1bit_and_2bit_layouts():
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0x81, 0x01]
    assert pack(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011]


def test_packed_nbytes_by_hand():
    assert packed_nbytes(0, 3) == 0
    assert packed_nbytes(1, 1) == 1
    assert packed_nbytes(8, 1) == 1
    assert packed_nbytes(9, 1) == 2
    assert packed_nbytes(5, 3) == 2
    assert packed_nbytes(64 * 1536, 4) == 64 * 1536 // 2


@pytest.mark.parametrize("n_bytes", [1, 3])
def test_unpack_rejects_a_wrong_byte_count(n_bytes):
    with pytest.raises(SchemeError, match="5 3-bit codes"):
        unpack(torch.zeros(n_bytes, dtype=torch.uint8), 3, 5)


def test_unpack_rejects_wrong_dtype_or_rank():
    with pytest.raises(SchemeError):
        unpack(torch.zeros(2, dtype=torch.int16), 3, 5)
    with pytest.raises(SchemeError):
        unpack(torch.zeros(1, 2, dtype=torch.uint8), 3, 5)


@pytest.mark.parametrize("bits", [0, 9])
def test_bit_widths_outside_1_to_8_are_rejected(bits):
    with pytest.raises(SchemeError):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(SchemeError):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


@pytest.mark.parametrize("bad", [[8], [-1], [0, 9]])
def test_codes_out_of_range_are_rejected(bad):
    with pytest.raises(SchemeError, match="out of range"):
        pack(torch.tensor(bad), 3)
