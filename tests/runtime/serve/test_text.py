"""Incremental text with stop strings, over a real byte-level decode (bytes -> utf-8)."""
from __future__ import annotations

from llmc.runtime.serve.text import TextStream


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def feed(ts: TextStream, text: str) -> tuple[str, bool]:
    out = ""
    for b in text.encode():
        piece, stopped = ts.push(b)
        out += piece
        if stopped:
            return out, True
    return out + ts.flush(), False


def test_stop_string_ends_the_text_before_it():
    assert feed(TextStream(decode, ("\n\n", "END")), "abc END more") == ("abc ", True)
    assert feed(TextStream(decode, ("\n\n",)), "line\n\nnext") == ("line", True)


def test_text_that_could_start_a_stop_is_held_back_then_released():
    ts = TextStream(decode, ("STOP",))
    released = [ts.push(b)[0] for b in b"xSTO"]
    assert "".join(released) == "x"  # "STO" might still become STOP
    assert ts.push(ord("P")) == ("", True)
    ts = TextStream(decode, ("STOP",))
    assert feed(ts, "xSTOx") == ("xSTOx", False)


def test_half_a_character_waits_for_the_rest():
    ts = TextStream(decode)
    e = "é".encode()
    assert ts.push(e[0]) == ("", False)
    assert ts.push(e[1]) == ("é", False)
