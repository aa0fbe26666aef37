"""Per-tensor hyper-parameters for Amos and Amos-style training, chosen by rules.

Amos (arXiv 2210.11693) needs, for every parameter tensor, the scale `η` that its
trained entries are expected to have; the Amos-style schedules of kexue.fm/archives/9344
need the same number under the name `σ`. Both are given as a *parameter rule*: a
function `rule(path, shape)` of the parameter's path in the pytree (a string, below)
and its static shape. So are the slot shapes of Amos (`shape_fn`) and the initial
decay accumulator (`init_b_fn`).

Paths. `parameter_path` turns a `jax.tree_util` key path into a '/'-joined string:
dict keys and sequence indices give their value, attribute keys their name, so
`{"dense": {"kernel": w}}` gives "dense/kernel" and `[w0, w1]` gives "0" and "1". A
Flax NNX `Variable` flattens to its `.value` attribute; that final "value" is dropped,
so an `nnx.State` of `nnx.Linear` parameters gives "kernel" and "bias", like the
linen dict. `parameter_paths(tree)` lists them, to see what rules will match against.

Rules. `eta_fn_from_rules` and `shape_fn_from_rules` take `(regex, value)` pairs; the
first regex found in the path (`re.search`; anchor with `^`/`$` for whole names)
gives the value. A value is a number, a tuple of ints (shapes), or a short
expression of the shape, evaluated by a small whitelisting evaluator:

* names: `SHAPE` (the tuple), `ndim`, `size` (number of entries), `fan_in`
  (product of all but the last axis; 1 for scalars) and `fan_out` (the last axis;
  1 for scalars);
* numbers, tuples, `SHAPE[i]` and slices `SHAPE[a:b]`, `+ - * / // **`, unary `-`
  (`+` also joins tuples: `(1,) + SHAPE[1:]`);
* functions `sqrt`, `log`, `exp`, `prod`, `min`, `max`, `abs`.

Nothing else (attributes, strings, comprehensions, other names or calls) is
accepted, so a rule read from a config file cannot run code. In an
`ml_collections.ConfigDict`, store rules as a tuple of pairs, e.g.
`config.eta_rules = (("kernel$", "1/sqrt(fan_in)"), ("bias$", 0.5))`: a ConfigDict
used as a mapping iterates its keys in sorted order and refuses keys with dots.

Defaults. `eta_fn_from_init(params)` reads the scale off the initial parameters: the
standard deviation of a randomly initialised tensor, `0.5` for a tensor initialised
to all zeros (biases) or all ones (norm scales), as in the Amos paper and in Su's
post. `eta_fn_from_rules(rules, fallback=eta_fn_from_init(params))` lets a few
rules override it.
"""

from __future__ import annotations

import ast
import math
import numbers
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from kexue.ops._checks import check_int

Shape: TypeAlias = tuple[int, ...]
ParamRule: TypeAlias = Callable[[str, Shape], Any]
RuleValue: TypeAlias = float | int | str | tuple[int, ...]
Rules: TypeAlias = Sequence[tuple[str, RuleValue]] | Mapping[str, RuleValue]

_MAX_EXPRESSION_LENGTH = 200


# --------------------------------------------------------------------------- paths


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, Sequence/FlattenedIndexKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def parameter_path(key_path: Sequence[Any]) -> str:
    """The '/'-joined name of a leaf, from its `jax.tree_util` key path.

    A trailing attribute key named "value" (the payload of a Flax NNX `Variable`) is
    dropped. A leaf at the root (an array passed as the whole tree) has path "".
    """
    keys = list(key_path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_name(key) for key in keys)


