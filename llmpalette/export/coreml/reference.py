"""A numpy reference evaluator of the ML Program in a saved `.mlpackage`, for Linux (no Core ML runtime).

It reads the package back (Core ML Tools' milproto loader: the program exactly as saved, not the
program we built), then runs a function op by op with numpy, keeping the states between calls as
Core ML does. Only the ops `program.py` emits are implemented; any other op is refused by name.

Precision follows the program's types: every op computes in float32 from its inputs and rounds its
result once to the output type (float16 for this program), which is how an fp16 ML Program runs on
the Neural Engine and GPU up to accumulation order. So the evaluator says what the package computes
(up to that order), and comparing it with the torch model measures the export's error.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmpalette.export.coreml.package import load_program


# -- the ops ---------------------------------------------------------------------------------
def lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None = None) -> np.ndarray:
    """iOS18 `constexpr_lut_to_dense`: each index (or vector of `lut.shape[-1]` elements along
    `vector_axis`) takes its entry from the LUT of its block; LUT blocks tile each axis evenly."""
    rank = indices.ndim
    counts, entries, d = lut.shape[:rank], lut.shape[-2], lut.shape[-1]
    table = np.zeros(indices.shape, dtype=np.int64)  # which LUT serves each index, row-major over `counts`
    for axis in range(rank):
        block = indices.shape[axis] // counts[axis]
        coord = (np.arange(indices.shape[axis]) // block).reshape([-1 if a == axis else 1 for a in range(rank)])
        table = table * counts[axis] + coord
    flat = lut.reshape(-1, d)[table * entries + indices.astype(np.int64)]  # [*indices.shape, d]
    if d == 1:
        return flat[..., 0]
    axis = vector_axis % rank
    moved = np.moveaxis(flat, axis, -2)  # [..., indices.shape[axis], d]: a vector's elements follow each other
    return np.moveaxis(moved.reshape(*moved.shape[:-2], moved.shape[-2] * d), -1, axis)


def blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """iOS18 `constexpr_blockwise_shift_scale`: `scale * (data - offset)`, scale and offset repeated over blocks."""
    values = data.astype(np.float32)
    for axis in range(data.ndim):
        block = data.shape[axis] // scale.shape[axis]
        scale = np.repeat(scale, block, axis=axis)
        if offset is not None:
            offset = np.repeat(offset, block, axis=axis)
    if offset is not None:
        values = values - offset.astype(np.float32)
    return values * scale.astype(np.float32)


def sparse_to_dense(nonzero_data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """iOS18 `constexpr_sparse_to_dense`: the values in row-major order where the bit mask is 1, zeros elsewhere."""
    out = np.zeros(mask.shape, dtype=nonzero_data.dtype)
    out[mask != 0] = nonzero_data
    return out


def _slice(x: np.ndarray, args: dict) -> tuple:
    """The index tuple of MIL `slice_by_index` / `slice_update`."""
    rank = x.ndim
    begin, end = list(args["begin"]), list(args["end"])
    stride = list(args.get("stride") if args.get("stride") is not None else [1] * rank)
    begin_mask = args.get("begin_mask") if args.get("begin_mask") is not None else [False] * rank
    end_mask = args.get("end_mask") if args.get("end_mask") is not None else [False] * rank
    squeeze = args.get("squeeze_mask") if args.get("squeeze_mask") is not None else [False] * rank
    index = []
    for a in range(rank):
        if squeeze[a]:
            index.append(int(begin[a]))
            continue
        start = None if begin_mask[a] else int(begin[a])
        stop = None if end_mask[a] else int(end[a])
        index.append(slice(start, stop, int(stride[a])))
    return tuple(index)


def _conv(args: dict) -> np.ndarray:
    x, weight = args["x"].astype(np.float32), args["weight"].astype(np.float32)
    if weight.shape[2:] != (1, 1) or int(args.get("groups", 1)) != 1 or any(int(s) != 1 for s in args["strides"]):
        raise NotImplementedError("reference conv: only 1x1 convolutions with stride 1 and groups 1 are implemented")
    y = np.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x)
    if args.get("bias") is not None:
        y = y + args["bias"].astype(np.float32).reshape(1, -1, 1, 1)
    return y


def _matmul(args: dict) -> np.ndarray:
    x, y = args["x"].astype(np.float32), args["y"].astype(np.float32)
    if args.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if args.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _layer_norm(args: dict) -> np.ndarray:
    x = args["x"].astype(np.float32)
    axes = tuple(int(a) for a in args["axes"])
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(args["epsilon"]))
    if args.get("gamma") is not None:
        y = y * args["gamma"].astype(np.float32)
    if args.get("beta") is not None:
        y = y + args["beta"].astype(np.float32)
    return y


def _softmax(args: dict) -> np.ndarray:
    x = args["x"].astype(np.float32)
    axis = int(args["axis"])
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _gather(args: dict) -> np.ndarray:
    if int(args.get("batch_dims", 0)):
        raise NotImplementedError("reference gather: batch_dims > 0 is not implemented")
    return np.take(args["x"], args["indices"].astype(np.int64), axis=int(args["axis"]))


def _slice_update(args: dict) -> np.ndarray:
    out = args["x"].copy()
    out[_slice(out, args)] = args["update"]
    return out


def _float(fn: Callable) -> Callable:
    """A binary elementwise op computed in float32 (its result is rounded to the output type afterwards)."""
    return lambda args: fn(np.asarray(args["x"], dtype=np.float32), np.asarray(args["y"], dtype=np.float32))


def _vector_axis(args: dict) -> int | None:
    return None if args.get("vector_axis") is None else int(args["vector_axis"])


OPS: dict[str, Callable[[dict], np.ndarray]] = {
    "constexpr_lut_to_dense": lambda a: lut_to_dense(a["indices"], a["lut"], _vector_axis(a)),
    "constexpr_blockwise_shift_scale": lambda a: blockwise_shift_scale(a["data"], a["scale"], a.get("offset")),
    "constexpr_sparse_to_dense": lambda a: sparse_to_dense(a["nonzero_data"], a["mask"]),
    "add": _float(np.add),
    "sub": _float(np.subtract),
    "mul": _float(np.multiply),
    "not_equal": _float(np.not_equal),
    "select": lambda a: np.where(a["cond"], a["a"], a["b"]),
    "conv": _conv,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "silu": lambda a: (lambda x: x / (1.0 + np.exp(-x)))(a["x"].astype(np.float32)),
    "gather": _gather,
    "reshape": lambda a: a["x"].reshape([int(s) for s in a["shape"]]),
    "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": lambda a: np.expand_dims(a["x"], tuple(int(x) for x in a["axes"])),
    "concat": lambda a: np.concatenate(a["values"], axis=int(a["axis"])),
    "slice_by_index": lambda a: a["x"][_slice(a["x"], a)],
    "slice_update": _slice_update,
}
_INT_ARITHMETIC = {"add": np.add, "sub": np.subtract, "mul": np.multiply}


# -- the evaluator -----------------------------------------------------------------------------
class ReferenceEvaluator:
    """Runs the functions of a saved `.mlpackage` with numpy.

    Example:
        evaluator = ReferenceEvaluator("model.mlpackage")
        states = evaluator.new_states("prefill")
        outputs = evaluator.run("prefill", {"input_ids": ..., "position_ids": ..., "causal_mask": ...}, states)
    """

    def __init__(self, package: str | Path):
        self.program = load_program(package)
        self._constants: dict[str, dict[str, np.ndarray]] = {}  # per function: values that depend on no input

    @property
    def functions(self) -> list[str]:
        return list(self.program.functions)

    def new_states(self, function: str) -> dict[str, np.ndarray]:
        """Zero-filled states of `function` (what `make_state()` gives on a device)."""
        fn = self.program.functions[function]
        states = {}
        for name, var in fn.inputs.items():
            if _is_state(var):
                tensor = var.sym_type.wrapped_type()
                states[name] = np.zeros(tensor.get_shape(), dtype=_numpy_dtype(tensor.get_primitive()))
        return states

    def run(self, function: str, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of one prediction; `states` is updated in place as the program writes it."""
        fn = self.program.functions[function]
        env: dict[str, object] = dict(self._constants_of(function))
        for name, var in fn.inputs.items():
            if not _is_state(var):
                env[name] = np.asarray(inputs[name]).astype(_numpy_dtype(var.dtype)).reshape(var.shape)
        for op in fn.operations:
            if op.outputs and op.outputs[0].name in env:
                continue
            if op.op_type == "read_state":
                env[op.outputs[0].name] = states[op.inputs["input"].name].copy()
            elif op.op_type == "coreml_update_state":
                value = env[op.inputs["value"].name]
                states[op.inputs["state"].name] = value.copy()
                env[op.outputs[0].name] = value
            else:
                _evaluate(op, env)
        return {var.name: env[var.name] for var in fn.outputs}

    def value(self, function: str, name: str) -> np.ndarray:
        """A value of the program that depends on no input (a weight), computed from the package's ops."""
        constants = self._constants_of(function)
        if name not in constants:
            raise KeyError(f"{function}: no constant value named {name!r} in the package")
        return constants[name]

    def _constants_of(self, function: str) -> dict[str, np.ndarray]:
        """Every value computed from constants alone (const and constexpr ops and what follows them), once."""
        if function not in self._constants:
            fn = self.program.functions[function]
            env: dict[str, object] = {}
            inputs = set(fn.inputs)
            for op in fn.operations:
                if op.op_type in ("read_state", "coreml_update_state"):
                    continue
                if all(v.name not in inputs and v.name in env or v.op is not None and v.op.op_type == "const"
                       for v in _input_vars(op)):
                    _evaluate(op, env)
            self._constants[function] = {k: v for k, v in env.items() if isinstance(v, np.ndarray)}
        return self._constants[function]


