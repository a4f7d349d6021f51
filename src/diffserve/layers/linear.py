"""Linear layers that own their tensor-parallel sharding.

Each layer allocates only this rank's shard and attaches a `weight_loader` to every parameter that
narrows the full checkpoint tensor to that shard (and, for fused layers, to the sub-block named by
a shard id). Model code never slices. At tp=1 every layer is a plain linear.

LoRA adapters attach to a layer from outside (`layer.lora`, diffserve.layers.lora): every matmul
adds the active adapters' low-rank update of this rank's shard, before any gather or reduction.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffserve.distributed.parallel_state import get_tp_group
from diffserve.layers.gelu_fp8 import GeluTanhInput
from diffserve.layers.quantization import LinearMethod, UnquantizedLinearMethod
from diffserve.loader.weight_utils import WeightLoadingError, check_shape, default_weight_loader, set_weight_attrs


UNQUANTIZED = UnquantizedLinearMethod()


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor parallel size ({denominator})")
    return numerator // denominator


class LinearBase(nn.Module):
    # Resident LoRA adapters (a diffserve.layers.lora.LoRAStack) once the engine loads some; None: none.
    lora = None

    def __init__(self, input_size: int, output_size: int, bias: bool, prefix: str = ""):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.prefix = prefix
        self.tp_group = get_tp_group()
        self.tp_size = self.tp_group.world_size
        self.tp_rank = self.tp_group.rank_in_group
        # How the matmul is computed (diffserve.layers.quantization); replaced at load to quantize.
        self.quant_method: LinearMethod = UNQUANTIZED

    def _make_params(self, out_features: int, in_features: int, bias: bool) -> None:
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        default_weight_loader(param, loaded)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's x @ weight.T (+ bias), through the layer's compute method, plus the active LoRA
        adapters' update of this shard."""
        if self.lora is not None and isinstance(x, GeluTanhInput):
            x = x.evaluate()  # the adapters' update reads the activation too
        y = self.quant_method.apply(self, x, bias)
        return y if self.lora is None else self.lora.add_delta(x, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, tp={self.tp_size}"


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight (adaLN modulation, embedders, small projections)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, prefix: str = ""):
        super().__init__(input_size, output_size, bias, prefix)
        self._make_params(output_size, input_size, bias)


