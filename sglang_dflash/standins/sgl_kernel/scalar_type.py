"""`sgl_kernel.scalar_type`: the scalar-type descriptors SGLang's quantization modules
name at import time (GPTQ/AWQ/Marlin/FP4 tables). Descriptive only: no kernel here
consumes them, so this keeps the fields and names, not every helper upstream has."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union


class NanRepr(enum.Enum):
    NONE = 0  # no NaNs
    IEEE_754 = 1  # IEEE 754 NaN encodings
    EXTD_RANGE_MAX_MIN = 2  # the max/min encodings are NaN


@dataclass(frozen=True)
class ScalarType:
    exponent: int
    mantissa: int
    signed: bool
    bias: int
    _finite_values_only: bool = False
    nan_repr: NanRepr = NanRepr.IEEE_754

    @property
    def size_bits(self) -> int:
        return self.exponent + self.mantissa + int(self.signed)

    @property
    def id(self) -> int:
        """A stable integer for this type (packs the fields, like upstream)."""
        val, offset = 0, 0
        for field_value, width in ((self.exponent, 8), (self.mantissa, 8), (int(self.signed), 1),
                                   (self.bias, 32), (int(self._finite_values_only), 1), (self.nan_repr.value, 8)):
            val |= (int(field_value) & ((1 << width) - 1)) << offset
            offset += width
        return val

    def is_floating_point(self) -> bool:
        return self.exponent != 0

    def is_integer(self) -> bool:
        return self.exponent == 0

    def has_bias(self) -> bool:
        return self.bias != 0

    def has_infs(self) -> bool:
        return not self._finite_values_only

    def has_nans(self) -> bool:
        return self.nan_repr != NanRepr.NONE

    def is_ieee_754(self) -> bool:
        return self.nan_repr == NanRepr.IEEE_754 and not self._finite_values_only

    def min(self) -> Union[int, float]:
        if self.is_integer():
            return (-(1 << (self.size_bits - 1)) if self.signed else 0) - self.bias
        raise NotImplementedError("ScalarType.min of a float type is not implemented by the stand-in")

    def max(self) -> Union[int, float]:
        if self.is_integer():
            return ((1 << (self.size_bits - int(self.signed))) - 1) - self.bias
        raise NotImplementedError("ScalarType.max of a float type is not implemented by the stand-in")

    def __str__(self) -> str:
        if self.is_floating_point():
            name = f"float{self.size_bits}_e{self.exponent}m{self.mantissa}"
            if not self.is_ieee_754():
                name += "f" if self._finite_values_only else ""
                name += "n" if self.nan_repr != NanRepr.NONE else ""
            return name
        name = ("int" if self.signed else "uint") + str(self.size_bits)
        return name + (f"b{self.bias}" if self.has_bias() else "")

    def __len__(self) -> int:
        raise TypeError

    @classmethod
    def int_(cls, size_bits: int, bias: Optional[int]) -> "ScalarType":
        return cls(0, size_bits - 1, True, bias or 0)

    @classmethod
    def uint(cls, size_bits: int, bias: Optional[int]) -> "ScalarType":
        return cls(0, size_bits, False, bias or 0)

    @classmethod
    def float_IEEE754(cls, exponent: int, mantissa: int) -> "ScalarType":
        return cls(exponent, mantissa, True, 0)

    @classmethod
    def float_(cls, exponent: int, mantissa: int, finite_values_only: bool, nan_repr: NanRepr) -> "ScalarType":
        return cls(exponent, mantissa, True, 0, finite_values_only, nan_repr)


class scalar_types:
    int4 = ScalarType.int_(4, None)
    uint4 = ScalarType.uint(4, None)
    int8 = ScalarType.int_(8, None)
    uint8 = ScalarType.uint(8, None)
    float8_e4m3fn = ScalarType.float_(4, 3, True, NanRepr.EXTD_RANGE_MAX_MIN)
    float8_e5m2 = ScalarType.float_IEEE754(5, 2)
    float16_e8m7 = ScalarType.float_IEEE754(8, 7)
    float16_e5m10 = ScalarType.float_IEEE754(5, 10)
    float6_e3m2f = ScalarType.float_(3, 2, True, NanRepr.NONE)
    float4_e2m1f = ScalarType.float_(2, 1, True, NanRepr.NONE)
    uint2b2 = ScalarType.uint(2, 2)
    uint3b4 = ScalarType.uint(3, 4)
    uint4b8 = ScalarType.uint(4, 8)
    uint8b128 = ScalarType.uint(8, 128)
    bfloat16 = float16_e8m7
    float16 = float16_e5m10