def _input_vars(op) -> list:
    out = []
    for value in op.inputs.values():
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def _numpy_dtype(builtin) -> np.dtype:
    from coremltools.converters.mil.mil import types

    if types.is_sub_byte(builtin):  # int4 / uint1..uint6: held one per byte
        return np.dtype(np.uint8 if builtin.is_unsigned() else np.int8)
    return np.dtype(types.nptype_from_builtin(builtin))


def _evaluate(op, env: dict) -> None:
    """Compute `op` from `env` and store its outputs, rounded once to their declared types."""
    if op.op_type == "const":
        env[op.outputs[0].name] = _const(op.outputs[0])
        return
    args = {}
    for key, value in op.inputs.items():
        if isinstance(value, (list, tuple)):
            args[key] = [_read(v, env) for v in value]
        else:
            args[key] = _read(value, env)
    out_var = op.outputs[0]
    out_type = _numpy_dtype(out_var.dtype)
    if op.op_type in _INT_ARITHMETIC and np.issubdtype(out_type, np.integer):
        result = _INT_ARITHMETIC[op.op_type](args["x"].astype(np.int64), np.asarray(args["y"]).astype(np.int64))
    elif op.op_type in OPS:
        result = OPS[op.op_type](args)
    else:
        raise NotImplementedError(f"reference evaluator: no numpy implementation of the MIL op {op.op_type!r} ({op.name})")
    env[out_var.name] = np.asarray(result).astype(out_type).reshape(out_var.shape)


def _read(var, env: dict):
    if var.name in env:
        return env[var.name]
    if var.op is not None and var.op.op_type == "const":
        return _const(var)
    raise KeyError(f"reference evaluator: {var.name!r} is used before it is computed")


def _const(var):
    value = var.val
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return value.astype(_numpy_dtype(var.dtype)) if value.dtype != _numpy_dtype(var.dtype) else value
    return value
