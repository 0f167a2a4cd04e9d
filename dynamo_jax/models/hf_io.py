"""Hugging Face safetensors <-> Transformer parameters.

Loading memory-maps each .safetensors file (our own ~30-line header parser: ``safe_open`` with
framework="numpy" cannot represent bfloat16, and framework="flax" materialises every tensor on
the default device). Each parameter is built with ``jax.make_array_from_callback``: the callback
receives one device's index, slices the mapped tensor(s) for that shard only, transposes and
casts it. No host or device ever holds more than its own shard (plus the OS page cache).

Saving streams one tensor at a time (gathering shards of that tensor only), in HF names and
layouts, with ``{"format": "pt"}`` metadata so transformers loads the folder.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from dynamo_jax import sharding as shd
from dynamo_jax.models.config import ModelConfig
from dynamo_jax.models.transformer import Transformer

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float16): "float16",
}


# ---------------------------------------------------------------------------- reading


class SafetensorsFolder:
    """Lazy read-only view of the tensors in a folder (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {path}")
            weight_map = {}
        self._entries: dict[str, tuple[str, dict[str, Any], int]] = {}
        self._maps: dict[str, np.memmap] = {}
        for name in files:
            file = os.path.join(path, name)
            header, data_start = _read_header(file)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if weight_map and weight_map.get(key) != name:
                    continue
                self._entries[key] = (file, entry, data_start)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        """Memory-mapped (zero-copy, lazily paged) view of one tensor."""
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} not found in checkpoint")
        file, entry, data_start = self._entries[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported safetensors dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._maps[file][data_start + begin : data_start + end]
        return raw.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _read_header(file: str) -> tuple[dict[str, Any], int]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


# ---------------------------------------------------------------------------- name mapping

# Our parameter path -> (HF name template, HF->ours view, ours->HF array). The view functions
# only reshape/transpose (no copies), so slicing their result touches just one shard's bytes.
_Mapping = tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray], Callable]


def _qkv_in(a: np.ndarray, c: ModelConfig) -> np.ndarray:  # [N*D, E] -> [E, N, D]
    return a.reshape(-1, c.head_dim, a.shape[-1]).transpose(2, 0, 1)


def _qkv_out(a: np.ndarray, c: ModelConfig) -> np.ndarray:  # [E, N, D] -> [N*D, E]
    return a.transpose(1, 2, 0).reshape(-1, a.shape[0])


def _o_in(a: np.ndarray, c: ModelConfig) -> np.ndarray:  # [E, H*D] -> [H, D, E]
    return a.reshape(a.shape[0], c.num_heads, c.head_dim).transpose(1, 2, 0)


def _o_out(a: np.ndarray, c: ModelConfig) -> np.ndarray:  # [H, D, E] -> [E, H*D]
    return a.transpose(2, 0, 1).reshape(a.shape[2], -1)


def _bias_in(a: np.ndarray, c: ModelConfig) -> np.ndarray:  # [N*D] -> [N, D]
    return a.reshape(-1, c.head_dim)


def _bias_out(a: np.ndarray, c: ModelConfig) -> np.ndarray:
    return a.reshape(-1)


def _same(a: np.ndarray, c: ModelConfig) -> np.ndarray:
    return a


def _t(a: np.ndarray, c: ModelConfig) -> np.ndarray:
    return a.T


