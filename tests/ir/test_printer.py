"""Text form and JSON round trips, and the stable program hash."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest

import gmagen
from gmagen.dsl import ProgramBuilder, gma_qk_mixtures, responsibilities_program
from gmagen.errors import ParseError, VerifyError
from gmagen.ir import Program, parse, print_program, verify


def _two_reads() -> Program:
    b = ProgramBuilder("two_reads", layout="bhnd")
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", dim="Dv")
    mix = b.mixture(covariance="spherical")
    mem = b.slot_write(b.responsibility(k, mix), v, key_mask=b.key_mask())
    rq = b.responsibility(q, mix)
    return b.build(b.slot_read(rq, mem, norm="row", eps=0.0),
                   b.slot_read(rq, mem, norm="slot", eps=1e-3), state=mem)


PROGRAMS = [
    pytest.param(gmagen.gma(c, n, cov, layout=lay),
                 id=f"{'causal' if c else 'bidir'}-{n}-{cov}-{lay}")
    for c, n, cov, lay in itertools.product((False, True), ("row", "slot"),
                                            ("diag", "spherical", "shared"), ("bnhd", "bhnd"))
]
PROGRAMS += [
    pytest.param(gma_qk_mixtures(False), id="qk-mixtures-bidir"),
    pytest.param(gma_qk_mixtures(True, "slot", "shared", 1e-4, layout="bhnd"),
                 id="qk-mixtures-causal"),
    pytest.param(responsibilities_program("shared"), id="responsibilities"),
    pytest.param(gmagen.gma(True, D=64, Dv=32, K=16, eps=0.0), id="fixed-dims-eps0"),
    # floats must print with every digit repr gives
    pytest.param(gmagen.gma(eps=2.2250738585072014e-308), id="tiny-eps"),
    pytest.param(gmagen.gma(True, eps=1 / 3), id="eps-one-third"),
    pytest.param(_two_reads(), id="two-reads"),
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_text_round_trip(program):
    text = print_program(program)
    again = parse(text)
    assert again == program
    assert print_program(again) == text
    assert str(program) == text


@pytest.mark.parametrize("program", PROGRAMS)
def test_json_round_trip(program):
    assert Program.from_json(program.to_json()) == program
    assert Program.from_json(program.dumps()) == program
    # through real JSON text: tuples become lists, ints stay ints
    assert Program.from_json(json.loads(json.dumps(program.to_json()))) == program


@pytest.mark.parametrize("program", PROGRAMS)
def test_hash_survives_round_trips(program):
    h = program.hash()
    assert len(h) == 16 and int(h, 16) >= 0
    assert parse(print_program(program)).hash() == h
    assert Program.from_json(program.dumps()).hash() == h


def test_printed_line_form():
    """STYLE.md: one line per op, attributes as keywords, result types after ':'."""
    text = print_program(gmagen.gma())
    assert ('%y = slot_read(%rq, %memory, cu_seqlens=%cu_seqlens, norm="row", eps=1e-06) '
            ': T[B,N,H,Dv]') in text
    assert "input? %key_mask : bool[B,N] mask" in text
    assert text.splitlines()[0] == 'program gma_bidirectional_row_diag(layout="bnhd") {'


def test_invalid_program_still_prints():
    bad = replace(gmagen.gma(), outputs=())
    text = print_program(bad)
    op_lines = [ln for ln in text.splitlines() if " = " in ln]
    assert len(op_lines) == 4 and not any(" : " in ln for ln in op_lines)
    assert parse(text) == bad


def test_hash_differs_when_anything_changes():
    base = gmagen.gma(True)
    variants = {
        "eps": gmagen.gma(True, eps=1e-5),
        "norm": gmagen.gma(True, "slot"),
        "covariance": gmagen.gma(True, covariance="spherical"),
        "layout": base.with_layout("bhnd"),
        "causal": gmagen.gma(False),
        "fixed K": gmagen.gma(True, K=8),
        "name": replace(base, name="other"),
        "optional": replace(base, inputs=tuple(replace(i, optional=False) if i.name == "key_mask"
                                               else i for i in base.inputs)),
        "state": replace(base, state=None),
    }
    hashes = {name: p.hash() for name, p in variants.items()}
    assert base.hash() == gmagen.gma(True).hash()
    for name, h in hashes.items():
        assert h != base.hash(), f"changing {name} kept the hash"
    assert len(set(hashes.values())) == len(hashes)


def test_hash_is_stable_across_processes():
    programs = "[gmagen.gma(c, n, cov) for c in (False, True) for n in ('row', 'slot') " \
               "for cov in ('diag', 'spherical', 'shared')] + [gma_qk_mixtures(True)]"
    code = ("import gmagen\nfrom gmagen.dsl import gma_qk_mixtures\n"
            f"print(' '.join(p.hash() for p in {programs}))")
    here = " ".join(p.hash() for p in eval(programs, {"gmagen": gmagen,
                                                       "gma_qk_mixtures": gma_qk_mixtures}))
    env = dict(os.environ, PYTHONHASHSEED="12345")  # set iteration order must not matter
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == here.split()


BAD_TEXT = {
    "empty": ("", "empty"),
    "header": ("programme x {\n}", "line 1"),
    "input": ('program p(layout="bnhd") {\n  input q T[B,N,H,D] token\n}', "line 2"),
    "type": ('program p(layout="bnhd") {\n  input %q : T(B,N) token\n}', "line 2"),
    "op": ('program p(layout="bnhd") {\n  input %q : T[B,N,H,D] token\n'
           '  %y = attention(%q)\n}', "unknown op 'attention'"),
    "results": ('program p(layout="bnhd") {\n  %y = causal_scan(%a, %b, %c)\n}', "line 2"),
    "operands": ('program p(layout="bnhd") {\n  %m = slot_write(%a, %b, %c)\n}', "too many"),
    "attr": ('program p(layout="bnhd") {\n  %y = slot_read(%a, %m, eps=tiny)\n}', "tiny"),
    "keyword": ('program p(layout="bnhd") {\n  %y = slot_read(%a, %m, nrom="row")\n}',
                "slot_read"),
    "unclosed": ('program p(layout="bnhd") {\n  return %y', "closing"),
}


@pytest.mark.parametrize("text, needle", [pytest.param(*v, id=k) for k, v in BAD_TEXT.items()])
def test_parse_errors(text, needle):
    with pytest.raises(ParseError, match=needle) as info:
        parse(text)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["my-gma", "two words", "9lives", "gmä"])
def test_names_must_print(bad):
    """A name the text form cannot carry is rejected when the program is built,
    instead of breaking parse(print(p)) later."""
    with pytest.raises(VerifyError, match="not an identifier"):
        verify(replace(gmagen.gma(), name=bad))
    b = ProgramBuilder("ok")
    x = b.tokens(bad)
    with pytest.raises(VerifyError, match="not an identifier"):
        b.build(b.responsibility(x, b.mixture(), name="r"))


@pytest.mark.parametrize("change, needle", [
    pytest.param(lambda d: d.update(format="gmagen.program/9"), "gmagen.program/9", id="format"),
    pytest.param(lambda d: d["ops"][0].update(op="attention"), "unknown op 'attention'",
                 id="unknown-op"),
    pytest.param(lambda d: d["ops"][1].update(mask="key_mask"), "op 1 (slot_write)",
                 id="unknown-field"),
])
def test_from_json_errors(change, needle):
    data = gmagen.gma().to_json()
    change(data)
    with pytest.raises(ParseError, match=re.escape(needle)):
        Program.from_json(data)


def test_equal_programs_hash_equal_whatever_the_number_type():
    """eps=0 == eps=0.0, so hand-built, parsed or JSON programs must hash alike."""
    p = gmagen.gma(True, eps=0.0)
    q = replace(p, ops=p.ops[:-1] + (replace(p.ops[-1], eps=0),))
    assert p == q and p.hash() == q.hash()
    parsed = parse(print_program(p).replace("eps=0.0", "eps=0"))
    assert parsed == p and parsed.hash() == p.hash()
    data = p.to_json()
    data["ops"][-1]["eps"] = 0
    assert Program.from_json(data).hash() == p.hash()