def flatten_with_parameter_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """`(path string, leaf)` pairs of `tree` and its treedef (None leaves are skipped)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(parameter_path(key_path), leaf) for key_path, leaf in leaves], treedef


def parameter_paths(tree: Any) -> dict[str, Shape]:
    """Maps the path of every leaf of `tree` to its shape, in flattening order."""
    pairs, _ = flatten_with_parameter_paths(tree)
    return {path: tuple(np.shape(leaf)) for path, leaf in pairs}


# ------------------------------------------------------------- safe expressions

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: lambda a, b: float(a) ** float(b),  # floats: overflow fails fast
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "prod": lambda values: math.prod(values),
    "min": min,
    "max": max,
    "abs": abs,
}


def _shape_names(shape: Shape) -> dict[str, Any]:
    return {
        "SHAPE": shape,
        "ndim": len(shape),
        "size": math.prod(shape),
        "fan_in": math.prod(shape[:-1]),
        "fan_out": shape[-1] if shape else 1,
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _evaluate_node(node: ast.AST, names: dict[str, Any]) -> Any:
    """Evaluates one node of a whitelisted expression; anything else is a ValueError."""
    if isinstance(node, ast.Constant) and _is_number(node.value):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Tuple):
        return tuple(_evaluate_node(element, names) for element in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _evaluate_node(node.operand, names)
        if not _is_number(operand):
            raise ValueError("unary minus/plus needs a number")
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate_node(node.left, names), _evaluate_node(node.right, names)
        if isinstance(node.op, ast.Add) and isinstance(left, tuple) and isinstance(right, tuple):
            return left + right
        if not (_is_number(left) and _is_number(right)):
            raise ValueError("arithmetic needs numbers on both sides")
        return _BINARY[type(node.op)](left, right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS and not node.keywords):
        args = [_evaluate_node(arg, names) for arg in node.args]
        return _FUNCTIONS[node.func.id](*args)
    if isinstance(node, ast.Subscript):
        container = _evaluate_node(node.value, names)
        if not isinstance(container, tuple):
            raise ValueError("only tuples (such as SHAPE) can be indexed")
        if isinstance(node.slice, ast.Slice):
            parts = [None if part is None else _evaluate_node(part, names)
                     for part in (node.slice.lower, node.slice.upper, node.slice.step)]
            if not all(part is None or isinstance(part, int) for part in parts):
                raise ValueError("slice bounds must be integers")
            return container[slice(*parts)]
        index = _evaluate_node(node.slice, names)
        if not isinstance(index, int):
            raise ValueError("indices must be integers")
        return container[index]
    raise ValueError(f"`{ast.unparse(node)}` is not allowed")


def evaluate_rule_value(value: RuleValue, shape: Shape) -> Any:
    """Evaluates a rule value for a tensor of the given shape.

    Numbers and tuples are returned as they are; a string is parsed as an expression
    of the shape (see the module docstring for what it may contain).

    Raises:
      ValueError: the expression is malformed, uses anything outside the whitelist,
        or fails to evaluate (index out of range, division by zero, ...).
    """
    if not isinstance(value, str):
        return value
    if len(value) > _MAX_EXPRESSION_LENGTH:
        raise ValueError(
            f"rule expression {value!r} is longer than {_MAX_EXPRESSION_LENGTH} characters"
        )
    try:
        tree = ast.parse(value, mode="eval")
        return _evaluate_node(tree.body, _shape_names(tuple(shape)))
    except (SyntaxError, ValueError, TypeError, IndexError, ZeroDivisionError,
            OverflowError) as error:
        raise ValueError(
            f"cannot evaluate rule expression {value!r} for shape {tuple(shape)}: {error}"
        ) from None


def _check_expression_syntax(value: str) -> None:
    """Parses `value`, so that a syntax error surfaces when the rule is built."""
    try:
        ast.parse(value, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"rule expression {value!r} is not valid: {error.msg}") from None


# ------------------------------------------------------------------------- rules


def _rule_pairs(rules: Rules, what: str) -> list[tuple[re.Pattern, RuleValue]]:
    items = list(rules.items()) if hasattr(rules, "items") else list(rules)
    pairs = []
    for item in items:
        if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
            raise ValueError(f"{what} rules must be (regex, value) pairs; got {item!r}")
        pattern, value = item
        if not isinstance(pattern, str):
            raise ValueError(f"{what} rule regex must be a str; got {pattern!r}")
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{what} rule regex {pattern!r} does not compile: {error}") from None
        if isinstance(value, str):
            _check_expression_syntax(value)
        elif isinstance(value, list):
            value = tuple(value)
        pairs.append((compiled, value))
    return pairs


def _rule_fn(rules: Rules, fallback: ParamRule | None, what: str,
             check: Callable[[str, Shape, Any], Any]) -> ParamRule:
    pairs = _rule_pairs(rules, what)

    def rule(path: str, shape: Shape) -> Any:
        shape = tuple(shape)
        for pattern, value in pairs:
            if pattern.search(path):
                try:
                    result = evaluate_rule_value(value, shape)
                except ValueError as error:
                    raise ValueError(
                        f"parameter {path!r}: {what} rule {pattern.pattern!r}: {error}"
                    ) from None
                return check(path, shape, result)
        if fallback is not None:
            return fallback(path, shape)
        patterns = [pattern.pattern for pattern, _ in pairs]
        raise ValueError(
            f"no {what} rule matches parameter {path!r} (shape {shape}); "
            f"patterns tried: {patterns}"
        )

    return rule


def check_scale(name: str, path: str, shape: Shape, value: Any) -> float:
    """Returns `value` as a float if it is a positive finite number, else raises.

    The error names the hyper-parameter (`name`), the parameter path and its shape.
    """
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} for parameter {path!r} (shape {shape}) must be a positive number; "
            f"got {value!r}"
        ) from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"{name} for parameter {path!r} (shape {shape}) must be positive and finite; "
            f"got {scale}"
        )
    return scale


def check_slot_shape(path: str, shape: Shape, slot_shape: Any) -> Shape:
    """Checks a `shape_fn` result: `()`, or the tensor's shape with some axes set to 1."""
    try:
        slot = tuple(int(dim) for dim in slot_shape)
    except TypeError:
        slot = None
    if slot is None or not (slot == () or (
            len(slot) == len(shape) and all(s in (1, d) for s, d in zip(slot, shape, strict=True))
    )):
        raise ValueError(
            f"slot shape for parameter {path!r} (shape {tuple(shape)}) must be () or the "
            f"parameter's shape with some axes set to 1; got {slot_shape!r}"
        )
    return slot