_LAYER = "model.layers.{}."
_LAYER_MAP: dict[str, _Mapping] = {
    "attn_norm": (_LAYER + "input_layernorm.weight", _same, _same),
    "wq": (_LAYER + "self_attn.q_proj.weight", _qkv_in, _qkv_out),
    "wk": (_LAYER + "self_attn.k_proj.weight", _qkv_in, _qkv_out),
    "wv": (_LAYER + "self_attn.v_proj.weight", _qkv_in, _qkv_out),
    "bq": (_LAYER + "self_attn.q_proj.bias", _bias_in, _bias_out),
    "bk": (_LAYER + "self_attn.k_proj.bias", _bias_in, _bias_out),
    "bv": (_LAYER + "self_attn.v_proj.bias", _bias_in, _bias_out),
    "q_norm": (_LAYER + "self_attn.q_norm.weight", _same, _same),
    "k_norm": (_LAYER + "self_attn.k_norm.weight", _same, _same),
    "wo": (_LAYER + "self_attn.o_proj.weight", _o_in, _o_out),
    "bo": (_LAYER + "self_attn.o_proj.bias", _same, _same),
    "mlp_norm": (_LAYER + "post_attention_layernorm.weight", _same, _same),
    "w_gate": (_LAYER + "mlp.gate_proj.weight", _t, _t),
    "w_up": (_LAYER + "mlp.up_proj.weight", _t, _t),
    "w_down": (_LAYER + "mlp.down_proj.weight", _t, _t),
}
_TOP_MAP: dict[str, _Mapping] = {
    "embed": ("model.embed_tokens.weight", _same, _same),
    "final_norm": ("model.norm.weight", _same, _same),
    "lm_head": ("lm_head.weight", _t, _t),
}


def _path_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _mapping_for(name: str) -> tuple[_Mapping, bool]:
    """(mapping, stacked over layers) for our parameter path name."""
    if name.startswith("layers."):
        return _LAYER_MAP[name.split(".", 1)[1]], True
    return _TOP_MAP[name], False


def _hf_names(name: str, c: ModelConfig) -> list[str]:
    (template, _, _), stacked = _mapping_for(name)
    return [template.format(i) for i in range(c.num_layers)] if stacked else [template]


def _variables(state: Any) -> list[tuple[str, nnx.Variable]]:
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return [(_path_name(path), var) for path, var in flat]


