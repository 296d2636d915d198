"""Parsing of the schedule-like flags: the multi-span learning rate, the pseudo-label size function,
the layer-wise learning-rate groups and the progressive-resizing schedule.

Both are strings from the command line, so both are parsed, never evaluated: the size function
goes through a small arithmetic evaluator over an AST whitelist, not `eval`.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass

SCHEDULES = ("cosine", "const")


@dataclass(frozen=True)
class LRSchedule:
    """`schedule,v1,e1,v2,e2,...,vn`: in epochs [0,e1) start at v1, [e1,e2) at v2, ..., [e(n-1), end) at vn.

    Each span runs its own schedule from its start value: `cosine` decays towards 0 at the span's
    end (the end of the last span is the end of training), `const` stays.
    """
    kind: str
    values: tuple[float, ...]
    bounds: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> "LRSchedule":
        parts = [p.strip() for p in text.split(",")]
        kind, numbers = parts[0], parts[1:]
        if kind not in SCHEDULES:
            raise ValueError(f"--lr {text!r}: schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        if len(numbers) % 2 != 1:
            raise ValueError(f"--lr {text!r}: expected schedule,v1,e1,v2,e2,...,vn "
                             "(an odd count of numbers: a value for each span, an epoch between spans)")
        try:
            floats = [float(n) for n in numbers]
        except ValueError:
            raise ValueError(f"--lr {text!r}: not a number among {numbers}") from None
        values, bounds = tuple(floats[::2]), tuple(floats[1::2])
        if any(v < 0 or not math.isfinite(v) for v in values):
            raise ValueError(f"--lr {text!r}: learning rates must be finite and >= 0")
        if any(b <= a for a, b in zip((0.0,) + bounds, bounds)):
            raise ValueError(f"--lr {text!r}: span boundaries must be positive and increasing")
        return cls(kind, values, bounds)

    def __str__(self) -> str:
        numbers = [self.values[0]]
        for bound, value in zip(self.bounds, self.values[1:]):
            numbers += [bound, value]
        # short where that is exact, else the shortest text that reads back as the same float:
        # checkpoints store this text, and --resume must get the same schedule back
        return ",".join([self.kind] + [f"{n:g}" if float(f"{n:g}") == n else repr(n) for n in numbers])

    def __call__(self, epoch: float, total_epochs: float) -> float:
        """The learning rate at (fractional) `epoch` of a run of `total_epochs`."""
        starts = (0.0,) + self.bounds
        ends = self.bounds + (max(total_epochs, starts[-1]),)
        for start, end, value in zip(starts, ends, self.values):
            if start <= epoch < end:
                if self.kind == "const":
                    return value
                return value * (math.cos((epoch - start) / (end - start) * math.pi) + 1) / 2
        return self.values[-1] if self.kind == "const" else 0.0


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
RANGE_POINTS = 1000  # x in [0, 1] is checked at 0, 0.001, ..., 1
_FUNCTIONS = {"min": min, "max": max, "sqrt": math.sqrt, "exp": math.exp, "log": math.log}


class SizeFunction:
    """An arithmetic expression of `x` (e.g. `0.6*x+0.4`), checked once and then evaluated safely.

    Allowed: numbers, `x`, + - * / **, parentheses, and min, max, sqrt, exp, log. Anything else
    (names, attributes, calls of other functions, strings) is refused with a message.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            self.tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError:
            raise ValueError(f"--pl-size-func {text!r}: not an arithmetic expression of x") from None
        self._check(self.tree)
        # fail now, on a bad expression, not at the first pseudo-label epoch; and never clip: a
        # fraction of the wells outside [0, 1] cannot be what was meant (5*x, -x)
        for i in range(RANGE_POINTS + 1):
            x = i / RANGE_POINTS
            value = self(x)
            if not 0 <= value <= 1:
                raise ValueError(f"--pl-size-func {text!r} is {value:g} at x={x:g}: the fraction of the wells "
                                 "labelled must stay in [0, 1] for x in [0, 1]")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SizeFunction) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"SizeFunction({self.text!r})"

    def _check(self, node: ast.AST) -> None:
        ok = (
            (isinstance(node, ast.Constant) and type(node.value) in (int, float))
            or (isinstance(node, ast.Name) and node.id == "x")
            or (isinstance(node, ast.BinOp) and type(node.op) in _BINARY)
            or (isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY)
            or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCTIONS and not node.keywords)
        )
        if not ok:
            raise ValueError(f"--pl-size-func {self.text!r}: {ast.unparse(node)!r} is not allowed "
                             "(use numbers, x, + - * / **, min, max, sqrt, exp, log)")
        children = node.args if isinstance(node, ast.Call) else list(ast.iter_child_nodes(node))
        for child in children:
            if not isinstance(child, (ast.operator, ast.unaryop, ast.expr_context)):
                self._check(child)

    def _eval(self, node: ast.AST, x: float) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return x
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._eval(node.operand, x))
        if isinstance(node, ast.Call):
            return _FUNCTIONS[node.func.id](*(self._eval(a, x) for a in node.args))
        left, right = self._eval(node.left, x), self._eval(node.right, x)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError(f"exponent {right} too large")  # __call__ names the flag and x
        return _BINARY[type(node.op)](left, right)

    def __call__(self, x: float) -> float:
        try:
            value = float(self._eval(self.tree, x))
        except (ArithmeticError, ValueError, TypeError) as e:
            raise ValueError(f"--pl-size-func {self.text!r} fails at x={x}: {e}") from None
        if not math.isfinite(value):
            raise ValueError(f"--pl-size-func {self.text!r} is not finite at x={x}")
        return value


