"""``TensorData``, at the module path of Tinker's ``tinker.types.tensor_data``."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = ["TensorData", "TensorDtype"]

TensorDtype: TypeAlias = Literal["int64", "float32"]
"""Element type of a :class:`TensorData` (the two Tinker uses)."""


@dataclasses.dataclass(frozen=True)
class TensorData:
    """A dense tensor, flattened row-major, as in Tinker.

    Attributes:
        data: The values, flattened.
        dtype: ``"int64"`` or ``"float32"``.
        shape: The shape; ``None`` means 1-D of ``len(data)``.
    """

    data: list[int] | list[float]
    dtype: TensorDtype
    shape: list[int] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("int64", "float32"):
            raise ValueError(f"unsupported TensorData dtype {self.dtype!r}")
        if self.shape is not None and math.prod(self.shape) != len(self.data):
            raise ValueError(f"shape {self.shape} does not hold {len(self.data)} values")

    @classmethod
    def from_numpy(cls, array: npt.NDArray[Any]) -> TensorData:
        """From a numpy array (floats become float32, integers int64)."""
        return cls(
            data=array.flatten().tolist(),
            dtype=_dtype_of_kind(array.dtype.kind),
            shape=list(array.shape),
        )

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        """From a torch tensor (floating types become float32, others int64)."""
        dtype: TensorDtype = "float32" if tensor.dtype.is_floating_point else "int64"
        return cls(
            data=tensor.detach().cpu().flatten().tolist(), dtype=dtype, shape=list(tensor.shape)
        )

    def to_numpy(self) -> npt.NDArray[Any]:
        """As a numpy array of the stated dtype and shape."""
        array = np.array(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> torch.Tensor:
        """As a torch tensor of the stated dtype and shape."""
        import torch

        dtype = torch.int64 if self.dtype == "int64" else torch.float32
        tensor = torch.tensor(self.data, dtype=dtype)
        return tensor.reshape(self.shape) if self.shape is not None else tensor

    def tolist(self) -> list[Any]:
        """As (nested) Python lists."""
        result: list[Any] = self.to_numpy().tolist()
        return result


def _dtype_of_kind(kind: str) -> TensorDtype:
    if kind == "f":
        return "float32"
    if kind in ("i", "u", "b"):
        return "int64"
    raise ValueError(f"unsupported array dtype kind {kind!r}")