# ---------------------------------------------------------------------------- load


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Any = None,
    *,
    remat: bool = False,
) -> Transformer:
    """Loads a Hugging Face checkpoint folder (config.json + safetensors) into a Transformer.

    Args:
      path: folder with config.json and model.safetensors or model.safetensors.index.json
        (+ shards).
      dtype: compute dtype (e.g. jnp.bfloat16).
      param_dtype: storage dtype of the parameters (checkpoint tensors are cast to it).
      mesh: place parameters sharded on this mesh by their logical axes (see
        dynamo_jax.sharding); None places them on jax.devices()[0].
      rules: logical-axis rules (default dynamo_jax.sharding.DEFAULT_RULES).
      remat: rematerialise layers in the backward pass.
    """
    config = ModelConfig.from_hf_dir(path)
    folder = SafetensorsFolder(path)

    def make() -> Transformer:
        return Transformer(
            config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat
        )

    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    variables = _variables(abstract_state)

    missing = [n for name, _ in variables for n in _hf_names(name, config) if n not in folder]
    if missing:
        raise KeyError(f"checkpoint {os.fspath(path)} lacks tensors: {missing[:8]}")

    if mesh is None:
        device_sharding = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(
            lambda v: v.replace(device_sharding),
            abstract_state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    else:
        shardings = shd.state_shardings(abstract_state, mesh, rules)
    sharding_by_name = dict(_variables(shardings))

    leaves = []
    for name, var in variables:
        shape = var.get_value().shape
        target = np.dtype(param_dtype)
        callback = _shard_reader(folder, name, config, target)
        array = jax.make_array_from_callback(
            shape, sharding_by_name[name].get_value(), callback, dtype=target
        )
        leaves.append(var.replace(array))
    treedef = jax.tree_util.tree_structure(
        abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        model.set_mesh(mesh, rules)
    return model


def _shard_reader(
    folder: SafetensorsFolder, name: str, config: ModelConfig, dtype: np.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    (template, to_ours, _), stacked = _mapping_for(name)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        # np.array copies: jax may alias host buffers on CPU, and the memory map must not
        # outlive a later save_pretrained into the same folder.
        if not stacked:
            return np.array(to_ours(folder.get(template), config)[index], dtype=dtype)
        layer_index, rest = index[0], index[1:]
        layers = range(config.num_layers)[layer_index]
        return np.stack(
            [
                np.array(to_ours(folder.get(template.format(i)), config)[rest], dtype=dtype)
                for i in layers
            ]
        )

    return read


# ---------------------------------------------------------------------------- save


def _host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


# Traced layer index: one compiled slice per parameter kind, not one per (kind, layer).
_take_layer = jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False))


def _tensors_to_save(
    model: Transformer, dtype: np.dtype | None
) -> Iterator[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(HF name, shape, dtype, thunk) per tensor; thunks gather one tensor when called."""
    c = model.config
    for name, var in _variables(nnx.state(model)):
        (template, _, to_hf), stacked = _mapping_for(name)
        array = var.get_value()
        out_dtype = np.dtype(array.dtype if dtype is None else dtype)
        layer_shape = array.shape[1:] if stacked else array.shape
        hf_shape = jax.eval_shape(
            lambda a, f=to_hf: f(a, c), jax.ShapeDtypeStruct(layer_shape, jnp.float32)
        ).shape
        if not stacked:
            yield (
                template,
                hf_shape,
                out_dtype,
                lambda a=array, f=to_hf, d=out_dtype: np.ascontiguousarray(f(_host(a), c), d),
            )
            continue
        for i in range(c.num_layers):
            yield (
                template.format(i),
                hf_shape,
                out_dtype,
                lambda a=array, i=i, f=to_hf, d=out_dtype: np.ascontiguousarray(
                    f(_host(_take_layer(a, i)), c), d
                ),
            )


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_size: int | None = None,
) -> None:
    """Writes config.json + model.safetensors (HF names/layouts) that transformers can load.

    Args:
      model: a Transformer (any sharding; each tensor is gathered on its own).
      path: output folder (created).
      dtype: on-disk dtype (default: the parameters' dtype), e.g. jnp.bfloat16.
      max_shard_size: bytes per file; if the model is larger, writes
        model-0000i-of-0000n.safetensors + model.safetensors.index.json.

    In multi-process runs every process must call this (tensors are all-gathered); only
    process 0 writes.
    """
    path = os.fspath(path)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        # Stale shards/index from an earlier save would shadow or mix with the new files.
        for old in os.listdir(path):
            if old.startswith("model") and (
                old.endswith(".safetensors") or old == "model.safetensors.index.json"
            ):
                os.remove(os.path.join(path, old))
    tensors = list(_tensors_to_save(model, None if dtype is None else np.dtype(dtype)))

    # Plan the files from shapes alone so tensors can be streamed.
    files: list[list[tuple[str, tuple[int, ...], np.dtype, Callable]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * t[2].itemsize
        if max_shard_size is not None and files[-1] and size + nbytes > max_shard_size:
            files.append([])
            size = 0
        files[-1].append(t)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )

    weight_map: dict[str, str] = {}
    total = 0
    for file_name, group in zip(names, files, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for hf_name, shape, dt, _ in group:
            nbytes = int(np.prod(shape)) * dt.itemsize
            header[hf_name] = {
                "dtype": _ST_NAMES[dt],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[hf_name] = file_name
        total += offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
        f = open(os.path.join(path, file_name), "wb") if writer else None
        try:
            if f:
                f.write(struct.pack("<Q", len(blob)) + blob)
            for _, _, _, thunk in group:
                data = thunk()  # every process gathers (collective), one writes
                if f:
                    f.write(data.reshape(-1).view(np.uint8).data)
        finally:
            if f:
                f.close()

    if not writer:
        return
    if len(files) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    save_dtype = np.dtype(model.param_dtype if dtype is None else dtype)
    config = model.config.to_hf_dict(_DTYPE_NAMES.get(save_dtype, "float32"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