def eta_fn_from_rules(rules: Rules, *, fallback: ParamRule | None = None) -> ParamRule:
    """A scale rule (`η` for Amos, `σ` for Amos-style) from `(regex, value)` pairs.

    Args:
      rules: `(regex, value)` pairs, or a mapping from regex to value; the first regex
        found in the path wins. A value is a positive number or an expression of the
        shape such as `"1/sqrt(fan_in)"` or `"sqrt(2/prod(SHAPE[:-1]))"`.
      fallback: rule consulted when no regex matches, typically
        `eta_fn_from_init(params)`. Without one, an unmatched path is an error.

    Returns:
      `rule(path, shape) -> float`.

    Raises:
      ValueError: at construction, for a malformed rule or a non-positive number; when
        called, for a path no rule matches (the message names the path) or an
        expression that is not a positive finite number for that shape.
    """
    checked = []
    for pattern, value in _rule_pairs(rules, "scale"):
        if not isinstance(value, str) and not (
                _is_number(value) and math.isfinite(value) and value > 0):
            raise ValueError(
                f"scale rule {pattern.pattern!r} must give a positive number or an "
                f"expression; got {value!r}"
            )
        checked.append((pattern.pattern, value))

    def check(path: str, shape: Shape, value: Any) -> float:
        return check_scale("scale", path, shape, value)

    return _rule_fn(checked, fallback, "scale", check)


def shape_fn_from_rules(rules: Rules, *, fallback: ParamRule | None = None) -> ParamRule:
    """A slot-shape rule (Amos `shape_fn`) from `(regex, value)` pairs.

    A value is `()` (one slot entry per tensor), a tuple, or an expression giving a
    tuple such as `"(1, SHAPE[1])"`, or `"SHAPE"` for full slots. The result must be
    `()` or the parameter's shape with some axes set to 1.

    Raises:
      ValueError: when called, for a path no rule matches (unless `fallback` is given)
        or a result of the wrong form; the message names the path.
    """
    return _rule_fn(rules, fallback, "slot shape", check_slot_shape)


