"""Text form of a Program, and its parser: ``parse(print_program(p)) == p``.

    program gma_causal(layout="bnhd") {
      input %q : T[B,N,H,D] token
      input? %key_mask : bool[B,N] mask
      %rq = responsibility(%q, %mean, %log_var, %logit, covariance="diag") : acc[B,N,H,K]
      %y, %state = causal_scan(%rq, %rk, %v, key_mask=%key_mask, norm="row", eps=1e-06) : ...
      return %y
      state %state
    }

Required operands are positional, optional ones and attributes are keywords.
The result types after ``:`` are for the reader; the parser re-derives them.
"""

from __future__ import annotations

import re
from dataclasses import fields

from gmagen.errors import ParseError

from . import ops as _ops
from .program import Input, Program
from .types import parse_type


def _attr_text(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def print_op(op: _ops.Op, types: dict | None = None) -> str:
    res = _ops.results(op)
    args: list[str] = []
    for f in fields(op):
        role = f.metadata["role"]
        value = getattr(op, f.name)
        if role == "operand" and not f.metadata["optional"]:
            args.append(f"%{value}")
        elif role == "operand" and value is not None:
            args.append(f"{f.name}=%{value}")
        elif role == "attr":
            args.append(f"{f.name}={_attr_text(value)}")
    line = ", ".join(f"%{v}" for v in res.values()) + f" = {_ops.op_name(op)}({', '.join(args)})"
    if types:
        line += " : " + ", ".join(str(types[v]) for v in res.values())
    return line


def print_program(program: Program) -> str:
    from .verify import verify

    try:
        types = verify(program)
    except Exception:  # an invalid program still prints, without result types
        types = None
    lines = [f'program {program.name}(layout="{program.layout}") {{']
    for inp in program.inputs:
        mark = "input?" if inp.optional else "input"
        lines.append(f"  {mark} %{inp.name} : {inp.type} {inp.role}")
    for op in program.ops:
        lines.append("  " + print_op(op, types))
    lines.append("  return " + ", ".join(f"%{o}" for o in program.outputs))
    if program.state:
        lines.append(f"  state %{program.state}")
    lines.append("}")
    return "\n".join(lines)


_HEADER = re.compile(r'^program\s+(\w+)\(layout="(\w+)"\)\s*\{$')
_INPUT = re.compile(r"^input(\??)\s+%(\w+)\s*:\s*(\S+)\s+(\w+)$")
_OP = re.compile(r"^(%\w+(?:\s*,\s*%\w+)*)\s*=\s*(\w+)\((.*)\)(?:\s*:.*)?$")


def _attr_value(text: str, lineno: int) -> object:
    text = text.strip()
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    try:
        return float(text) if any(c in text for c in ".eE") or text in ("inf", "nan") else int(text)
    except ValueError:
        raise ParseError(f"line {lineno}: cannot read attribute value {text!r}") from None


def parse(text: str) -> Program:
    """Read the text form written by ``print_program``."""
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.strip().splitlines()) if ln.strip()]
    if not lines:
        raise ParseError("empty program text")
    lineno, first = lines[0]
    m = _HEADER.match(first)
    if not m:
        raise ParseError(f"line {lineno}: expected 'program NAME(layout=\"...\") {{', got {first!r}")
    name, layout = m.groups()
    inputs: list[Input] = []
    op_list: list[_ops.Op] = []
    outputs: tuple[str, ...] = ()
    state = None
    for lineno, line in lines[1:]:
        if line == "}":
            break
        if line.startswith("input"):
            m = _INPUT.match(line)
            if not m:
                raise ParseError(f"line {lineno}: bad input declaration {line!r}")
            opt, vname, tname, role = m.groups()
            try:
                vtype = parse_type(tname)
            except ValueError as exc:
                raise ParseError(f"line {lineno}: {exc}") from None
            inputs.append(Input(vname, vtype, role, bool(opt)))
        elif line.startswith("return"):
            outputs = tuple(v.strip().lstrip("%") for v in line[len("return"):].split(",")
                            if v.strip())
        elif line.startswith("state"):
            state = line[len("state"):].strip().lstrip("%")
        else:
            op_list.append(_parse_op(line, lineno))
    else:
        raise ParseError("missing closing '}'")
    return Program(name, tuple(inputs), tuple(op_list), outputs, state, layout)


def _parse_op(line: str, lineno: int) -> _ops.Op:
    m = _OP.match(line)
    if not m:
        raise ParseError(f"line {lineno}: cannot read op {line!r}")
    res_text, op_name, arg_text = m.groups()
    if op_name not in _ops.OPS:
        raise ParseError(f"line {lineno}: unknown op {op_name!r}, expected one of {tuple(_ops.OPS)}")
    cls = _ops.OPS[op_name]
    kwargs: dict[str, object] = {}
    res_fields = [f.name for f in fields(cls) if f.metadata["role"] == "result"]
    res_names = [r.strip().lstrip("%") for r in res_text.split(",")]
    if len(res_names) != len(res_fields):
        raise ParseError(f"line {lineno}: {op_name} defines {len(res_fields)} values, got {len(res_names)}")
    kwargs.update(zip(res_fields, res_names))
    positional = [f.name for f in fields(cls)
                  if f.metadata["role"] == "operand" and not f.metadata["optional"]]
    pos_i = 0
    for arg in (a.strip() for a in arg_text.split(",") if a.strip()):
        if "=" in arg:
            key, _, value = arg.partition("=")
            key, value = key.strip(), value.strip()
            kwargs[key] = value.lstrip("%") if value.startswith("%") else _attr_value(value, lineno)
        else:
            if pos_i >= len(positional):
                raise ParseError(f"line {lineno}: too many operands for {op_name}")
            kwargs[positional[pos_i]] = arg.lstrip("%")
            pos_i += 1
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ParseError(f"line {lineno}: {op_name}: {exc}") from None