def _multiplier(text: str) -> float:
    """A non-negative number or a fraction `p/q` (so 1/3 is exact where 0.333 is not)."""
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--lr-groups: {text!r} is not a number or a fraction p/q") from None
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"--lr-groups: multiplier {text!r} must be a finite number >= 0")
    return value


@dataclass(frozen=True)
class LRGroups:
    """`--lr-groups "conv0,norm0=1/3,denseblock,transition,norm5=1/2"`: name prefixes (of the
    backbone's parameters) gathered up to each `=MULT`, which sets their learning rate to MULT
    times the schedule's. A parameter takes the first group whose prefix it starts with; the name
    STEM stands for the backbone's stem (engine/setup.py)."""
    groups: tuple[tuple[tuple[str, ...], float], ...]
    text: str = ""  # as given: what a checkpoint records

    @classmethod
    def parse(cls, text: str) -> "LRGroups":
        groups, prefixes = [], []
        for token in (t.strip() for t in text.split(",")):
            name, eq, mult = token.partition("=")
            if not name.strip():
                raise ValueError(f"--lr-groups: an empty name in {text!r}")
            prefixes.append(name.strip())
            if eq:
                groups.append((tuple(prefixes), _multiplier(mult.strip())))
                prefixes = []
        if prefixes or not groups:
            raise ValueError(f"--lr-groups: {','.join(prefixes) or text!r} has no '=MULT' after it")
        return cls(tuple(groups), text)

    def group_of(self, name: str) -> int | None:
        """Index of the first group with a prefix of `name`, None if none has."""
        return next((i for i, (prefixes, _) in enumerate(self.groups) if name.startswith(prefixes)), None)


@dataclass(frozen=True)
class SizeSchedule:
    """`--image-size-schedule 224:0,384:30,512:60`: progressive resizing, the edge (pixels) of the
    training images from each epoch on (224 in epochs 0-29, 384 in 30-59, 512 from 60). The first
    step starts at epoch 0 and both the sizes and the epochs rise, so every epoch has one size and
    training ends at the largest (validation and prediction run at the data's own size)."""
    steps: tuple[tuple[int, int], ...]  # (edge, first epoch), epochs increasing
    text: str = ""  # as given: what a checkpoint records

    @classmethod
    def parse(cls, text: str) -> "SizeSchedule":
        where = f"--image-size-schedule {text!r}"
        steps = []
        for token in (t.strip() for t in str(text).split(",")):
            size, colon, epoch = token.partition(":")
            try:
                size_value, epoch_value = int(size), int(epoch)
            except ValueError:
                raise ValueError(f"{where}: {token!r} is not SIZE:EPOCH (two whole numbers, "
                                 "e.g. 224:0,384:30,512:60)") from None
            if not colon:
                raise ValueError(f"{where}: {token!r} is not SIZE:EPOCH (e.g. 224:0,384:30,512:60)")
            if size_value < 1 or epoch_value < 0:
                raise ValueError(f"{where}: {token!r} needs a size >= 1 and an epoch >= 0")
            steps.append((size_value, epoch_value))
        if steps[0][1] != 0:
            raise ValueError(f"{where}: the first size must start at epoch 0 (e.g. {steps[0][0]}:0,...)")
        for (size_a, epoch_a), (size_b, epoch_b) in zip(steps, steps[1:]):
            if epoch_b <= epoch_a:
                raise ValueError(f"{where}: epochs must rise ({epoch_a} then {epoch_b})")
            if size_b <= size_a:
                raise ValueError(f"{where}: sizes must rise ({size_a} then {size_b})")
        return cls(tuple(steps), str(text))

    @property
    def last_epoch(self) -> int:
        return self.steps[-1][1]

    def size_at(self, epoch: int) -> int:
        """The edge of the training images in `epoch`."""
        return next(size for size, start in reversed(self.steps) if start <= epoch)

    def __str__(self) -> str:
        return self.text or ",".join(f"{size}:{epoch}" for size, epoch in self.steps)