def reduce_largest_axes(num_axes: int = 1, *, min_size: int = 1) -> ParamRule:
    """A `shape_fn` that keeps Amos slots small: the largest axes are reduced to 1.

    For a tensor of rank >= 2, the `num_axes` largest axes with at least `min_size`
    entries are set to 1 (at most rank - 1 axes, ties going to the earlier axis, so a
    square `[d_in, d_out]` kernel keeps a `d_out` vector). Vectors and scalars keep full
    slots. A `[m, n]` matrix with `m >= n` thus stores `n` numbers per slot instead of
    `m n`: the second moment is averaged over the reduced axes (kexue.fm/archives/9344,
    question 4; Amos paper, memory section).
    """
    check_int("num_axes", num_axes)
    check_int("min_size", min_size)

    def shape_fn(path: str, shape: Shape) -> Shape:
        del path
        shape = tuple(shape)
        if len(shape) < 2:
            return shape
        order = sorted(range(len(shape)), key=lambda axis: (-shape[axis], axis))
        reduced = [axis for axis in order if shape[axis] >= min_size]
        reduced = set(reduced[:min(num_axes, len(shape) - 1)])
        return tuple(1 if axis in reduced else dim for axis, dim in enumerate(shape))

    return shape_fn


def eta_fn_from_init(params: Any, *, zero_or_one_scale: float = 0.5) -> ParamRule:
    """A scale rule read off the initial parameters (Amos paper §4; kexue.fm/archives/9344).

    * A tensor whose entries all equal 0 (a bias) or all equal 1 (a norm scale) gets
      `zero_or_one_scale` (0.5 in the paper and the post).
    * Any other tensor gets the standard deviation of its entries: for a randomly
      initialised kernel this is the init standard deviation (e.g. `1/sqrt(fan_in)`).
    * A tensor holding one other constant (say a temperature initialised to 10) has
      no scale to read: calling the rule for it raises, asking for an explicit rule.

    Args:
      params: the initial parameter pytree (concrete arrays, not tracers), e.g. a dict,
        or an `nnx.State` from `nnx.split(model, nnx.Param, ...)`.
      zero_or_one_scale: scale for all-zero and all-one tensors.

    Returns:
      `rule(path, shape) -> float`, valid for the paths and shapes of `params`.
    """
    check_scale("`zero_or_one_scale`", "", (), zero_or_one_scale)
    pairs, _ = flatten_with_parameter_paths(params)
    arrays = [jnp.asarray(leaf) for _, leaf in pairs]

    @jax.jit
    def statistics(arrays):
        out = []
        for x in arrays:
            x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            out.append((jnp.std(x), jnp.all(x == 0), jnp.all(x == 1), jnp.min(x), jnp.max(x)))
        return out

    stats = jax.device_get(statistics(arrays))
    table: dict[str, tuple[Shape, float | None, str]] = {}
    for (path, _), array, (std, zero, one, low, high) in zip(pairs, arrays, stats, strict=True):
        shape = tuple(array.shape)
        if array.size == 0 or bool(zero) or bool(one):
            table[path] = (shape, float(zero_or_one_scale), "")
        elif float(low) == float(high) or not float(std) > 0:
            table[path] = (shape, None, f"is initialised to the constant {float(low)!r}")
        else:
            table[path] = (shape, float(std), "")

    def rule(path: str, shape: Shape) -> float:
        if path not in table:
            raise ValueError(
                f"parameter {path!r} (shape {tuple(shape)}) is not in the parameters the "
                f"scale was read from; known paths: {sorted(table)}"
            )
        known_shape, scale, problem = table[path]
        if tuple(shape) != known_shape:
            raise ValueError(
                f"parameter {path!r} has shape {tuple(shape)} but had shape {known_shape} "
                "when the scale was read from the initial parameters"
            )
        if scale is None:
            raise ValueError(
                f"parameter {path!r} (shape {known_shape}) {problem}, so its scale cannot "
                "be read from the initial values; give it a rule: "
                "eta_fn_from_rules([(regex, scale)], fallback=eta_fn_from_init(params))"
            )
        return scale

    return rule