class ColumnParallelLinear(LinearBase):
    """Y = X A with A split by columns (output features); each rank returns its slice of Y."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        prefix: str = "",
    ):
        super().__init__(input_size, output_size, bias, prefix)
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, self.tp_size, f"{prefix or 'layer'} output size")
        self._make_params(self.output_size_per_partition, input_size, bias)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        size = param.shape[0]
        if loaded.shape[0] != size * self.tp_size:
            raise WeightLoadingError(
                f"{self.prefix or 'column-parallel layer'}: checkpoint tensor has {loaded.shape[0]} output rows, "
                f"expected {size * self.tp_size}"
            )
        shard = loaded.narrow(0, self.tp_rank * size, size)
        check_shape(param, shard)
        param.data.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias)
        return self.tp_group.all_gather(y, dim=-1) if self.gather_output else y

    def forward_gelu_tanh(self, x: torch.Tensor) -> torch.Tensor | GeluTanhInput:
        """gelu(self(x), approximate="tanh"), for the next linear layer to take.

        In the matmul's epilogue (cuBLASLt computes the activation from the float32 accumulator)
        when nothing else touches the product: a 16-bit CUDA input, a bias, unquantized, no LoRA, no
        hooks, no gather. That skips a read and a write of the wide hidden activation: FLUX.1-dev's
        [4608, 3072 -> 12288] took 0.46 ms instead of 0.55 ms on an H200 (compiled), and the result
        is rounded once instead of twice. Otherwise the GELU is returned unevaluated (a
        `GeluTanhInput`), for an FP8 next layer to compute while it quantizes its input."""
        fused = (self.quant_method is UNQUANTIZED and self.lora is None and self.bias is not None
                 and not self.gather_output and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                 and self.weight.device == x.device and not (self._forward_pre_hooks or self._forward_hooks))
        if not fused:
            return GeluTanhInput(self(x))
        # On CUDA the epilogue's GELU is the tanh approximation (torch's CPU kernel would be exact).
        y = torch._addmm_activation(self.bias, x.reshape(-1, x.shape[-1]), self.weight.t(), use_gelu=True)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul; shard i of the checkpoint fills block i."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, prefix: str = ""):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, gather_output=False, prefix=prefix)
        for size in output_sizes:
            divide(size, self.tp_size, f"{prefix or 'layer'} sub-output size")

    def _shard_offset_and_size(self, shard_id: int) -> tuple[int, int]:
        if not 0 <= shard_id < len(self.output_sizes):
            raise WeightLoadingError(f"{self.prefix}: shard id {shard_id} out of range {len(self.output_sizes)}")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return offset, self.output_sizes[shard_id] // self.tp_size

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            for i, full in enumerate(loaded.split(self.output_sizes, dim=0)):
                self._load_part(param, full, i, i)
            return
        self._load_part(param, loaded, self._shard_index(shard_id), shard_id)

    def _load_part(self, param: torch.Tensor, loaded: torch.Tensor, index: int, shard_id: int | str) -> None:
        offset, size = self._shard_offset_and_size(index)
        if loaded.shape[0] != size * self.tp_size:
            raise WeightLoadingError(
                f"{self.prefix or 'merged layer'} shard {shard_id!r}: checkpoint tensor has {loaded.shape[0]} "
                f"output rows, expected {size * self.tp_size}"
            )
        target = param.data.narrow(0, offset, size)
        shard = loaded.narrow(0, self.tp_rank * size, size)
        check_shape(target, shard)
        target.copy_(shard)

    def _shard_index(self, shard_id: int | str) -> int:
        return int(shard_id)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused query/key/value projection; heads are split across TP ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        prefix: str = "",
    ):
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tp_group().world_size
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, f"{prefix or 'attention'} number of heads")
        self.num_kv_heads = divide(total_num_kv_heads, tp_size, f"{prefix or 'attention'} number of kv heads")
        super().__init__(
            hidden_size,
            [total_num_heads * head_size, total_num_kv_heads * head_size, total_num_kv_heads * head_size],
            bias=bias,
            prefix=prefix,
        )
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size

    def _shard_index(self, shard_id: int | str) -> int:
        index = {"q": 0, "k": 1, "v": 2}.get(shard_id)
        if index is None:
            raise WeightLoadingError(f"{self.prefix}: QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        return index

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """Y = X A with A split by rows (input features); partial results are summed across ranks.

    `input_partition_sizes` handles an input that is a concatenation of separately column-sharded
    blocks (e.g. FLUX's single block feeds cat([attention, mlp]) into one projection): each block's
    columns are split on their own.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        reduce_results: bool = True,
        input_partition_sizes: list[int] | None = None,
        prefix: str = "",
    ):
        super().__init__(input_size, output_size, bias, prefix)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_partition_sizes = list(input_partition_sizes or [input_size])
        if sum(self.input_partition_sizes) != input_size:
            raise ValueError(f"{prefix}: input_partition_sizes {self.input_partition_sizes} do not sum to {input_size}")
        for size in self.input_partition_sizes:
            divide(size, self.tp_size, f"{prefix or 'layer'} input size")
        self.input_size_per_partition = input_size // self.tp_size
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})
        if bias:
            # Added once, after the reduction, so every rank holds the full bias.
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": default_weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if loaded.shape[-1] != self.input_size:
            raise WeightLoadingError(
                f"{self.prefix or 'row-parallel layer'}: checkpoint tensor has {loaded.shape[-1]} input columns, "
                f"expected {self.input_size}"
            )
        blocks = loaded.split(self.input_partition_sizes, dim=-1)
        shard = torch.cat(
            [b.narrow(-1, self.tp_rank * (b.shape[-1] // self.tp_size), b.shape[-1] // self.tp_size) for b in blocks],
            dim=-1,
        )
        check_shape(param, shard)
        param.data.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        if not self.input_is_parallel:
            x = x.evaluate() if isinstance(x, GeluTanhInput) else x
            x = torch.cat([b.chunk(self.tp_size, dim=-1)[self.tp_rank] for b in x.split(self.input_partition_sizes, -1)], -1)
        # A LoRA update of this rank's input columns is a partial sum too: it joins the reduction.
        y = self.matmul(x, None)
        if self.reduce_results:
            y = self.tp_group.all_reduce(y)
        # Without the reduction the caller sums partial results: only one rank may add the bias.
        if self.bias is not None and (self.reduce_results or self.tp_rank == 0):
            y = y + self.bias
        return y
